"""The GPU table (library/estimate/gpus.toml, numbers cited there) and what fits on a card.

A card's memory must hold the step's peak tensor bytes (library/estimate/memory.py) plus an allowance:
- the CUDA context: driver state, kernel images, cuBLAS / cuDNN handles; PyTorch counts none of it in
  `memory_allocated` and it shows in nvidia-smi. Measured sizes: 287 MB for a one-tensor program with lazy module
  loading (PyTorch's default since 1.13 / CUDA 11.7) against 667 MB with eager loading (pytorch/pytorch PR #86509);
  "around 400MB if CUDA >= 11.7 is used and lazy module loading enabled" (ptrblck, pytorch/pytorch issue #109888).
  A training step loads more kernels (convolutions, attention, the optimizer), so CONTEXT_GIB = 0.5 is an assumed
  typical value above those measurements, not a measurement of ours;
- the caching allocator: memory it reserved but has not handed out (block rounding, 2 MiB / 20 MiB segments, and
  fragmentation between differently sized blocks; PyTorch notes "CUDA semantics: memory management"). Reported
  reserved/allocated overheads range from ~10% to 50-90% for workloads whose tensor sizes vary step to step
  (pytorch/pytorch issue #137151: 1.75 GiB active vs 2.67-2.88 GiB reserved; meta-pytorch/torchtune issue #1185:
  16.4 GiB reserved vs 10.8 GiB with `expandable_segments`). A diffusion step at one bucket size repeats the same
  sizes, so FRAGMENTATION = 0.15 of the tensor peak is an assumption at the low end of that range; with many bucket
  sizes it can be more (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces it).
Both are settable (`[estimate]` context_gib, fragmentation). Not modelled at all: cuDNN convolution workspaces
(allocated from the caching allocator per call, sized by cuDNN's algorithm choice; they can be large, pytorch/pytorch
issue #49207), cuBLAS workspaces (a few MiB per handle and stream), and memory other processes (a desktop) hold on
the same card.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (requirements.txt)
    import tomli as tomllib

GPUS_FILE = Path(__file__).resolve().parent / "gpus.toml"
CONTEXT_GIB = 0.5
FRAGMENTATION = 0.15
GIB = 2**30
# Not yet calibrated on a GPU: for SD1.5 LoRA at 512 px, batch 1, fp16 this estimate needs 4.5 GiB where users
# report 6-8 GB in nvidia-smi (which also counts cuDNN workspaces taken from free memory, cached blocks and other
# programs' memory). The report therefore marks a fit with less than this much to spare as tight.
TIGHT_MARGIN_GIB = 1.5


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_gib: float
    tensor_tflops: float  # dense FP16/BF16, FP32 accumulate
    fp32_tflops: float
    source: str

    def peak_tflops(self, mixed_precision: str) -> float:
        """Peak throughput for the step's matmuls: tensor cores with fp16/bf16 autocast, FP32 units otherwise."""
        match mixed_precision:
            case "fp16" | "bf16":
                return self.tensor_tflops
            case "no":
                return self.fp32_tflops
            case other:
                raise ValueError(f"unknown mixed precision {other!r}")


def load_gpus(path: Path = GPUS_FILE, keys: list[str] | None = None) -> list[GPU]:
    """The cards of `path` (all, or those named in `keys`, in that order); a KeyError names an unknown key."""
    table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    gpus = {k: GPU(key=k, **v) for k, v in table.items()}
    if not keys:
        return list(gpus.values())
    unknown = [k for k in keys if k not in gpus]
    if unknown:
        raise KeyError(f"unknown GPU {', '.join(unknown)}; known: {', '.join(gpus)}")
    return [gpus[k] for k in keys]


def allowance_bytes(peak: int, context_gib: float = CONTEXT_GIB, fragmentation: float = FRAGMENTATION) -> int:
    """CUDA context plus caching-allocator overhead on top of a tensor peak of `peak` bytes."""
    return int(context_gib * GIB + fragmentation * peak)


def needed_bytes(peak: int, context_gib: float = CONTEXT_GIB, fragmentation: float = FRAGMENTATION) -> int:
    """What the card must have: the tensor peak plus the allowance."""
    return peak + allowance_bytes(peak, context_gib, fragmentation)


def fits(peak: int, gpu: GPU, context_gib: float = CONTEXT_GIB, fragmentation: float = FRAGMENTATION) -> bool:
    return needed_bytes(peak, context_gib, fragmentation) <= gpu.memory_gib * GIB


def tight(peak: int, gpu: GPU, context_gib: float = CONTEXT_GIB, fragmentation: float = FRAGMENTATION) -> bool:
    """It fits, with less than TIGHT_MARGIN_GIB to spare."""
    return needed_bytes(peak, context_gib, fragmentation) > (gpu.memory_gib - TIGHT_MARGIN_GIB) * GIB
