#!/usr/bin/env bash
# --seeds 0 1 2 against the same nine runs one after another (three `--seed` runs of all
# three norms, both cores each), 2 epochs each, back to back on an otherwise idle machine.
# From the repository root: bash results/speed/seeds-cpu/run.sh ../shared/data/cifar10-jpg
set -euo pipefail
data=$1
here=results/speed/seeds-cpu
scratch=$(mktemp -d)
lscpu > $here/lscpu.txt
start=$(date +%s.%N)
for seed in 0 1 2; do
  python train.py --seed $seed --epochs 2 --data-dir "$data" --out-dir $scratch/one-by-one
done > $here/one-by-one.log 2>&1
middle=$(date +%s.%N)
python train.py --seeds 0 1 2 --epochs 2 --data-dir "$data" --out-dir $scratch/seeds > $here/seeds.log 2>&1
end=$(date +%s.%N)
cp $scratch/seeds/seeds.md $here/
python - "$start" "$middle" "$end" > $here/times.txt <<'PY'
import sys
start, middle, end = map(float, sys.argv[1:])
one, seeds = middle - start, end - middle
print(f"nine runs one after another: {one:.0f} s")
print(f"--seeds 0 1 2:               {seeds:.0f} s")
print(f"speed-up:                    {one / seeds:.2f}x")
PY
cat $here/times.txt
