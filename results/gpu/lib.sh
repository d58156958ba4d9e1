# Shared by the GPU scripts here: source it after setting data, out and deadline.
export PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/gpu-runs

left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }  # timeout 0 would mean none

full_run() {  # full_run NAME [train.py options]
    local name=$1; shift
    timeout "$(left)" python3 train.py --device cuda --data-dir "$data" \
        --out-dir "/tmp/gpu-runs/$name" "$@" 2>&1 | tee "$out/train-$name.log"
    tar czf "$out/$name.tar.gz" --exclude=checkpoint.pt -C /tmp/gpu-runs "$name"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } 2>&1 | tee "$out/machine.txt"
