/* The noise of torcheggroll.noise (version 2) on the CPU: Philox-4x32-10 and Box-Muller.
 *
 * Compiled at first use by torcheggroll/_cpu_noise.py and called through ctypes; the PyTorch
 * functions of torcheggroll/noise.py are the reference it is tested against (bitwise on the
 * integer words, to a stated tolerance on the normals). Counters are made here from the layout
 * of a region of the noise buffer (torcheggroll/noise_buffer.py), so nothing is read per block
 * but the output.
 *
 * Compiled with -ffast-math so that logf, sinf and cosf vectorize (glibc's libmvec), but linked
 * without it: linking with -ffast-math adds crtfastmath.o, which would switch the whole process
 * to flush-to-zero when the library is loaded.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define TILE 512

/* One round on (a, b, c, d) under (k0, k1), then the key's increment. */
#define PHILOX_ROUND                                       \
  do {                                                     \
    uint64_t p0 = (uint64_t)M0 * a, p1 = (uint64_t)M1 * c; \
    uint32_t na = (uint32_t)(p1 >> 32) ^ b ^ k0;           \
    uint32_t nc = (uint32_t)(p0 >> 32) ^ d ^ k1;           \
    b = (uint32_t)p1;                                      \
    d = (uint32_t)p0;                                      \
    a = na;                                                \
    c = nc;                                                \
    k0 += W0;                                              \
    k1 += W1;                                              \
  } while (0)

/* Counters of one tile: c0, c1, c2 per block (c3 is the generation, shared). */
typedef struct {
  uint32_t c0[TILE], c1[TILE], c2[TILE];
} counters;

/* The four words of each of the tile's m blocks. */
static void philox_tile(const counters *restrict ctr, int m, uint32_t c3, uint32_t key0,
                        uint32_t key1, uint32_t *restrict x0, uint32_t *restrict x1,
                        uint32_t *restrict x2, uint32_t *restrict x3) {
  for (int i = 0; i < m; i++) {
    uint32_t a = ctr->c0[i], b = ctr->c1[i], c = ctr->c2[i], d = c3;
    uint32_t k0 = key0, k1 = key1;
    PHILOX_ROUND; PHILOX_ROUND; PHILOX_ROUND; PHILOX_ROUND; PHILOX_ROUND;
    PHILOX_ROUND; PHILOX_ROUND; PHILOX_ROUND; PHILOX_ROUND; PHILOX_ROUND;
    x0[i] = a;
    x1[i] = b;
    x2[i] = c;
    x3[i] = d;
  }
}

/* u = (2 (x >> 9) + 1) / 2^24, exact in float32. */
static void uniforms(const uint32_t *restrict x, float *restrict u, int m) {
  for (int i = 0; i < m; i++) u[i] = (float)(2u * (x[i] >> 9) + 1u) * 0x1p-24f;
}

/* cos and sin of one angle are computed in separate functions: gcc fuses them into sincosf
 * otherwise, which has no vector variant, and the loop stays scalar. The loops always run over a
 * whole tile, so that every block takes the same (vector) path wherever it falls in a tile: a
 * scalar remainder would round differently, and a normal would depend on the buffer's layout. */
__attribute__((noinline)) static void radius_cos(const float *restrict u, const float *restrict v,
                                                 float *restrict r, float *restrict o) {
  for (int i = 0; i < TILE; i++) {
    r[i] = sqrtf(logf(u[i]) * -2.0f);
    o[4 * i] = r[i] * cosf(v[i] * 6.2831853071795864769f);
  }
}

__attribute__((noinline)) static void radius_sin(const float *restrict v,
                                                 const float *restrict r, float *restrict o) {
  for (int i = 0; i < TILE; i++) o[4 * i] = r[i] * sinf(v[i] * 6.2831853071795864769f);
}

/* The normals of the tile's first m blocks into out[4 * i + 0..3] (its other counters are
 * zeroed and their normals dropped). */
static void normals_tile(counters *ctr, int m, uint32_t c3, uint32_t k0, uint32_t k1,
                         float *out) {
  uint32_t x[4][TILE];
  float u[4][TILE], r[TILE], o[4 * TILE];
  for (int i = m; i < TILE; i++) ctr->c0[i] = ctr->c1[i] = ctr->c2[i] = 0;
  philox_tile(ctr, TILE, c3, k0, k1, x[0], x[1], x[2], x[3]);
  for (int w = 0; w < 4; w++) uniforms(x[w], u[w], TILE);
  radius_cos(u[0], u[1], r, o);
  radius_sin(u[1], r, o + 1);
  radius_cos(u[2], u[3], r, o + 2);
  radius_sin(u[3], r, o + 3);
  memcpy(out, o, sizeof(float) * 4 * (size_t)m);
}

/* A low-rank region: blocks (row p, draw k, block j) in that order, with counter
 * (j + c0_base, k, params[p], c3); out gets 4 floats per block. */
void egg_fill_grid(float *out, int64_t rows, int64_t draws, int64_t blocks, uint32_t c0_base,
                   const int64_t *params, uint32_t c3, uint32_t k0, uint32_t k1) {
  counters ctr;
  int64_t total = rows * draws * blocks, p = 0, k = 0, j = 0;
  for (int64_t s = 0; s < total; s += TILE) {
    int m = (int)(total - s < TILE ? total - s : TILE);
    for (int i = 0; i < m; i++) {
      ctr.c0[i] = (uint32_t)j + c0_base;
      ctr.c1[i] = (uint32_t)k;
      ctr.c2[i] = (uint32_t)params[p];
      if (++j == blocks) {
        j = 0;
        if (++k == draws) {
          k = 0;
          ++p;
        }
      }
    }
    normals_tile(&ctr, m, c3, k0, k1, out + 4 * s);
  }
}

/* The dense region: blocks (draw k, column c), with counter (local[c], k, owners[c], c3). */
void egg_fill_columns(float *out, int64_t draws, int64_t blocks, const int64_t *local,
                      const int64_t *owners, uint32_t c3, uint32_t k0, uint32_t k1) {
  counters ctr;
  int64_t total = draws * blocks, k = 0, c = 0;
  for (int64_t s = 0; s < total; s += TILE) {
    int m = (int)(total - s < TILE ? total - s : TILE);
    for (int i = 0; i < m; i++) {
      ctr.c0[i] = (uint32_t)local[c];
      ctr.c1[i] = (uint32_t)k;
      ctr.c2[i] = (uint32_t)owners[c];
      if (++c == blocks) {
        c = 0;
        ++k;
      }
    }
    normals_tile(&ctr, m, c3, k0, k1, out + 4 * s);
  }
}

/* The words of n blocks with counters (c0[i], c1[i], c2[i], c3), 4 per block into out: the
 * integer stream alone, for the tests. */
void egg_words(const int64_t *c0, const int64_t *c1, const int64_t *c2, int64_t n, uint32_t c3,
               uint32_t k0, uint32_t k1, int64_t *out) {
  counters ctr;
  uint32_t x[4][TILE];
  for (int64_t s = 0; s < n; s += TILE) {
    int m = (int)(n - s < TILE ? n - s : TILE);
    for (int i = 0; i < m; i++) {
      ctr.c0[i] = (uint32_t)c0[s + i];
      ctr.c1[i] = (uint32_t)c1[s + i];
      ctr.c2[i] = (uint32_t)c2[s + i];
    }
    philox_tile(&ctr, m, c3, k0, k1, x[0], x[1], x[2], x[3]);
    for (int i = 0; i < m; i++)
      for (int w = 0; w < 4; w++) out[4 * (s + i) + w] = x[w][i];
  }
}
