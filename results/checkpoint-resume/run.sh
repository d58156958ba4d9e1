#!/bin/bash
# A real-data BN run of 2 epochs stopped by SIGTERM after its first epoch and resumed,
# against the same run uninterrupted: the checkpoint format of weights_only loading
# (issue 36) must resume bit for bit. Run from the repository root; writes into
# results/checkpoint-resume/ (the runs themselves go to /tmp).
set -euo pipefail
here=results/checkpoint-resume
common=(--norm bn --epochs 2 --data-dir ../shared/data/cifar10-jpg --threads 2)
rm -rf /tmp/resume-check
python train.py "${common[@]}" --out-dir /tmp/resume-check/whole > $here/whole.log 2>&1
python train.py "${common[@]}" --out-dir /tmp/resume-check/parts > $here/parts.log 2>&1 &
pid=$!
while [ ! -f /tmp/resume-check/parts/bn/checkpoint.pt ]; do sleep 0.5; done
kill -TERM $pid
wait $pid || echo "exit code $? after SIGTERM" >> $here/parts.log
python train.py "${common[@]}" --out-dir /tmp/resume-check/parts --resume >> $here/parts.log 2>&1
{
  (cd /tmp/resume-check && sha256sum whole/bn/model.pt parts/bn/model.pt)
  python - <<'PY'
import json
whole, parts = (json.load(open(f"/tmp/resume-check/{r}/bn/metrics.json")) for r in ("whole", "parts"))
same = {k: whole[k] == parts[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc", "train_eval_acc")}
print("metrics equal:", same, "| resumed:", parts.get("resumed"), "| processor:", whole["processor"])
PY
} > $here/result.txt
cat $here/result.txt
