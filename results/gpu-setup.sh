# Sourced by the GPU script (results/speed/seeds-gpu/run.sh) on
# a lent GPU machine: installs the carried torchsummary wheel, unpacks the carried data,
# writes $out/machine.txt and decodes the data into the cache once. Sets out and data.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out" /tmp/data
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
tar -xzf .data/cifar10-jpg.tar.gz -C /tmp/data
export PYTHONUNBUFFERED=1
data=(--data-dir /tmp/data/cifar10-jpg --cache-dir /tmp/cache)
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; nproc; } > "$out/machine.txt" 2>&1
python3 -c "import sys, utils; utils.load_cifar10(sys.argv[1], sys.argv[2])" /tmp/data/cifar10-jpg /tmp/cache
