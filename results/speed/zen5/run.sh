#!/usr/bin/env bash
# The default recipe on a Zen 5 AMD EPYC (lscpu.txt): a full run, then the benchmark twice,
# the machine otherwise idle. From the repository root:
#   bash results/speed/zen5/run.sh ../shared/data/cifar10-jpg [scratch-folder]
set -euo pipefail
data=$1
out=${2:-/tmp/zen5-run}  # scratch: the weights equal results/*/model.pt bit for bit
here=results/speed/zen5
lscpu > $here/lscpu.txt
python train.py --data-dir "$data" --out-dir "$out" > $here/train.log
for norm in bn ln gn; do mkdir -p $here/$norm; cp "$out"/$norm/metrics.json $here/$norm/; done
cp "$out"/results.md $here/
for i in 1 2; do python bench.py --data-dir "$data" > $here/bench-$i.txt; done
