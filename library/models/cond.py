"""The text conditioning a denoiser is called with: its own module so the family encoders (library/models/text.py,
library/models/sd3/text.py) share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCond:
    hidden: torch.Tensor  # [B, 77, C]: the UNet's cross-attention context (SD3: [B, 77 + T5 tokens, 4096])
    pooled: torch.Tensor | None  # [B, P]: SDXL's / SD3's pooled text embedding; None for SD1/SD2

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextCond":
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextCond(self.hidden.to(device=device, dtype=dtype), pooled)
