#!/usr/bin/env bash
# Issue 37's grids on a lent GPU machine (device tool), in one command: study.py gn-groups,
# then bn-batch, each resuming what the CPU left, each setting's three seeds trained
# together, in the default runs' precision (bfloat16, study.py passes --amp). A time limit
# per study keeps the call within 600 s; whatever finished is kept. Writes to $OUT:
# machine.txt, gn-groups.log, bn-batch.log and studies.tar.gz (the runs' metrics, logs and
# tables: unpack it over results/ here, then run study.py --report-only for the figures).
#
# Needs, carried beside the working tree (ignored by .git/info/exclude), as for
# results/speed/seeds-gpu/run.sh:
#   .whl/torchsummary-1.5.1-py3-none-any.whl   pip download torchsummary==1.5.1
#   .data/cifar10-jpg.tar.gz                    tar -czf .data/cifar10-jpg.tar.gz \
#                                                   -C ../shared/data cifar10-jpg
# The call: run(command="bash results/studies/gpu/run.sh", carry=[".whl", ".data"],
#               timeout_s=600)
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
tar -xzf .data/cifar10-jpg.tar.gz -C /tmp/data
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; nproc; } > "$out/machine.txt" 2>&1
python3 -c "import sys, utils; utils.load_cifar10(sys.argv[1], sys.argv[2])" /tmp/data/cifar10-jpg /tmp/cache
for study in gn-groups bn-batch; do
  timeout 270 python3 study.py $study --data-dir /tmp/data/cifar10-jpg --cache-dir /tmp/cache \
      --images-dir /tmp/figures > "$out/$study.log" 2>&1
  echo "exit $?" >> "$out/$study.log"
done
tar -czf "$out/studies.tar.gz" --exclude='*.pt' --exclude='images' --exclude='.lock' results/studies
