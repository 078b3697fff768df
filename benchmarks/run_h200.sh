#!/usr/bin/env bash
# The H200 measurements of the README and docs, in parts that each fit a 10-minute call.
# Usage: bash benchmarks/run_h200.sh PART OUTDIR, PART one of (written for one H200; any sm90 card runs it):
#   tests     the CUDA-only tests (pytest -m cuda)                            ~4 min
#   step      benchmarks/step_graph.py --preset gpu (captured step vs inference)  ~3 min
#   generate  benchmarks/population_generate.py --preset h200 (PopulationDecoder's CUDA-graph
#             decode against generate), after the decoder's CUDA tests          ~5 min
#   nano-float, nano-int  examples/nano_egg/train.py --preset h200, one mode per call   ~9 min each
#   switches  the Triton update kernel and the projection's split (both off by default): their
#             CUDA tests, update_gemm.py, and step_graph.py on paper-r1 and linear-256x16 with
#             and without them, one after the other on the same card              ~7 min
#   one-pass  the one-pass projection + correction (TORCHEGGROLL_ONE_PASS=1, off by default): its
#             CUDA tests, correction_kernels.py, and step_graph.py on linear-256x16 without and
#             with it, alternated twice                                            ~7 min
#   pairs     step_graph.py --preset gpu with each method alternated with inference 4 times per
#             trial (--pairs 4)                                                    ~5 min
set -uo pipefail
part=${1:?usage: run_h200.sh PART OUTDIR}
out=${2:?usage: run_h200.sh PART OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
py=python3
$py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
# Output files are named for the card that ran them (an H100 may be lent for an H200 call).
card=$($py -c 'import torch; n = torch.cuda.get_device_name(); print("h100" if "H100" in n else "h200" if "H200" in n else "gpu")')
case "$part" in
  tests) $py -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tee "$out/cuda_tests_${card}.txt" | tail -15 ;;
  step) timeout 560 $py benchmarks/step_graph.py --preset gpu --trials 3 \
          --json "$out/step_graph_${card}.json" --plot "$out/step_graph_${card}.png" 2>&1 | tee "$out/step_graph_${card}.txt" ;;
  generate) TORCHEGGROLL_AUTOTUNE=0 timeout 150 $py -m pytest -q -m cuda -p no:cacheprovider \
          tests/test_decode.py 2>&1 | tee "$out/cuda_tests_decode_${card}.txt" | tail -25
        TORCHEGGROLL_AUTOTUNE=0 timeout 400 $py benchmarks/population_generate.py --preset h200 \
          --trials 3 --json "$out/population_generate_${card}.json" \
          --plot "$out/population_generate_${card}.png" 2>&1 | tee "$out/population_generate_${card}.txt" ;;
  nano-float) $py examples/nano_egg/train.py --preset h200 --device cuda --time-limit 555 \
          --json "$out/nano_egg_${card}_float.json" --plot "$out/nano_egg_${card}_float.png" > "$out/nano_egg_${card}_float.log" 2>&1
        tail -2 "$out/nano_egg_${card}_float.log" ;;
  nano-int) $py examples/nano_egg/train.py --preset h200 --mode int --device cuda --time-limit 540 \
          --json "$out/nano_egg_${card}_int.json" --plot "$out/nano_egg_${card}_int.png" > "$out/nano_egg_${card}_int.log" 2>&1
        tail -2 "$out/nano_egg_${card}_int.log" ;;
  switches) TORCHEGGROLL_AUTOTUNE=0 timeout 150 $py -m pytest -q -m cuda -p no:cacheprovider \
          tests/test_update_kernel.py tests/test_fused_linear.py -k "update or outer or supported or projection" \
          2>&1 | tee "$out/cuda_tests_switches_${card}.txt" | tail -12
        timeout 120 $py benchmarks/update_gemm.py --trials 3 --json "$out/update_gemm_${card}.json" \
          2>&1 | tee "$out/update_gemm_${card}.txt"
        timeout 100 $py benchmarks/step_graph.py --configs paper-r1,linear-256x16 --trials 3 \
          --json "$out/step_switches_off_${card}.json" 2>&1 | tee "$out/step_switches_off_${card}.txt" | tail -12
        TORCHEGGROLL_PROJECTION_SPLITS=auto timeout 100 $py benchmarks/step_graph.py \
          --configs paper-r1,linear-256x16 --trials 3 --update-gemm triton \
          --json "$out/step_switches_on_${card}.json" 2>&1 | tee "$out/step_switches_on_${card}.txt" | tail -12 ;;
  one-pass) TORCHEGGROLL_AUTOTUNE=0 timeout 120 $py -m pytest -q -m cuda -p no:cacheprovider \
          tests/test_fused_linear.py -k "matches_reference or one_pass" 2>&1 \
          | tee "$out/cuda_tests_one_pass_${card}.txt" | tail -4
        timeout 120 $py benchmarks/correction_kernels.py --json "$out/correction_one_pass_${card}.json" \
          2>&1 | tee "$out/correction_one_pass_${card}.txt" | tail -30
        for i in 1 2; do
          timeout 80 $py benchmarks/step_graph.py --configs linear-256x16 --trials 3 \
            --json "$out/step_one_pass_off_${card}_$i.json" 2>&1 | tail -4
          TORCHEGGROLL_ONE_PASS=1 timeout 80 $py benchmarks/step_graph.py --configs linear-256x16 \
            --trials 3 --json "$out/step_one_pass_on_${card}_$i.json" 2>&1 | tail -4
        done ;;
  pairs) timeout 560 $py benchmarks/step_graph.py --preset gpu --trials 3 --pairs 4 \
          --json "$out/step_graph_pairs_${card}.json" --plot "$out/step_graph_pairs_${card}.png" 2>&1 \
          | tee "$out/step_graph_pairs_${card}.txt" ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
