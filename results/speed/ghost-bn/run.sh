#!/bin/bash
# The training step of BN with ghost batches (train.py --bn-batch B) against plain BN
# (B = the batch of 128), on 2 threads and on 1 (as study.py trains on a CPU): bench.py's
# bn-batch-B rows against its project row, train.py's step, timed in the same rounds of one
# process. This CPU's speed drifts from minute to minute (one process per B, as in commit
# a275e97, read B = 4 at 1.16x there and at 1.36x in a rerun), so bench.py runs 3 times and
# the table takes the medians. The first rounds of each B also compile its kernels.
# Run from the repository root.
set -euo pipefail
here=results/speed/ghost-bn
for run in 1 2 3; do
  for threads in 2 1; do
    python bench.py --norm bn --bn-batches 2 4 8 32 --workers 0 --at-once 1 \
      --eval-batch-sizes 1000 --batches 30 --rounds 5 --threads $threads \
      --data-dir ../shared/data/cifar10-jpg > $here/bench-threads$threads-run$run.txt 2>&1
  done
done
# results.md, the table docs/norm-studies.md shows.
python - $here > $here/results.md <<'PY'
import re, statistics, sys
from pathlib import Path
here = Path(sys.argv[1])

def rows(threads, run):  # {pipeline: (images/s, time vs project)} of one bench.py output
    text = (here / f"bench-threads{threads}-run{run}.txt").read_text()
    return {name: (float(rate.replace(",", "")), float(ratio)) for name, rate, ratio in
            re.findall(r"\| bn \| (\S+) \| ([\d,]+) \| [\d.]+ \| ([\d.]+) \|", text)}

benches = {threads: [rows(threads, run) for run in (1, 2, 3)] for threads in (1, 2)}

def median(threads, row, column):  # over the 3 runs; columns: images/s, time vs project
    return statistics.median(bench[row][column] for bench in benches[threads])

header = (here / "bench-threads1-run1.txt").read_text().splitlines()[0]
# The device and torch, not the thread count: the processor's name may hold commas.
print(re.match(r"device .*?, torch [^,]+", header)[0] + "\n")
print("| threads | B | images/s | step time vs B = 128 |\n|---:|---:|---:|---:|")
for threads in (1, 2):
    for b in (2, 4, 8, 32, 128):
        row = "project" if b == 128 else f"bn-batch-{b}"
        print(f"| {threads} | {b} | {median(threads, row, 0):,.0f} "
              f"| {median(threads, row, 1):.2f}x |")
print("\nMedians of 3 runs of bench.py, each the best of 5 interleaved rounds of 30 batches.")
PY
cat $here/results.md
