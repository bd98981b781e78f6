# shellcheck shell=bash
# Sourced by the benchmark shell scripts (after they define `usage`): the options, checks and helpers they share.
#
#   parse_arguments "KNOWN PARTS" "DEFAULT PARTS" "$@"   sets RESULTS_DIR (--output_dir, default bench-out/ in the
#                                                       current directory) and PARTS; -h prints the usage
#   require_cuda                                        exits with a clear message when PyTorch sees no CUDA GPU
#   require_modules MODULE...                           exits naming the pip extra when a module is missing
#   open_output_dir                                     creates RESULTS_DIR and copies everything the script prints
#                                                       from then on to RESULTS_DIR/<script>.log
#   wants PART / finished PART                          PART was asked for / prints the seconds since the start
#   REFERENCES                                          a private temporary folder, removed on exit

# shellcheck disable=SC2034  # used by the scripts that source this file
BENCHMARKS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INSTALL_HINT="from the repository root: pip install -e \".[quantization,lora]\""

usage_error() {
    usage >&2
    echo "error: $1" >&2
    exit 2
}

parse_arguments() {
    local known=$1 defaults=$2
    shift 2
    RESULTS_DIR=bench-out
    PARTS=""
    while [[ $# -gt 0 ]]; do
        case $1 in
            -h | --help) usage; exit 0 ;;
            --output_dir)
                [[ $# -ge 2 && -n $2 ]] || usage_error "--output_dir needs a folder"
                RESULTS_DIR=$2
                shift 2
                ;;
            --output_dir=*) RESULTS_DIR=${1#*=}; shift ;;
            -*) usage_error "unknown option $1" ;;
            *)
                [[ -n $known ]] || usage_error "unexpected argument '$1'"
                [[ " $known " == *" $1 "* ]] || usage_error "unknown part '$1' (parts: $known)"
                PARTS+=" $1"
                shift
                ;;
        esac
    done
    PARTS=${PARTS# }
    PARTS=${PARTS:-$defaults}
}

require_modules() {
    python - "$INSTALL_HINT" "$@" <<'EOF' || exit 1
import importlib.util
import sys

hint, modules = sys.argv[1], sys.argv[2:]
missing = [module for module in modules if importlib.util.find_spec(module) is None]
if missing:
    sys.exit(f"error: {', '.join(missing)} not installed; install the package with its extras, {hint}")
EOF
}

require_cuda() {
    require_modules torch
    python - <<'EOF' || exit 1
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

if not torch.cuda.is_available():
    sys.exit(f"error: this script needs a CUDA GPU and PyTorch sees none (torch {torch.__version__}, "
             f"CUDA build: {torch.version.cuda or 'no, a CPU-only build'}): check `nvidia-smi` and install a CUDA "
             "build of torch, or run benchmarks/cpu_t2i.sh on a CPU")
libraries = []
for name in ("diffusers", "transformers", "torchao", "bitsandbytes", "peft"):
    try:
        libraries.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {', '.join(libraries)}")
EOF
}

open_output_dir() {
    local log
    mkdir -p -- "$RESULTS_DIR" 2>/dev/null ||
        usage_error "cannot create --output_dir $RESULTS_DIR: pass a writable folder"
    log="$RESULTS_DIR/$(basename "$0" .sh).log"
    exec > >(tee -a "$log") 2>&1
    echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $0 --output_dir $RESULTS_DIR $PARTS (output also in $log)"
}

wants() { [[ " $PARTS " == *" $1 "* ]]; }
finished() { echo "[$1 done at ${SECONDS} s]"; }

REFERENCES=$(mktemp -d)
trap 'rm -rf "$REFERENCES"' EXIT
