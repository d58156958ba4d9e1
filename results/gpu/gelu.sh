#!/usr/bin/env bash
# The GPU figures of the GELU recipe (LN and GN with GELU), for the issue's target card:
#   0. decode the data set into the cache (timed apart, so no run pays for it); the GPU
#      tests of the training step and of bench.py --cuda-graph;
#   1. the full default run with --cuda-graph (the target: under 60 s on one H100);
#   2. bench.py --cuda-graph (its limit rows are eager steps, as ever);
#   3. the full run again, on the now warm machine, for the spread between two runs.
# Each step gets what is left of BUDGET seconds (default 420). Seven files in all.
#
#   usage: results/gpu/gelu.sh DATA_DIR OUT_DIR
set -u
data=$1 out=$2
deadline=$((SECONDS + ${BUDGET:-420}))
source "$(dirname "$0")/lib.sh"  # left, checks, full_run; writes machine.txt

checks
full_run graph --cuda-graph
timeout "$(left)" python3 bench.py --device cuda --data-dir "$data" --batches 100 \
    --workers 0 8 --cuda-graph 2>&1 | tee "$out/bench-cuda-graph.txt"
full_run graph-2 --cuda-graph
echo "seconds left of the budget: $(left)"
