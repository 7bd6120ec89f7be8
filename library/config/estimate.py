"""`[estimate]`: what `--dry-run` compares the step against (GPU table, utilisation, price) and its memory allowance.

Read by library/estimate/report.py `estimate_run`. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from library.config.fields import opt
from library.errors import ConfigError


@dataclass
class EstimateConfig:
    """`[estimate]`: GPUs, assumed utilisation and price for the `--dry-run` report."""

    gpus: list[str] = opt([], "GPU keys of library/estimate/gpus.toml to report, e.g. ['rtx3060', 'rtx4090']; [] = all")
    utilisation: float = opt(0.35, "assumed fraction of a card's peak dense FP16/BF16 TFLOPS a training step reaches")
    price_per_hour: float = opt(0.0, "price of one GPU hour (any currency) for the cost column; 0 = no cost column")
    context_gib: float = opt(0.5, "allowance for the CUDA context, cuBLAS/cuDNN workspaces (GiB)")
    fragmentation: float = opt(0.15, "allowance for the caching allocator, as a fraction of the peak tensor memory")

    def validate(self) -> None:
        if not 0 < self.utilisation <= 1:
            raise ConfigError(f"estimate.utilisation = {self.utilisation} must be in (0, 1], e.g. 0.35")
        if self.price_per_hour < 0 or self.context_gib < 0 or self.fragmentation < 0:
            raise ConfigError("estimate.price_per_hour, estimate.context_gib and estimate.fragmentation must be >= 0")
