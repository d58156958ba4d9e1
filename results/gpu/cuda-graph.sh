#!/usr/bin/env bash
# --cuda-graph on a CUDA machine, prepared before any GPU could run it:
#   0. decode the data set into the cache (timed apart, so no run pays for it);
#   1. the tests of the training step, the GPU-only ones included;
#   2. the full default run with --cuda-graph (the issue's target: under 60 s);
#   3. bench.py with --cuda-graph, and without (same machine, for the ratios);
#   4. the full default run eager, the same machine's baseline.
# Each step gets what is left of BUDGET seconds (default 540). Logs are written to
# OUT_DIR as they come; each run's folder is packed into OUT_DIR/<name>.tar.gz.
# Eight files in all (machine.txt, checks.txt, two logs, two archives, two benches):
# the device tool brings back no more.
#
#   usage: results/gpu/cuda-graph.sh DATA_DIR OUT_DIR
set -u
data=$1 out=$2
deadline=$((SECONDS + ${BUDGET:-540}))
source "$(dirname "$0")/lib.sh"  # left, checks, full_run; writes machine.txt

checks
full_run graph --cuda-graph
timeout "$(left)" python3 bench.py --device cuda --data-dir "$data" --batches 100 \
    --workers 0 --cuda-graph 2>&1 | tee "$out/bench-cuda-graph.txt"
timeout "$(left)" python3 bench.py --device cuda --data-dir "$data" --batches 100 \
    --workers 0 --no-cuda-graph 2>&1 | tee "$out/bench-cuda.txt"
full_run eager --no-cuda-graph
echo "seconds left of the budget: $(left)"
