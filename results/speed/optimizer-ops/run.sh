#!/usr/bin/env bash
# ops.txt: count.py at the commit before the optimizer worked on all weights at once
# (03972f8), and now, with orthogonalize batched as on the CPU and as on CUDA.
# From the repository root: bash results/speed/optimizer-ops/run.sh
set -euo pipefail
here=results/speed/optimizer-ops
before=$(mktemp -d)
git worktree add -q --detach "$before" 03972f8
{
  echo "== 03972f8: a weight at a time"
  (cd "$before" && PYTHONPATH=. python "$OLDPWD/$here/count.py")
  echo "== now, a batch per shape (the CPU)"
  PYTHONPATH=. python $here/count.py
  echo "== now, one padded batch (CUDA)"
  PYTHONPATH=. python $here/count.py --one-batch
} > $here/ops.txt
git worktree remove --force "$before"
cat $here/ops.txt
