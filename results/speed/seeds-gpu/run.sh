#!/usr/bin/env bash
# Issue 31's GPU measurements, in one command on a lent GPU machine (device tool), warm cache:
# `--seeds 0 1 2` and the plain run (targets: under 60 s and 25 s on an H200), then bench.py
# with its at-once rows, then the tests that use CUDA; last, issue 37's cost of ghost batches
# on a GPU (train.py --bn-batch B: two torch.compile'd functions per BN layer, Triton kernels
# there, compiled on first use within the step's limit). Each step has
# a time limit, so that the later ones still run if one is slow. Writes 8 files to $OUT:
# machine.txt, seeds.log, train.log, runs.tar.gz, bench.txt, bench-amp.txt, pytest.txt,
# bench-ghost-bn.txt.
#
# Needs, carried beside the working tree (both ignored by .git/info/exclude):
#   .whl/torchsummary-1.5.1-py3-none-any.whl   pip download torchsummary==1.5.1 (the GPU
#                                               machine's Python lacks it)
#   .data/cifar10-jpg.tar.gz                    tar -czf .data/cifar10-jpg.tar.gz \
#                                                   -C ../shared/data cifar10-jpg  (20 MB)
# The call: run(command="bash results/speed/seeds-gpu/run.sh", carry=[".whl", ".data"],
#               timeout_s=600)
# The cache is decoded once there: both timed runs start from it, as a user's second run does.
source results/gpu-setup.sh

timed() {  # timed LOG LIMIT COMMAND...: wall seconds into LOG's last line
  local log=$1 limit=$2; shift 2
  local start=$(date +%s.%N)
  timeout "$limit" "$@" > "$out/$log" 2>&1
  echo "exit $?, wall $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)") s" >> "$out/$log"
}
timed seeds.log 200 python3 train.py --seeds 0 1 2 "${data[@]}" --out-dir /tmp/seeds
timed train.log 100 python3 train.py "${data[@]}" --out-dir /tmp/plain
# The runs' records (metrics.json, results.md, seeds.md), figures and weights left out.
tar -czf "$out/runs.tar.gz" -C /tmp --exclude='*.pt' --exclude='*.png' --exclude='.lock' seeds plain
timed bench.txt 75 python3 bench.py "${data[@]}" --at-once 3 9 --rounds 2 --workers 0 \
    --eval-batch-sizes 1000
# Nine runs at once may be bound by arithmetic rather than launches: bfloat16 there too.
timed bench-amp.txt 45 python3 bench.py "${data[@]}" --amp --at-once 9 --rounds 2 --workers 0 \
    --eval-batch-sizes 1000
# The tests that differ on a GPU (CI runs them all on a CPU), ghost batches' among them.
timed pytest.txt 90 python3 -m pytest -q tests -k "cuda or graph or together or bench or statistics_batch"
timed bench-ghost-bn.txt 60 python3 bench.py "${data[@]}" --norm bn --bn-batches 2 4 8 32 \
    --at-once 1 --rounds 2 --workers 0 --eval-batch-sizes 1000
tail -n 3 "$out"/*.log "$out"/*.txt
