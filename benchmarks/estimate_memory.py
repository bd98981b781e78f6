"""Peak memory of a text-to-image generation at any config, computed on fake tensors: no memory, no compute, no GPU.

    python benchmarks/estimate_memory.py --config 14b-64x --height 1024 --width 1024 --quantize int8wo

The pipeline runs under `FakeTensorMode` (tensors carry shapes and dtypes only) while a dispatch mode counts the bytes
of every live tensor storage created after the weights: the KV cache, activations, noise, the decoder's feature maps.
The table gives that peak per phase (prompt prefill; the block loop from the first head call: head, projector,
language model; decode) and, added to the weight bytes, the whole peak a GPU run would allocate apart from
cuBLAS/attention workspaces and CUDA graph pools. Every tensor is counted as if on the device, also the host-side
temporaries a GPU run keeps in CPU memory (the float64 sin-cos table behind most of the prefill figure). Weight bytes
of a quantization scheme are counted from the shapes (int8 / float8: one byte per linear weight plus a bf16 scale per
row; nf4: half a byte plus one byte of double-quantized absmax per 64 weights).

The number of head steps does not change the memory and defaults to 2 (set-up: `fake_generation.py`).
"""

import argparse
import time

import torch
from bench_utils import add_output_argument, append_rows, print_table, rows_path
from fake_generation import add_fake_generation_arguments, build_fake_pipeline, generate
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bitdance_diffusers.quantization import QUANTIZATION_SCHEMES


GIB = 2**30


class LiveStorageCounter(TorchDispatchMode):
    """Counts the bytes of tensor storages created under it that are still alive; keeps the peak per phase.

    Storages of ``existing`` tensors (the weights) are never counted, also when an op returns a view of them.
    """

    def __init__(self, existing: list[torch.Tensor], phase: str = "prefill"):
        super().__init__()
        self.existing = {tensor.untyped_storage()._cdata for tensor in existing}
        self.live = {}  # storage key -> (weak reference, bytes)
        self.live_bytes = 0
        self.phase = phase
        self.peaks = {}

    def _sweep(self):
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.live and key not in self.existing:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live_bytes += storage.nbytes()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.live_bytes)
        return out


def weight_bytes(module: torch.nn.Module, scheme: str | None) -> int:
    """Bytes of ``module``'s weights with its linear layers stored under ``scheme`` (None: as they are)."""
    total = 0
    for layer in module.modules():
        for name, parameter in layer.named_parameters(recurse=False):
            if scheme is None or not (isinstance(layer, torch.nn.Linear) and name == "weight"):
                total += parameter.numel() * parameter.element_size()
            elif scheme == "nf4":
                total += parameter.numel() // 2 + parameter.numel() // 64
            else:
                total += parameter.numel() + 2 * parameter.shape[0]
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fake_generation_arguments(parser)
    parser.add_argument("--steps", type=int, default=2, help="head steps (the memory does not depend on them)")
    parser.add_argument("--quantize", choices=QUANTIZATION_SCHEMES, default=None,
                        help="count the language model's and head's linear weights as stored by this scheme")  # fmt: skip
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "estimate_memory")

    start = time.perf_counter()
    with FakeTensorMode():
        pipe, existing = build_fake_pipeline(args)
        pipe.vae.enable_slicing()
        counter = LiveStorageCounter(existing)
        weights = {
            "language model": weight_bytes(pipe.language_model, args.quantize),
            "diffusion head": weight_bytes(pipe.diffusion_head, args.quantize),
            "projector": weight_bytes(pipe.projector, None),
            "autoencoder": weight_bytes(pipe.vae, None),
        }

        def enter(phase):
            return lambda *_: setattr(counter, "phase", phase)

        pipe.diffusion_head.register_forward_pre_hook(enter("block loop"))
        pipe.vae.decoder.register_forward_pre_hook(enter("decode"))
        with counter:
            generate(pipe, args, args.steps, output_type="pt")

    weight_total = sum(weights.values())
    peak = max(counter.peaks.values())
    rows = [[f"weights: {name}", f"{size / GIB:.2f}", ""] for name, size in weights.items()]
    rows += [[f"peak beyond weights: {phase}", f"{size / GIB:.2f}", f"{(weight_total + size) / GIB:.2f}"]
             for phase, size in counter.peaks.items()]  # fmt: skip
    rows.append(["whole run", f"{peak / GIB:.2f}", f"{(weight_total + peak) / GIB:.2f}"])
    print_table(
        f"{args.config} {args.height}x{args.width} batch={args.batch} cfg={args.guidance} {args.dtype}"
        f"{' ' + args.quantize if args.quantize else ''}: estimated on fake tensors in {time.perf_counter() - start:.0f} s",
        ["part", "GiB", "with weights GiB"],
        rows,
    )
    print(f"weights {weight_total / GIB:.2f} GiB; peak {(weight_total + peak) / GIB:.2f} GiB = "
          f"{(weight_total + peak) / 1e9:.2f} GB")  # fmt: skip
    row = dict(estimate="fake tensors", config=args.config, height=args.height, width=args.width, batch=args.batch,
               guidance=args.guidance, dtype=args.dtype, quantize=args.quantize, weights_gib=weight_total / GIB,
               beyond_weights_gib={phase: size / GIB for phase, size in counter.peaks.items()},
               peak_gib=(weight_total + peak) / GIB)  # fmt: skip
    append_rows(results_path, [row], torch.device("cpu"))


if __name__ == "__main__":
    main()
