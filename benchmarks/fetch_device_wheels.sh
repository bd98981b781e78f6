#!/usr/bin/env bash
# Wheels the GPU scripts install on a lent device machine (its image has torch and transformers but neither diffusers,
# torchao nor bitsandbytes), saved to .whl/ (git-ignored; carry it). bitsandbytes ships kernels for every CUDA
# version (129 MB); only its CPU and CUDA 13 libraries are kept (the device's torch is built for CUDA 13), so that
# the wheels and the working tree stay under the device's 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$@"
}
download diffusers==0.42.1 transformers==5.24.0 torchao==0.17.0 importlib_metadata==10.2.0 bitsandbytes==0.50.2 \
    peft==0.21.2
wheel=$(ls .whl/bitsandbytes-*.whl)
zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' \
    'bitsandbytes/libbitsandbytes_xpu*.so' || true
du -ch .whl/*.whl | tail -1
