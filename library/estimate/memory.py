"""Peak GPU memory and FLOPs of one training step, measured without weights or a GPU.

The model is built from its diffusers configs on the meta device (no weights read), its parameters are replaced by
fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and devices, no data), and one training
step runs as the loop (library/training/loop.py) runs it: VAE encode (unless latents are cached), text encoders
(unless their outputs are cached), UNet forward under autocast, MSE loss, backward, gradient clipping, optimizer step.
A dispatch mode (`LiveBytes`) records every storage an op creates and drops it when its Python object dies, so it
knows the live tensor bytes after every op and their peak. This is the memory the caching allocator hands out
(`torch.cuda.max_memory_allocated`); what the driver reports adds the CUDA context and allocator slack (the
allowance, library/estimate/gpus.py).

What is measured and what is modelled (see `Estimate.notes` for the run at hand):
- weights, gradients, activations, AdamW / SGD state and their peak are measured. The optimizer state is created
  before the measured step (one step on zero gradients), so the peak is that of a steady-state step, not the first.
- other optimizers' state is added analytically (`optimizer_state_bytes`): bitsandbytes 8-bit optimizers keep one byte
  per state element plus one fp32 absmax per 256-element block (blockwise quantisation, Dettmers et al. 2022,
  arXiv 2110.02861), and 32-bit state for tensors under 4096 elements (bitsandbytes `min_8bit_size`); Adafactor and
  CAME keep factored row/column second moments (Shazeer & Stern 2018; Luo et al. 2023) for tensors of 2+ dims;
  Prodigy keeps four full-size buffers (exp_avg, exp_avg_sq, s, p0; prodigyopt `Prodigy.step`).
- DeepSpeed ZeRO with CPU optimizer offload (single GPU) is modelled: trained weights and gradients live in the
  mixed-precision dtype on the GPU (measured so), the fp32 master weights, fp32 gradients and optimizer state go to CPU
  memory (`cpu_bytes`), and only gradient buckets of DeepSpeed's default `reduce_bucket_size` (5e8 elements) stay on
  the GPU; stage 3 with parameter offload also keeps only a prefetch bucket (`stage3_prefetch_bucket_size`, 5e7
  elements, x2 for the next one) of the trained weights on the GPU. Without offload, DeepSpeed on one GPU saves
  nothing: its fp32 master weights and fp32 optimizer state sit on the GPU beside the half-precision module.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from library.config.network import NetworkConfig
from library.models.families import Family
from library.precision import DTYPES, autocast_dtype

Method = Literal["full", "lora", "ti", "hn"]
Precision = Literal["no", "fp16", "bf16"]
DTypeName = Literal["fp32", "fp16", "bf16"]

# bitsandbytes: blockwise 8-bit state (blocksize 256, fp32 absmax per block) for tensors of >= 4096 elements.
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096
# DeepSpeed defaults (deepspeed/runtime/zero/config.py): reduce_bucket_size, stage3_prefetch_bucket_size (elements).
DS_REDUCE_BUCKET, DS_PREFETCH_BUCKET = 500_000_000, 50_000_000


@dataclass(frozen=True)
class EstimateSpec:
    """Everything that decides the memory and FLOPs of one training step; explicit, no config objects but
    `network` (the LoRA knobs are NetworkConfig's, so a `[network]` table maps one to one)."""

    family: Family
    config_dir: Path | None = None  # diffusers folder with unet/, vae/, text_encoder(_2)/ configs; None = bundled
    method: Method = "lora"
    network: NetworkConfig | None = None  # LoRA knobs; None = NetworkConfig() (rank 4, attn_mlp, UNet + TE)
    ti_vectors: int = 1  # TI: new embedding rows
    hn_layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)  # HN: A1111 layer_structure (multiples of the width)
    resolution: tuple[int, int] = (512, 512)  # (height, width) in pixels
    batch_size: int = 1
    mixed_precision: Precision = "fp16"
    weight_dtype: DTypeName | None = None  # frozen UNet / text encoders; None = as the loop (mixed precision dtype)
    full_bf16: bool = False  # trained weights (and so their grads and AdamW state) in bf16
    gradient_checkpointing: bool = False  # UNet only, as library/training/setup.py configure_unet
    train_text_encoder: bool = False  # full: also train the text encoder(s)
    optimizer: str = "AdamW"  # OptimizerConfig.optimizer_type
    cache_latents: bool = False  # latents read from a cache: the VAE is neither resident nor run
    cache_text_outputs: bool = False  # frozen text encoders' outputs cached: encoders not resident nor run
    deepspeed_stage: Literal[0, 1, 2, 3] = 0  # [train.deepspeed] zero_stage
    offload_optimizer: bool = False  # DeepSpeed offload_optimizer_device = cpu
    offload_params: bool = False  # DeepSpeed stage 3 offload_param_device = cpu
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step: FLOPs scale, memory does not

    def frozen_dtype(self) -> torch.dtype:
        if self.weight_dtype is not None:
            return DTYPES[self.weight_dtype]
        return autocast_dtype(self.mixed_precision)

    def trained_dtype(self) -> torch.dtype:
        if self.full_bf16:
            return torch.bfloat16
        if self.deepspeed_stage and self.mixed_precision != "no":  # DeepSpeed trains the module in half precision
            return DTYPES[self.mixed_precision]
        return torch.float32

    def trains_text_encoder(self) -> bool:
        match self.method:
            case "full":
                return self.train_text_encoder
            case "lora":
                return not (self.network or NetworkConfig()).train_unet_only
            case "ti":
                return True
            case "hn":
                return False
            case other:
                raise ValueError(f"unknown method {other!r}")


@dataclass
class Estimate:
    """Peak tensor memory of one steady-state training step on the GPU, its parts, and its FLOPs."""

    spec: EstimateSpec
    label: str
    peak: int  # bytes: highest live tensor bytes during the step
    weights: int  # bytes of resident weights and buffers (UNet, text encoders and VAE when resident)
    gradients: int  # bytes of the trained parameters' gradients
    optimizer_state: int  # bytes of optimizer state on the GPU
    trained_params: int  # number of trained parameters
    flops: int  # per optimizer step: forward, backward (+ recomputation with checkpointing) x accumulation
    cpu_bytes: int = 0  # host memory for offloaded master weights / gradients / optimizer state
    seconds: float = 0.0  # how long the estimate took
    notes: list[str] = field(default_factory=list)
    raw: Any = field(default=None, repr=False)  # the StepMeasure it came from (library/estimate/step.py)

    @property
    def activations(self) -> int:
        """Activations and temporaries at the peak: the peak less weights, gradients and optimizer state."""
        return max(0, self.peak - self.weights - self.gradients - self.optimizer_state)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages: each storage an op returns is added once and removed when its
    Python object is collected (torch keeps one Python object per live storage, so views share it).

    With `count_flops` on it also adds up each op's FLOPs from `formulas` (library/estimate/flops.py: torch's
    FlopCounterMode formulas plus CPU attention), in the same dispatch: a separate FlopCounterMode doubled the Python
    work per op and tracked every module call, which made it most of the estimate's time."""

    def __init__(self, formulas: dict[Any, Any] | None = None) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.formulas = formulas or {}
        self.count_flops = False
        self.flops = 0

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _METADATA_OPS:  # `.device` queries (most of the ops seen): no storage, no FLOPs
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        if self.count_flops and (formula := self.formulas.get(func._overloadpacket)) is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


_METADATA_OPS = frozenset({torch.ops.prim.device.default, torch.ops.prim.layout.default})


# ---------------------------------------------------------------------------------------------------------------
# Analytic optimizer state.


def optimizer_state_bytes(optimizer: str, shape: tuple[int, ...], dtype_bytes: int) -> int:
    """Bytes of optimizer state for one parameter of `shape` whose dtype has `dtype_bytes` bytes per element."""
    n = math.prod(shape)
    factored = len(shape) >= 2
    rows_cols = (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * 4 if factored else n * 4
    match optimizer:
        case "AdamW":
            return 2 * n * dtype_bytes  # exp_avg, exp_avg_sq in the parameter's dtype (torch.optim.AdamW)
        case "AdamW8bit" | "PagedAdamW8bit":
            return 2 * (n + math.ceil(n / BNB_BLOCK) * 4) if n >= BNB_MIN_8BIT else 2 * n * 4
        case "Lion8bit":
            return n + math.ceil(n / BNB_BLOCK) * 4 if n >= BNB_MIN_8BIT else n * 4
        case "Lion":
            return n * 4  # bitsandbytes 32-bit Lion: one fp32 momentum
        case "Adafactor":
            return rows_cols  # transformers Adafactor, beta1 = None (sd-scripts): no first moment
        case "CAME":
            # exp_avg (full) + exp_avg_sq and exp_avg_res, each factored into rows and columns for 2+ dims.
            return n * dtype_bytes + 2 * rows_cols if factored else n * dtype_bytes + n * 4
        case "Prodigy":
            return 4 * n * dtype_bytes
        case "SGD":
            return 0  # momentum = 0 (torch default) keeps no buffer
        case _:
            return 2 * n * dtype_bytes  # unknown optimizer: assume Adam-like (two moments), said in the notes




# ---------------------------------------------------------------------------------------------------------------
# From a measured step to an estimate.


def rederive(estimate: Estimate, spec: EstimateSpec, label: str) -> Estimate | None:
    """`spec`'s estimate from `estimate`'s measured step, without measuring again, when only the optimizer,
    DeepSpeed offload or gradient accumulation changed with the trained weights keeping their dtype (optimizer state
    is resident all step, so swapping it is exact), and/or latents or frozen text-encoder outputs became cached (the
    step less the encoders' phases and weights, step.StepMeasure.cached); None when the step must be measured
    again."""
    old = estimate.spec
    same_step = replace(old, optimizer=spec.optimizer, deepspeed_stage=spec.deepspeed_stage,
                        offload_optimizer=spec.offload_optimizer, offload_params=spec.offload_params,
                        gradient_accumulation_steps=spec.gradient_accumulation_steps,
                        cache_latents=spec.cache_latents, cache_text_outputs=spec.cache_text_outputs) == spec
    if not same_step or old.trained_dtype() != spec.trained_dtype() or estimate.raw is None:
        return None
    frozen_text = not spec.trains_text_encoder()
    drop_latents = spec.cache_latents and not old.cache_latents
    drop_text = frozen_text and spec.cache_text_outputs and not old.cache_text_outputs
    if (old.cache_latents and not spec.cache_latents) or (
            frozen_text and old.cache_text_outputs and not spec.cache_text_outputs):
        return None  # an encoder comes back: its phase was never measured
    raw = estimate.raw
    if drop_latents or drop_text:
        if raw.phases is None:
            return None
        raw = raw.cached(latents=drop_latents, text=drop_text)
    return finish(raw, spec, label, 0.0)


def finish(raw, spec: EstimateSpec, label: str, seconds: float) -> Estimate:
    """Add the optimizer state (measured, or analytic: see the module docstring) and DeepSpeed's placement."""
    notes: list[str] = []
    n_trained = sum(math.prod(shape) for shape, _ in raw.trained)
    offload = spec.deepspeed_stage > 0 and spec.offload_optimizer
    peak, forward_peak = raw.peak_without_state, raw.forward_peak_without_state
    weights, grads, cpu_bytes = raw.weights, raw.gradients, 0
    if offload:
        state = 0
        cpu_bytes = sum(8 * math.prod(s) + optimizer_state_bytes(spec.optimizer, s, 4) for s, _ in raw.trained)
        itemsize = spec.trained_dtype().itemsize
        on_gpu = min(grads, DS_REDUCE_BUCKET * itemsize)
        # Assumes all gradients are live at the peak (they are, at the end of backward): conservative otherwise.
        peak = max(forward_peak, peak - (grads - on_gpu))
        grads = on_gpu
        notes.append(f"DeepSpeed ZeRO-{spec.deepspeed_stage} optimizer offload: fp32 master weights and gradients and "
                     f"the optimizer state in CPU memory; the GPU keeps gradient buckets")
        if spec.deepspeed_stage == 3 and spec.offload_params:
            trained_w = n_trained * itemsize
            kept = min(trained_w, 2 * DS_PREFETCH_BUCKET * itemsize)
            weights -= trained_w - kept
            peak -= trained_w - kept
            cpu_bytes += trained_w
            notes.append("ZeRO-3 parameter offload: trained weights stream from CPU memory")
    elif spec.deepspeed_stage and spec.trained_dtype() != torch.float32:
        # DeepSpeed mixed precision: fp32 master weights and fp32 optimizer state beside the half-precision module.
        state = sum(4 * math.prod(s) + optimizer_state_bytes(spec.optimizer, s, 4) for s, _ in raw.trained)
        notes.append("DeepSpeed without offload on one GPU: fp32 master weights and optimizer state stay on the GPU")
    elif spec.optimizer == raw.optimizer:
        state = raw.measured_state
    else:
        state = sum(optimizer_state_bytes(spec.optimizer, s, size) for s, size in raw.trained)
        notes.append(f"{spec.optimizer} state computed analytically")
        if spec.optimizer not in KNOWN_STATE:
            notes.append(f"{spec.optimizer}: unknown optimizer, state assumed Adam-like (two moments)")
    if spec.method == "ti":
        notes.append("TI: the whole token embedding has a gradient and optimizer state (as sd-scripts trains it)")
    return Estimate(spec=spec, label=label, peak=peak + state, weights=weights, gradients=grads, optimizer_state=state,
                    trained_params=n_trained, flops=raw.flops * spec.gradient_accumulation_steps, cpu_bytes=cpu_bytes,
                    seconds=seconds, notes=notes,
                    raw=raw)


KNOWN_STATE = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion8bit", "Lion", "Adafactor", "CAME", "Prodigy", "SGD")
