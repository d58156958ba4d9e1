#!/usr/bin/env bash
# Two versions of the code, the same full run (--cuda-graph) on the same warm machine:
#   0. decode the data set into the cache; the GPU tests of this tree, which also
#      warm the machine (libraries read, cuDNN loaded) before anything is timed;
#   1. the full default run with --cuda-graph, this tree;
#   2. the same, the code in BASE_DIR (e.g. `git archive` of the previous commit);
#   3. bench.py --cuda-graph, this tree, in what time is left.
# Each step gets what is left of BUDGET seconds (default 230).
#
#   usage: results/gpu/compare.sh DATA_DIR OUT_DIR BASE_DIR
set -u
data=$1 out=$2 base=$3
deadline=$((SECONDS + ${BUDGET:-230}))
source "$(dirname "$0")/lib.sh"  # left, checks, full_run; writes machine.txt

checks
full_run graph --cuda-graph
(cd "$base" && full_run base-graph --cuda-graph)
timeout "$(left)" python3 bench.py --device cuda --data-dir "$data" --batches 100 \
    --workers 8 --cuda-graph 2>&1 | tee "$out/bench-cuda-graph.txt"
echo "seconds left of the budget: $(left)"
