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
source results/gpu-setup.sh
for study in gn-groups bn-batch; do
  timeout 270 python3 study.py $study "${data[@]}" --images-dir /tmp/figures > "$out/$study.log" 2>&1
  echo "exit $?" >> "$out/$study.log"
done
tar -czf "$out/studies.tar.gz" --exclude='*.pt' --exclude='images' --exclude='.lock' results/studies
