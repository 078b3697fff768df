#!/usr/bin/env bash
# The H200 measurements of the README and docs, in parts that each fit a 10-minute call.
# Usage: bash benchmarks/run_h200.sh PART OUTDIR, PART one of:
#   tests     the CUDA-only tests (pytest -m cuda)                            ~4 min
#   step      benchmarks/step_graph.py --preset gpu (captured step vs inference)  ~3 min
#   generate  benchmarks/population_generate.py --preset h200 (PopulationDecoder's CUDA-graph
#             decode against generate), after the decoder's CUDA tests          ~5 min
#   nano-float, nano-int  examples/nano_egg/train.py --preset h200, one mode per call   ~9 min each
set -uo pipefail
part=${1:?usage: run_h200.sh PART OUTDIR}
out=${2:?usage: run_h200.sh PART OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
py=python3
$py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
case "$part" in
  tests) $py -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tee "$out/cuda_tests_h200.txt" | tail -15 ;;
  step) timeout 560 $py benchmarks/step_graph.py --preset gpu --trials 3 \
          --json "$out/step_graph_h200.json" --plot "$out/step_graph_h200.png" 2>&1 | tee "$out/step_graph_h200.txt" ;;
  generate) TORCHEGGROLL_AUTOTUNE=0 timeout 150 $py -m pytest -q -m cuda -p no:cacheprovider \
          tests/test_decode.py 2>&1 | tee "$out/cuda_tests_decode_h200.txt" | tail -25
        TORCHEGGROLL_AUTOTUNE=0 timeout 400 $py benchmarks/population_generate.py --preset h200 \
          --trials 3 --json "$out/population_generate_h200.json" \
          --plot "$out/population_generate_h200.png" 2>&1 | tee "$out/population_generate_h200.txt" ;;
  nano-float) $py examples/nano_egg/train.py --preset h200 --device cuda --time-limit 555 \
          --json "$out/nano_egg_h200_float.json" --plot "$out/nano_egg_h200_float.png" > "$out/nano_egg_h200_float.log" 2>&1
        tail -2 "$out/nano_egg_h200_float.log" ;;
  nano-int) $py examples/nano_egg/train.py --preset h200 --mode int --device cuda --time-limit 540 \
          --json "$out/nano_egg_h200_int.json" --plot "$out/nano_egg_h200_int.png" > "$out/nano_egg_h200_int.log" 2>&1
        tail -2 "$out/nano_egg_h200_int.log" ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
