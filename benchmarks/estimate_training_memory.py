"""Peak memory per GPU of a text-to-image training step at any config, counted on fake tensors: no memory, no GPU.

    # full fine-tuning over 8 GPUs as examples/accelerate_configs/fsdp2.yaml runs it: FSDP2 (float32 masters, bf16
    # compute, float32 gradient reduction), activation checkpointing of every Qwen3 layer and head block, EMA
    python benchmarks/estimate_training_memory.py --config 14b-64x --height 1024 --width 1024 --num_gpus 8 --use_ema
    # LoRA rank 64 on a bitsandbytes nf4 base, bf16 compute, gradient checkpointing, one GPU
    python benchmarks/estimate_training_memory.py --config 14b-64x --lora_rank 64 --quantize nf4 \
        --gradient_checkpointing

The package's own training step runs (`T2ITrainingModule`: the teacher-forced language-model forward and the head's
flow loss over every block, on ``--batch`` images already encoded, as ``--cache_latents`` trains) under
`FakeTensorMode`, with torch's memory trackers: `FSDPMemTracker` over a fake process group of ``--num_gpus`` ranks
(``fully_shard`` of each decoder layer, each head block and the rest, as accelerate's FSDP2 plugin wraps them), or
`MemTracker` on one GPU. Both count every tensor by kind (parameters, gradients, optimizer states, activations,
temporaries, all-gather and reduce-scatter buffers) at the peak of the second step, rounded as the CUDA allocator
rounds. Not counted: cuBLAS / attention workspaces, NCCL buffers, allocator fragmentation, the tokenizer (its codes
are cached before training). The bitsandbytes nf4 layers are stood in for by `NF4Linear`: packed 4-bit weights and
one byte of double-quantized scale per 64 weights, each weight dequantized to the compute dtype inside its matmul,
forward and backward, as bitsandbytes' ``MatMul4Bit`` does.
"""

import argparse
import time
from functools import partial

import torch
import torch.distributed as dist
from bench_utils import T2I_CONFIGS, add_output_argument, append_rows, print_table, rows_path
from fake_generation import PROMPT
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.distributed.device_mesh import init_device_mesh

from bitdance_diffusers import BinaryFlowScheduler
from bitdance_diffusers.random_pipeline import build_random_pipeline
from bitdance_diffusers.training import T2IObjectiveConfig, add_trainable_lora
from bitdance_diffusers.training.randomness import sample_generators
from bitdance_diffusers.training.trainer import T2ITrainingModule, enable_gradient_checkpointing


GIB = 2**30


class _DequantizedMatmul(torch.autograd.Function):
    """``x @ dequantize(weight).T``, keeping only the packed weight for the backward (bitsandbytes' MatMul4Bit)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, out_features, in_features):
        ctx.save_for_backward(packed, absmax)
        ctx.shape = (out_features, in_features)
        return x @ torch.empty(ctx.shape, dtype=x.dtype, device=x.device).T  # the dequantized weight, a temporary

    @staticmethod
    def backward(ctx, grad_output):
        weight = torch.empty(ctx.shape, dtype=grad_output.dtype, device=grad_output.device)
        return grad_output @ weight, None, None, None, None


class NF4Linear(torch.nn.Linear):
    """The memory of a bitsandbytes ``Linear4bit`` (nf4, double quantization) computing in the input's dtype."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        numel = linear.weight.numel()
        self.weight = torch.nn.Parameter(torch.empty(numel // 2, dtype=torch.uint8), requires_grad=False)
        self.register_buffer("absmax", torch.empty(numel // 64, dtype=torch.uint8))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        out = _DequantizedMatmul.apply(x, self.weight, self.absmax, self.out_features, self.in_features)
        return out if self.bias is None else out + self.bias


def _device_only(args: tuple, kwargs: dict) -> bool:
    """Whether ``Module.to(*args, **kwargs)`` only moves (no dtype)."""
    return "dtype" not in kwargs and not any(isinstance(arg, (torch.dtype, torch.Tensor)) for arg in args)


def quantize_nf4_(model: torch.nn.Module):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, NF4Linear(child))


class GlobalPeakOnly:
    """Keeps the trackers' global peak only. torch's trackers also keep a peak per module, refreshed by a pass over every
    module on every operation: hours at 14B shapes, for figures this estimate does not read."""

    def _update_peak_stats(self, peak_state):
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                self._peak_mem[device] = snapshot[_TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)


class ShardedMemTracker(GlobalPeakOnly, FSDPMemTracker):
    """`FSDPMemTracker` with the global peak only."""


class FrozenWeightsMemTracker(GlobalPeakOnly, MemTracker):
    """torch's `MemTracker` (global peak only), which hooks the gradient of every parameter of a module it enters;
    frozen weights refuse hooks, so only the trained parameters get one."""

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        for parameter in module.parameters() if install_grad_hooks else ():
            if parameter.requires_grad and parameter not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[parameter] = (
                    parameter.register_hook(self._track_gradient),
                    parameter.register_post_accumulate_grad_hook(lambda trained: self._track_gradient(trained.grad)),
                )
        return memory

    def _track_gradient(self, gradient: torch.Tensor):
        self._update_and_maybe_create_winfos(gradient, _MemRefType.GRAD)


def checkpoint_layers_(module: torch.nn.Module):
    """Activation checkpointing as accelerate's FSDP plugin applies it: every decoder layer and head block wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    apply_activation_checkpointing(
        module, checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda layer: type(layer).__name__ in T2ITrainingModule._no_split_modules,
    )  # fmt: skip


def shard_(module: torch.nn.Module, mesh):
    """``fully_shard`` every checkpointed layer, then the root, as accelerate's FSDP2 plugin does (bf16 compute,
    float32 gradient reduction)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in [layer for layer in module.modules() if hasattr(layer, "_checkpoint_wrapped_module")]:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(T2I_CONFIGS), default="14b-64x")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="images per GPU and micro-step")
    parser.add_argument("--num_gpus", type=int, default=1, help="FSDP2 ranks (full fine-tuning)")
    parser.add_argument("--use_ema", action="store_true", help="full fine-tuning: a float32 EMA of the weights")
    parser.add_argument("--lora_rank", type=int, default=None, help="train LoRA adapters of this rank instead")
    parser.add_argument("--quantize", choices=["nf4"], default=None, help="LoRA: the frozen base in bitsandbytes nf4")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="LoRA: recompute the layers in the backward pass (full fine-tuning always checkpoints, as "
                             "the shipped FSDP config)")  # fmt: skip
    add_output_argument(parser)
    args = parser.parse_args()
    results_path = rows_path(parser, args, "estimate_training_memory")
    lora = args.lora_rank is not None
    if lora and args.num_gpus != 1:
        parser.error("LoRA trains data-parallel: estimate one GPU (--num_gpus 1).")

    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.num_gpus)
    mesh = init_device_mesh("cpu", (args.num_gpus,))  # (outside the fake mode: the mesh reads its ranks' values)
    BinaryFlowScheduler._init_step_index = lambda scheduler, timestep: setattr(scheduler, "_step_index", 0)
    model, block_size = T2I_CONFIGS[args.config]
    start = time.perf_counter()
    with FakeTensorMode():
        # Full fine-tuning keeps float32 masters (bf16 compute); LoRA trains float32 adapters on a bf16 base.
        pipe = build_random_pipeline(model, block_size=block_size, image_sizes=[[args.height, args.width]],
                                     dtype=torch.bfloat16 if lora else torch.float32)  # fmt: skip
        if lora:
            if args.quantize:
                for name in ("language_model", "diffusion_head"):
                    quantize_nf4_(getattr(pipe, name))
            # PEFT moves each new adapter to its base layer's device with `Module.to`, which cannot swap fake
            # parameters; everything is on the one fake device already, so moves are skipped while adapters are added.
            move = torch.nn.Module.to
            torch.nn.Module.to = lambda module, *args, **kwargs: module if _device_only(args, kwargs) else move(
                module, *args, **kwargs)  # fmt: skip
            add_trainable_lora(pipe, args.lora_rank)
            torch.nn.Module.to = move
            if args.gradient_checkpointing:
                enable_gradient_checkpointing(pipe)
        # The tokenizer stays out of the step: the codes are cached before training (--cache_latents).
        module = T2ITrainingModule(pipe, T2IObjectiveConfig(text_dropout=0.0)).train()  # every row keeps its prompt
        if not lora:
            checkpoint_layers_(module)
            shard_(module, mesh)
        parameters = [parameter for parameter in module.parameters() if parameter.requires_grad]
        # Per parameter under FSDP2: the foreach forms of AdamW and of the gradient clipping over DTensors, under fake
        # tensors, are counted with full-size temporaries (AdamW states 27x the shard, a whole fp32 gradient copy at
        # 14B) that a GPU does not hold; per parameter the states count exactly (foreach temporaries not counted).
        optimizer = torch.optim.AdamW(parameters, lr=1e-5, betas=(0.9, 0.95), eps=1e-15, foreach=lora)
        codes = torch.ones(args.batch, 32, args.height // 16, args.width // 16)
        batch = {"codes": codes, "caption": [PROMPT] * args.batch}

        tracker = FrozenWeightsMemTracker() if lora else ShardedMemTracker(mod=module, optm=optimizer)
        if lora:
            tracker.track_external(module, optimizer)
        ema = None
        with tracker:
            for step in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = module(batch, sample_generators(0, step, 0, args.batch, "cpu"))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0, foreach=lora)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if args.use_ema and not lora:
                    from diffusers.training_utils import EMAModel

                    ema = ema or EMAModel(parameters)
                    ema.step(parameters)
                if step == 0:
                    tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    seconds = time.perf_counter() - start

    (device, counts), = peak.items()
    rows = [[kind.value, f"{count / GIB:.2f}"] for kind, count in counts.items() if kind != "Total" and count]
    rows.append(["peak", f"{counts['Total'] / GIB:.2f}"])
    setting = (f"LoRA rank {args.lora_rank} on a {args.quantize or 'bf16'} base"
               f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, one GPU" if lora else
               f"full fine-tuning, FSDP2 over {args.num_gpus} GPUs, activation checkpointing"
               f"{', EMA' if args.use_ema else ''}")  # fmt: skip
    print_table(f"{args.config} {args.height}x{args.width} batch {args.batch} per GPU, {setting}: peak of a training "
                f"step per GPU, counted on fake tensors in {seconds:.0f} s", ["memory", "GiB"], rows)  # fmt: skip
    print(f"peak {counts['Total'] / GIB:.2f} GiB = {counts['Total'] / 1e9:.2f} GB per GPU")
    row = dict(estimate="fake tensors, training step", config=args.config, height=args.height, width=args.width,
               batch=args.batch, num_gpus=args.num_gpus, use_ema=args.use_ema, lora_rank=args.lora_rank,
               quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing or not lora,
               peak_gib=counts["Total"] / GIB,
               by_kind_gib={kind.value: count / GIB for kind, count in counts.items() if kind != "Total"})  # fmt: skip
    append_rows(results_path, [row], torch.device("cpu"))


if __name__ == "__main__":
    main()
