#!/bin/bash
# bench.py --norm gn without and with models.GroupNorm's NCHW detour, in turn, twice each.
# usage: run.sh BEFORE_TREE (a checkout of the commit before it); run from the repository root
# of the commit with it. Outputs: results/speed/gn-layout/bench-{before,after}-{1,2}.txt
set -e
out=$PWD/results/speed/gn-layout
D=$(realpath ../shared/data/cifar10-jpg)
for i in 1 2; do
  (cd "$1" && python bench.py --norm gn --optimizer muon --data-dir $D) > $out/bench-before-$i.txt
  python bench.py --norm gn --optimizer muon --data-dir $D > $out/bench-after-$i.txt
done
