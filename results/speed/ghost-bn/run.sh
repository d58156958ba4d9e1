#!/bin/bash
# The training step of BN with ghost batches (--bn-batch B) against plain BN (B = the batch
# of 128), one process each, on 2 threads and on 1 (as study.py trains on a CPU): bench.py's
# project row is train.py's step. Run from the repository root.
set -euo pipefail
here=results/speed/ghost-bn
for threads in 2 1; do
  for b in 128 2 8 32; do
    python bench.py --norm bn --bn-batch $b --workers 0 --at-once 1 --eval-batch-sizes 1000 \
      --batches 20 --rounds 3 --threads $threads --data-dir ../shared/data/cifar10-jpg \
      > $here/bench-b$b-threads$threads.txt 2>&1
  done
done
grep -H "| bn | project |" $here/bench-b*.txt
