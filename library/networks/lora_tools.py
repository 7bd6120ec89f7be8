"""Pure tensor tools on kohya LoRA state dicts: merge into weights, extract from two models by SVD, resize by SVD.

Weights are addressed by whatever keys the caller uses (diffusers names, e.g. "unet.down_blocks.0....to_q.weight");
`names` maps each kohya module name (`lora_unet_...`) to its weight key: library.networks.kohya.kohya_weight_map()
for every layer, target_weight_map() for the layers a network config adapts.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from library.errors import ModelFileError


def group_modules(lora: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {suffix: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in lora.items():
        name, dot, suffix = key.partition(".")
        if not dot:
            raise ModelFileError(f"LoRA key {key!r} is not <module>.<tensor>")
        out.setdefault(name, {})[suffix] = t
    return out


def lora_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Weight delta of one module from its file tensors, scale included, as A1111 / ComfyUI compute it.

    LoRA: up @ down * alpha / rank (3x3 convs: flattened up @ flattened down, reshaped). LoHa: (w1a w1b) * (w2a w2b) *
    alpha / rank. LoKr: kron(w1, w2) * (alpha / rank if a factor is decomposed, else 1). A missing alpha means
    alpha = rank (old files; sd-scripts create_network_from_weights). Computed in float32.
    """
    f = {k: v.float() for k, v in t.items()}
    if "lora_down.weight" in f:
        down, up = f["lora_down.weight"], f["lora_up.weight"]
        rank = down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    elif "hada_w1_a" in f:
        rank = f["hada_w1_b"].shape[0]
        delta = ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(shape)
    elif "lokr_w1" in f or "lokr_w1_a" in f:
        rank = None
        w1 = f.get("lokr_w1")
        if w1 is None:
            w1, rank = f["lokr_w1_a"] @ f["lokr_w1_b"], f["lokr_w1_b"].shape[0]
        w2 = f.get("lokr_w2")
        if w2 is None:
            w2, rank = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1), f["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2).reshape(shape)
        if rank is None:
            return delta
    else:
        raise ModelFileError(f"LoRA module tensors {sorted(t)} are not LoRA, LoHa or LoKr")
    alpha = f["alpha"].reshape(()).item() if "alpha" in f else rank
    return delta * (alpha / rank)


def _dora_weight(w: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024, eq. 5): magnitude * (W + dW) / ||W + dW||, the norm per output row when dora_scale is
    [out, 1, ...] (peft, LyCORIS wd_on_out) and per input column otherwise (ComfyUI weight_decompose tells them apart
    the same way)."""
    merged = w + delta
    if dora_scale.shape[0] == w.shape[0]:
        norm = merged.flatten(1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))
    return dora_scale.float().reshape(norm.shape) * merged / norm


def merge_lora(weights: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], names: Mapping[str, str],
               strength: float = 1.0) -> dict[str, torch.Tensor]:
    """`weights` with the LoRA merged in at `strength` (W + strength * dW; DoRA: W + strength * (W_dora - W)).

    Returns a new dict (unchanged tensors are shared); merged tensors keep their dtype. Any LoRA module without a
    weight is an error, never a silent skip.
    """
    out = dict(weights)
    for name, t in group_modules(lora).items():
        key = names.get(name)
        if key is None or key not in weights:
            raise ModelFileError(f"LoRA module {name} has no weight in this model (wrong family or not a kohya LoRA)")
        w = weights[key].float()
        delta = lora_delta(t, w.shape)
        target = _dora_weight(w, delta, t["dora_scale"]) if "dora_scale" in t else w + delta
        out[key] = (w + strength * (target - w)).to(weights[key].dtype)
    return out


def _quantile(x: torch.Tensor, q: float) -> float:
    if x.numel() <= 16_000_000:  # torch.quantile refuses larger inputs
        return torch.quantile(x, q).item()
    return float(np.quantile(x.numpy(), q))


def _low_rank(mat: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up = U_r diag(S_r), down = Vh_r, all singular values) of a 2-D matrix (sd-scripts puts S into up)."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank], s


def extract_lora(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], names: Mapping[str, str],
                 rank: int, conv_rank: int | None = None, clamp_quantile: float | None = 0.99,
                 min_diff: float = 0.01) -> dict[str, torch.Tensor]:
    """A kohya LoRA approximating tuned - base (sd-scripts networks/extract_lora_from_models.py semantics).

    Per module: SVD of the difference (3x3 convs flattened to [out, in*k*k]); keep rank min(rank, out, in) (3x3 convs:
    conv_rank, default rank); up = U S, down = Vh; both clamped to [-q, q], q = the clamp_quantile quantile of the
    signed values of up and down together (sd-scripts' rule; None = no clamp); alpha = rank, so scale 1.
    Text-encoder modules (`lora_te*`) are all left out when none differs by more than min_diff (max |diff|), as
    sd-scripts does; UNet modules are always extracted.
    """
    te_changed = any((tuned[k].float() - base[k].float()).abs().max().item() > min_diff
                     for n, k in names.items() if n.startswith("lora_te"))
    out: dict[str, torch.Tensor] = {}
    for name, key in sorted(names.items()):
        if name.startswith("lora_te") and not te_changed:
            continue
        if key not in base or key not in tuned:
            raise ModelFileError(f"extract: weight {key} is missing from {'base' if key not in base else 'tuned'} model")
        diff = tuned[key].float() - base[key].float()
        if diff.shape != base[key].shape or diff.dim() not in (2, 4):
            raise ModelFileError(f"extract: {key} has shape {list(diff.shape)}; only Linear / Conv2d weights")
        out_dim, in_dim = diff.shape[:2]
        is_3x3 = diff.dim() == 4 and tuple(diff.shape[2:]) != (1, 1)
        r = min(conv_rank if is_3x3 and conv_rank is not None else rank, out_dim, in_dim)
        up, down, _ = _low_rank(diff.flatten(1), r)
        if clamp_quantile is not None:
            hi = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
            up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
        if diff.dim() == 4:
            up, down = up.reshape(out_dim, r, 1, 1), down.reshape(r, *diff.shape[1:])
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(r))
    return out


def resize_lora(lora: Mapping[str, torch.Tensor], new_rank: int, new_conv_rank: int | None = None
                ) -> dict[str, torch.Tensor]:
    """Change a LoRA's rank by SVD of each module's up @ down (sd-scripts networks/resize_lora.py, fixed rank).

    The new rank is min(new_rank, old rank) (3x3 convs: new_conv_rank, default new_rank); alpha becomes
    scale * new_rank so the scale alpha / rank is kept; up = U S, down = Vh. A full-rank resize is lossless and a
    smaller one is the best approximation in Frobenius norm (Eckart-Young). LoRA / LoCon only; DoRA magnitudes are
    carried over unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in group_modules(lora).items():
        if "lora_down.weight" not in t:
            raise ModelFileError(f"resize: {name} is not a LoRA module (LoHa / LoKr cannot be resized by SVD)")
        down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
        old = down.shape[0]
        alpha = t["alpha"].float().reshape(()).item() if "alpha" in t else float(old)
        is_3x3 = down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
        r = min(new_conv_rank if is_3x3 and new_conv_rank is not None else new_rank, old)
        new_up, new_down, _ = _low_rank(up.flatten(1) @ down.flatten(1), r)
        if down.dim() == 4:
            new_up, new_down = new_up.reshape(up.shape[0], r, 1, 1), new_down.reshape(r, *down.shape[1:])
        dtype = t["lora_down.weight"].dtype
        out[f"{name}.lora_up.weight"] = new_up.to(dtype).contiguous()
        out[f"{name}.lora_down.weight"] = new_down.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha / old * r)
        if "dora_scale" in t:
            out[f"{name}.dora_scale"] = t["dora_scale"]
    return out
