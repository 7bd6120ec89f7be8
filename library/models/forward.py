"""The denoiser call of one training batch, by family: the one place the loop learns what a family's model takes.

`predict` is what library/training/loop.py calls for every batch; `denoiser` is the module that holds the weights as
the loop sees it (wrapped for DDP / DeepSpeed, so it is passed in rather than read from `model`). A new family adds a
branch here and its conditioning in library/models/text.py; the loop itself does not change.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from library.models.model import SDModel
from library.models.text import TextCond, sdxl_time_ids


def predict(model: SDModel, denoiser: Callable, noisy: torch.Tensor, timesteps: torch.Tensor, cond: TextCond,
            batch: dict[str, Any]) -> torch.Tensor:
    """The model output for `noisy` at `timesteps` (epsilon / v / flow velocity, as the model was trained)."""
    match model.family:
        case "sd1" | "sd2":
            return denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden, return_dict=False)[0]
        case "sdxl":
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
            added = {"text_embeds": cond.pooled, "time_ids": time_ids.to(noisy.device, cond.hidden.dtype)}
            return denoiser(noisy, timesteps, encoder_hidden_states=cond.hidden, added_cond_kwargs=added,
                            return_dict=False)[0]
        case "sd3":
            from library.models.sd3.forward import predict_sd3

            return predict_sd3(model, denoiser, noisy, timesteps, cond, batch)
        case _:
            raise ValueError(f"no denoiser call for model family {model.family!r}")
