# Shared by the GPU scripts here: source it after setting data, out and deadline.
export PYTHONUNBUFFERED=1
mkdir -p "$out" /tmp/gpu-runs

left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }  # timeout 0 would mean none

checks() {  # decode the data set into the cache, timed apart so no run pays for it; import
            # pyplot once (a fresh machine builds its font cache); the training step's tests,
            # the GPU-only ones included. All into checks.txt.
    python3 -c "import sys, time, utils, matplotlib.pyplot; start = time.perf_counter()
utils.load_cifar10(sys.argv[1], utils.default_cache_dir(), download=False)
print(f'cache built in {time.perf_counter() - start:.1f} s')" "$data" 2>&1 | tee "$out/checks.txt"
    timeout "$(left)" python3 -m pytest -q -rs tests -k "cuda_graph or easy_task" 2>&1 |
        tail -n 15 | tee -a "$out/checks.txt"
}

full_run() {  # full_run NAME [train.py options]
    local name=$1; shift
    timeout "$(left)" python3 train.py --device cuda --data-dir "$data" \
        --out-dir "/tmp/gpu-runs/$name" "$@" 2>&1 | tee "$out/train-$name.log"
    tar czf "$out/$name.tar.gz" --exclude=checkpoint.pt -C /tmp/gpu-runs "$name"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; } 2>&1 | tee "$out/machine.txt"
