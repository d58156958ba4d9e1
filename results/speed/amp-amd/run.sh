#!/bin/bash
# bench.py in float32 and in bfloat16, in turn, twice each, the machine otherwise idle:
# does bfloat16 pay on a CPU with AVX-512 bfloat16 instructions but no AMX?
# usage: bash results/speed/amp-amd/run.sh ../shared/data/cifar10-jpg
set -e
out=$(dirname "$0")
lscpu > "$out/lscpu.txt"
for round in 1 2; do
  for amp in no-amp amp; do
    python bench.py --data-dir "$1" --workers 0 --eval-batch-sizes 250 --$amp > "$out/bench-$amp-$round.txt"
  done
done
