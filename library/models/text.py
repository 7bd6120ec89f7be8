"""Text conditioning and the UNet call, the same way for training and sampling.

Each family conditions as its diffusers pipeline does (checked exactly against `encode_prompt` in
tests/test_text.py): SD1/SD2 as `StableDiffusionPipeline.encode_prompt`, SDXL as
`StableDiffusionXLPipeline.encode_prompt` (diffusers 0.42).
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.models.cond import TextCond
from library.models.model import SDModel


def tokenize(model: SDModel, captions: list[str]) -> list[torch.Tensor]:
    """One [B, 77] LongTensor per tokenizer: <|startoftext|> caption <|endoftext|>, truncated to 77 tokens and
    padded with the tokenizer's pad token (SD1 / SDXL-1: <|endoftext|>; SD2 / SDXL-2: "!"), as the pipelines do."""
    if model.family == "sd3":
        from library.models.sd3.text import tokenize_sd3

        return tokenize_sd3(model, captions)
    out = []
    for tokenizer in model.tokenizers:
        ids = tokenizer(
            list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(ids)
    return out


def encode_text(model: SDModel, token_ids: list[torch.Tensor], clip_skip: int = 1) -> TextCond:
    """Text-encoder outputs the UNet is conditioned on; `clip_skip` counts layers from the end (1 = last).

    SD1 / SD2: the last hidden state (after the final LayerNorm). With clip_skip = k >= 2, the hidden state k - 1
    layers earlier, passed through the final LayerNorm (A1111's "CLIP skip", sd-scripts' --clip_skip; diffusers'
    `clip_skip=k-1`). SD2's 23-layer encoder already ends at OpenCLIP ViT-H's penultimate layer, as SD2 was trained.
    SDXL: both encoders' penultimate hidden states (no final LayerNorm) concatenated on the channel axis, and the
    pooled, projected output of the second encoder; clip_skip = k takes hidden_states[-(k + 1)] (diffusers'
    `clip_skip=k-1`).
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (got {clip_skip})")
    if len(token_ids) != len(model.text_encoders):
        raise ValueError(f"{len(token_ids)} token tensors for {len(model.text_encoders)} text encoders")
    match model.family:
        case "sd3":
            from library.models.sd3.text import encode_text_sd3

            return encode_text_sd3(model, token_ids, clip_skip)
        case "sd1" | "sd2":
            (te,), (ids,) = model.text_encoders, token_ids
            ids = ids.to(te.device)
            if clip_skip == 1:
                return TextCond(te(ids)[0], None)
            hidden = te(ids, output_hidden_states=True).hidden_states[-clip_skip]
            return TextCond(_final_layer_norm(te)(hidden), None)
        case "sdxl":
            hiddens, pooled = [], None
            for te, ids in zip(model.text_encoders, token_ids):
                out = te(ids.to(te.device), output_hidden_states=True)
                hiddens.append(out.hidden_states[-(clip_skip + 1)])
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds [B, P]
                    pooled = out[0]
            if pooled is None:
                raise ValueError("SDXL needs a CLIPTextModelWithProjection as its second text encoder")
            return TextCond(torch.cat(hiddens, dim=-1), pooled)
        case _:
            raise ValueError(f"unknown family {model.family!r}")


def sdxl_time_ids(
    original_sizes: Sequence[tuple[int, int]],
    crop_top_lefts: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """SDXL's size conditioning, [B, 6] float32 rows (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Order as SDXL was trained (Podell et al., arXiv 2307.01952, sec. 2.2; diffusers `_get_add_time_ids`): each pair
    is (height, width) / (top, left).
    """
    if not len(original_sizes) == len(crop_top_lefts) == len(target_sizes):
        raise ValueError("original_sizes, crop_top_lefts and target_sizes must have the same length")
    rows = [[*o, *c, *t] for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 6)


def unet_forward(
    model: SDModel,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: TextCond,
    time_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's prediction for `noisy_latents` at `timesteps`; SDXL also needs `time_ids` (see sdxl_time_ids).

    Conditioning is cast to the UNet's dtype (text encoders may run in another precision than the UNet).
    """
    if model.family == "sd3":
        if time_ids is not None:
            raise ValueError("time_ids are SDXL-only; an SD3 transformer takes none")
        from library.models.sd3.forward import predict_sd3

        return predict_sd3(model, model.unet, noisy_latents, timesteps, cond, {})
    unet = model.unet
    dtype = unet.dtype
    kwargs = {}
    if model.family == "sdxl":
        if cond.pooled is None or time_ids is None:
            raise ValueError("SDXL's UNet needs the pooled text embedding and time_ids")
        kwargs["added_cond_kwargs"] = {
            "text_embeds": cond.pooled.to(noisy_latents.device, dtype),
            "time_ids": time_ids.to(noisy_latents.device, dtype),
        }
    elif time_ids is not None:
        raise ValueError(f"time_ids are SDXL-only; a {model.family} UNet takes none")
    hidden = cond.hidden.to(noisy_latents.device, dtype)
    return unet(noisy_latents, timesteps, encoder_hidden_states=hidden, **kwargs).sample


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5's CLIPTextModel holds final_layer_norm itself; transformers 4 (and the projection model)
    # under `.text_model`.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm
