#!/bin/bash
# bench.py in float32 and in bfloat16, in turn, twice each, the machine otherwise idle:
# does bfloat16 still pay on a Zen 5, whose AVX-512 units are full width?
# usage: bash results/speed/zen5/amp/run.sh ../shared/data/cifar10-jpg
set -e
out=$(dirname "$0")
lscpu > "$out/lscpu.txt"  # the same as ../lscpu.txt
for round in 1 2; do
  for amp in no-amp amp; do
    python bench.py --data-dir "$1" --workers 0 --eval-batch-sizes 250 --$amp > "$out/bench-$amp-$round.txt"
  done
done
