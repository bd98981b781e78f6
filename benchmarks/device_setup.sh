# Sourced by the gpu_*.sh scripts on a lent device machine: installs the carried wheels of
# benchmarks/fetch_device_wheels.sh (.whl/), puts them and the package on the path, prints the GPU, and defines
# `quiet` (drops the libraries' warnings from a benchmark's output), `wants PART` (PART is among the script's
# arguments, in $PARTS) and `finished PART` (prints the seconds since the script started).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
quiet() { grep -v -i -E "warn|Failed to load|torchao. Tensor"; }
wants() { [[ " $PARTS " == *" $1 "* ]]; }
finished() { echo "[$1 done at ${SECONDS} s]"; }
