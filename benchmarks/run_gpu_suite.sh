#!/usr/bin/env bash
# Everything this project measures on GPUs, in one go (used on a 2x H100 machine):
# CUDA tests, the population-forward benchmark on one GPU, the correction micro-benchmark, the
# examples on CUDA, the 1-vs-2-GPU distributed throughput and the GPU tolerance of a distributed run.
# Usage: bash benchmarks/run_gpu_suite.sh OUTDIR
set -uo pipefail
out=${1:?usage: run_gpu_suite.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$py -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
echo "== CUDA tests"; $py -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 | tail -15
echo "== correction kernels"; CUDA_VISIBLE_DEVICES=0 $py benchmarks/correction_kernels.py --json "$out/correction.json"
echo "== population forward"; CUDA_VISIBLE_DEVICES=0 $py benchmarks/population_forward.py --preset gpu --device cuda --trials 3 --mem-limit-gib 40 --json "$out/population_forward_h100.json" --plot "$out/population_forward_h100.png"
echo "== examples on CUDA"
CUDA_VISIBLE_DEVICES=0 $py examples/nano_classifier.py --device cuda --quiet
CUDA_VISIBLE_DEVICES=0 $py examples/nano_egg/train.py --device cuda --quiet
CUDA_VISIBLE_DEVICES=0 $py examples/cartpole.py --mode vectorized --device cuda --quiet
if [ "$($py -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  echo "== distributed throughput"
  torchrun --standalone --nproc_per_node=1 benchmarks/distributed_throughput.py --out "$out/distributed_w1.json"
  torchrun --standalone --nproc_per_node=2 benchmarks/distributed_throughput.py --out "$out/distributed_w2.json"
  $py benchmarks/distributed_throughput.py --plot "$out/distributed_w1.json" "$out/distributed_w2.json" --png "$out/distributed_speedup.png"
  echo "== distributed GPU tolerance"
  torchrun --standalone --nproc_per_node=1 examples/distributed_train.py --device cuda --record /tmp/r1.pt
  torchrun --standalone --nproc_per_node=2 examples/distributed_train.py --device cuda --record /tmp/r2.pt
  $py examples/distributed_train.py --compare /tmp/r1.pt /tmp/r2.pt
fi
