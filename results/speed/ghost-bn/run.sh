#!/bin/bash
# The training step of BN with ghost batches (--bn-batch B) against plain BN (B = the batch
# of 128), one process each, on 2 threads and on 1 (as study.py trains on a CPU): bench.py's
# project row is train.py's step. Run from the repository root.
set -euo pipefail
here=results/speed/ghost-bn
for threads in 2 1; do
  for b in 128 2 4 8 32; do
    python bench.py --norm bn --bn-batch $b --workers 0 --at-once 1 --eval-batch-sizes 1000 \
      --batches 20 --rounds 3 --threads $threads --data-dir ../shared/data/cifar10-jpg \
      > $here/bench-b$b-threads$threads.txt 2>&1
  done
done
# results.md, the table docs/norm-studies.md shows: each B's training step against B = 128's.
{
  head -n 1 $here/bench-b128-threads1.txt | cut -d, -f1-3
  echo
  echo "| threads | B | images/s | step time vs B = 128 |"
  echo "|---:|---:|---:|---:|"
  for threads in 1 2; do
    rate() { grep "| bn | project |" $here/bench-b$1-threads$threads.txt | cut -d'|' -f4 | tr -d ' ,'; }
    for b in 2 4 8 32 128; do
      awk -v t=$threads -v b=$b -v r=$(rate $b) -v base=$(rate 128) \
        'BEGIN { printf "| %d | %d | %d | %.2fx |\n", t, b, r, base / r }'
    done
  done
} > $here/results.md
cat $here/results.md
