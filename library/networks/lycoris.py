"""Tensors of one adapted layer <-> the tensor names kohya / LyCORIS files use for it.

One place per adapter type, both directions, so saving and loading cannot drift apart:
- LoRA / LoCon: `lora_down.weight` = peft lora_A ([r, in] or [r, in, k, k]), `lora_up.weight` = lora_B ([out, r] or
  [out, r, 1, 1]), `alpha` (0-dim). Scale alpha / r in both (sd-scripts networks/lora.py LoRAModule).
- DoRA: LoRA tensors + `dora_scale`, the per-output-row magnitude, written [out, 1] (Linear) / [out, 1, 1, 1] (conv):
  LyCORIS' `wd_on_output=True` layout. peft norms W + dW per output row (peft tuners/lora/dora.py), which is that
  layout, and LyCORIS applies it exactly. ComfyUI (comfy/weight_adapter/base.py `weight_decompose`) takes the output
  axis when `dora_scale.shape[0] == out` but divides by the norm of the base W, not W + dW (an open fix: ComfyUI PR
  #15458); Forge's backend/patcher/lora.py copies that function. A1111 (extensions-builtin/Lora/network.py) reads
  only the per-input layout [1, in], which is another decomposition (columns, not rows) that peft cannot train. So
  no layout gives the trained weight in all three: kohya.DORA_NOTE says so in the file and --help;
  tests/test_comfy_rules.py checks each rule numerically. diffusers' SD/SDXL loader drops `dora_scale`
  (lora_pipeline.py).
- LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in*k*k], `hada_w2_a`, `hada_w2_b`, `alpha`; delta = (w1a w1b) * (w2a w2b)
  * alpha / r, same shapes and formula in peft and LyCORIS (lycoris/modules/loha.py).
- LoKr: `lokr_w1` or `lokr_w1_a`/`_b`, `lokr_w2` or `lokr_w2_a`/`_b`, `alpha`; delta = kron(w1, w2) * scale. Readers
  (A1111 network_lokr.py, ComfyUI lokr.py) use scale = alpha / r only when a factor is decomposed and 1 otherwise
  (LyCORIS sets alpha = r then), while peft always uses alpha / r: with both factors full we fold the scale into
  `lokr_w2` when writing and take it out when reading.
"""

from __future__ import annotations

import torch

from library.errors import ModelFileError
from library.networks.lora import AdaptedModule, adapter_params

_LORA = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
_LOHA = {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
_LOKR = {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
UNSUPPORTED = ("hada_t1", "hada_t2", "lokr_t2")  # Tucker / effective-conv factors: we never create them


def _names(module_type: str) -> dict[str, str]:
    match module_type:
        case "lora" | "dora":
            return _LORA
        case "loha":
            return _LOHA
        case "lokr":
            return _LOKR
        case other:
            raise ValueError(f"unknown adapter type {other!r}")


def _lokr_both_full(params: dict) -> bool:
    return "lokr_w1" in params and "lokr_w2" in params


def _dora_file_shape(magnitude: torch.Tensor, kind: str) -> tuple[int, ...]:
    out = magnitude.numel()
    return (out, 1) if kind == "linear" and magnitude.dim() == 1 else (out, 1, 1, 1)


def module_tensors(module_type: str, m: AdaptedModule, adapter: str) -> dict[str, torch.Tensor]:
    """The file tensors of one adapted layer, by suffix (`lora_down.weight`, `alpha`, `hada_w1_a`, ...)."""
    params = adapter_params(m.layer, adapter)
    names = _names(module_type)
    out: dict[str, torch.Tensor] = {}
    for attr, p in params.items():
        if attr == "lora_magnitude_vector":
            out["dora_scale"] = p.detach().reshape(_dora_file_shape(p, m.kind))
        elif attr in names:
            out[names[attr]] = p.detach()
        else:
            raise ModelFileError(f"{m.component}.{m.path}: peft parameter {attr} has no kohya/LyCORIS name")
    if module_type == "lokr" and _lokr_both_full(params):
        out["lokr_w2"] = out["lokr_w2"] * (m.alpha / m.rank)
    out["alpha"] = torch.tensor(float(m.alpha))
    return out


@torch.no_grad()
def load_module_tensors(module_type: str, m: AdaptedModule, adapter: str, tensors: dict[str, torch.Tensor],
                        where: str) -> None:
    """Copy file tensors (by suffix) into one adapted layer; the caller has checked names and shapes.

    The file's alpha replaces the configured one (as sd-scripts' load_state_dict does with its alpha buffer).
    """
    params = adapter_params(m.layer, adapter)
    alpha = float(tensors["alpha"].float().reshape(()).item())
    if not alpha > 0:
        raise ModelFileError(f"{where}.alpha = {alpha}: alpha must be > 0")
    m.alpha = alpha
    _set_scale(m.layer, adapter, alpha, m.rank)
    names = _names(module_type)
    for attr, p in params.items():
        if attr == "lora_magnitude_vector":
            p.copy_(tensors["dora_scale"].reshape(p.shape))
            continue
        value = tensors[names[attr]]
        if module_type == "lokr" and attr == "lokr_w2" and _lokr_both_full(params):
            value = value / (alpha / m.rank)
        p.copy_(value.reshape(p.shape))


def _set_scale(layer, adapter: str, alpha: float, rank: int) -> None:
    if hasattr(layer, "lora_alpha"):  # peft LoraLayer
        layer.lora_alpha[adapter] = alpha
    else:  # peft LycorisLayer (LoHa, LoKr)
        layer.alpha[adapter] = alpha
    layer.scaling[adapter] = alpha / rank


def expected_shapes(module_type: str, m: AdaptedModule, adapter: str) -> dict[str, tuple[int, ...]]:
    """suffix -> shape the file must have for this layer (alpha: any one-element tensor, shown as ())."""
    return {k: tuple(v.shape) for k, v in module_tensors(module_type, m, adapter).items()}
