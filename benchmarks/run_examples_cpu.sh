#!/usr/bin/env bash
# The README's example table on the CPU: every command of the table, one thread, its result JSON
# and training curve written to OUT (default benchmarks/results/examples_cpu), its log beside.
#   bash benchmarks/run_examples_cpu.sh [OUT] [--quick]
# --quick leaves out the three long nano_egg runs (the original's quick test: the low-rank and
# the materialized path, and int8), about 20 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/examples_cpu}"
quick="${2:-}"
mkdir -p "$out"
run() {  # name, command... (a curve for every run but CartPole's seeds 1-4)
  local name="$1"; shift
  local plot=(--plot "$out/$name.png")
  case "$name" in cartpole_*_seed[1-9] | paths_*) plot=() ;; esac
  echo "== $name: $*"
  "$@" --threads 1 --json "$out/$name.json" "${plot[@]}" > "$out/$name.log" 2>&1
  tail -n 2 "$out/$name.log"
}
run nano_classifier python examples/nano_classifier.py --steps 50 --pop-size 64 --quiet
run nano_egg_defaults python examples/nano_egg/train.py --quiet
for seed in 0 1 2 3 4; do
  for mode in sequential vectorized; do
    run "cartpole_${mode}_seed$seed" python examples/cartpole.py --mode "$mode" --seed "$seed" --quiet
  done
done
if [ "$quick" != "--quick" ]; then
  data=examples/nano_egg/data/minipile_valid_1000.npy
  flags=(--mode float --epochs 50 --hidden-dim 32 --n-layers 1 --pop-size 512 --max-docs 1000)
  run nano_egg_minipile python examples/nano_egg/train.py "${flags[@]}" --data "$data" --quiet
  run nano_egg_minipile_materialized python examples/nano_egg/train.py "${flags[@]}" --data "$data" \
    --path materialized --quiet
  run nano_egg_minipile_int python examples/nano_egg/train.py "${flags[@]}" --data "$data" \
    --mode int --quiet
fi
run nano_egg_int python examples/nano_egg/train.py --mode int --quiet
# The two forward paths, back to back (docs/examples.md, Forward paths).
for path in materialized auto; do
  run "paths_nano_egg_epochs10_$path" python examples/nano_egg/train.py --epochs 10 --path "$path" --quiet
  run "paths_cartpole_vectorized_seed0_$path" python examples/cartpole.py --mode vectorized --path "$path" --quiet
  run "paths_nano_classifier_$path" python examples/nano_classifier.py --path "$path" --quiet
done
