#!/bin/bash
# bench.py before and after the GAP change (nn.AdaptiveAvgPool2d(1) -> models.GlobalAvgPool),
# in turn, twice, on an otherwise idle machine; "before" is commit ca82b07, checked out aside.
# Run from the repository root: bash results/speed/gap/run.sh [DATA_DIR]
D=$(realpath ${1:-../shared/data/cifar10-jpg})
out=$PWD/results/speed/gap
git worktree add -f /tmp/before-gap ca82b07
for i in 1 2; do
  for side in before after; do
    tree=$PWD; [ $side = before ] && tree=/tmp/before-gap
    (cd $tree && date +%T && /usr/bin/time -f "%e s" python bench.py --data-dir $D) > $out/bench-$side-$i.txt 2>&1
  done
done
