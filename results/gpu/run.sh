#!/usr/bin/env bash
# The GPU figures of the README, in one go on a CUDA machine:
#   1. the full default run (3 variants x 20 epochs), eager, float32;
#   2. bench.py, the three pipelines side by side;
#   3. the full default run again with --amp --compile.
# Each step gets what is left of BUDGET seconds (default 540), so a slow step
# cannot take the others' time. Logs are written to OUT_DIR as they come;
# each run's folder is packed into OUT_DIR/<name>.tar.gz when it ends.
#
#   usage: results/gpu/run.sh DATA_DIR OUT_DIR
set -u
data=$1 out=$2
deadline=$((SECONDS + ${BUDGET:-540}))
source "$(dirname "$0")/lib.sh"  # left, full_run; writes machine.txt

full_run eager --no-cuda-graph  # eager was the default then
timeout "$(left)" python3 bench.py --device cuda --data-dir "$data" --batches 100 \
    --workers 0 4 8 --no-cuda-graph 2>&1 | tee "$out/bench-cuda.txt"
full_run amp-compile --amp --compile
echo "seconds left of the budget: $(left)"
