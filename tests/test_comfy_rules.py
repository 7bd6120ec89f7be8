"""The loaders' own rules, re-implemented from reading their source, checked against what the toolkit trained
(issue 20). Each rule below cites the file it was read from; no loader code is imported or copied.

DoRA (item 1). The trained weight is peft's: m * (W + s*BA) / ||W + s*BA||, the norm per output row
(peft tuners/lora/dora.py `get_weight_norm`, dim=1 for Linear, every axis but 0 for convs). The file holds `dora_scale`
= m as [out, 1] / [out, 1, 1, 1] (LyCORIS' `wd_on_output=True` layout). How each loader turns that file into a weight:
- LyCORIS (lycoris/modules/locon.py `apply_weight_decompose`, wd_on_output branch): norm of the merged W + dW per
  output row -> the trained weight.
- ComfyUI (comfy/weight_adapter/base.py `weight_decompose`): picks the output axis when dora_scale.shape[0] equals
  the weight's, then divides by the norm of the *original* W per row (not W + dW) -> another weight. The input-axis
  branch (dora_scale [1, in]) norms W + dW per input column.
- A1111 (extensions-builtin/Lora/network.py `apply_weight_decompose`): always the per-input-column norm of W + dW,
  broadcast against whatever dora_scale holds -> for [out, 1] an outer ratio, another weight.
No layout makes all three compute peft's weight: the per-input layout is a different decomposition (column scaling
of W + dW cannot equal row scaling), and ComfyUI's output branch disagrees with LyCORIS' for the same file. The file
and `--help` say so (tests below), and `merge_models.py` merges a DoRA exactly (library/networks/lora_tools.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.networks.lora import AdaptedModule
from library.networks import lycoris


# --- the three loaders' DoRA rules (each re-written from the function named in the module docstring) -----------

def lycoris_weight(w, diff, dora_scale):
    merged = w + diff
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (w.dim() - 1))
    return merged * (dora_scale / (norm + torch.finfo(merged.dtype).eps))


def _per_input_norm(t):
    return t.transpose(0, 1).reshape(t.shape[1], -1).norm(dim=1, keepdim=True) \
        .reshape(t.shape[1], *[1] * (t.dim() - 1)).transpose(0, 1)


def comfyui_weight(w, diff, dora_scale):
    merged = w + diff
    if dora_scale.shape[0] == merged.shape[0]:  # output axis: the norm of the original weight
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = _per_input_norm(merged)
    return merged * (dora_scale / (norm + torch.finfo(w.dtype).eps))


def a1111_weight(w, diff, dora_scale):
    merged = w + diff
    return merged * (dora_scale / _per_input_norm(merged))


def file_delta(t: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """alpha / rank * up @ down in fp32, as every loader builds the LoRA part (ComfyUI lora.py, A1111 network_lora)."""
    up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
    rank = down.shape[0]
    return (float(t["alpha"]) / rank * (up.flatten(1) @ down.flatten(1))).reshape(shape)


# --- a trained peft DoRA on a Linear and a 3x3 conv ----------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(40, 24)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)


@pytest.fixture(scope="module")
def dora():
    """(module, [(name, AdaptedModule, original weight)]) with non-trivial B and magnitude, as after training."""
    from peft import LoraConfig, inject_adapter_in_model

    g = torch.Generator().manual_seed(7)
    toy = Toy()
    originals = {"lin": toy.lin.weight.detach().clone(), "conv": toy.conv.weight.detach().clone()}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2.0, target_modules=["lin", "conv"], use_dora=True), toy,
                            adapter_name="sdtk")
    adapted = []
    with torch.no_grad():
        for name, kind in (("lin", "linear"), ("conv", "conv")):
            layer = getattr(toy, name)
            b = layer.lora_B["sdtk"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.4)  # a direction change comparable to W's rows
            mag = layer.lora_magnitude_vector["sdtk"].weight
            mag.mul_(1 + 0.3 * torch.rand(mag.shape, generator=g))
            adapted.append((name, AdaptedModule("unet", name, kind, 4, 2.0, -1, layer), originals[name]))
    return toy.eval(), adapted


def _trained_weight(layer, name, w):
    """The weight the peft module applies, read from its outputs (bias removed): what the toolkit trained."""
    with torch.no_grad():
        if name == "lin":
            eye = torch.eye(w.shape[1])
            return (layer(eye) - layer.base_layer.bias).T
        # A 3x3 conv (padding 1) on a 3x3 input: the output at the centre from an impulse at (c, i, j) is W[:, c, i, j].
        k = w.shape[-1]
        out = []
        for c in range(w.shape[1]):
            for i in range(k):
                for j in range(k):
                    x = torch.zeros(1, w.shape[1], k, k)
                    x[0, c, i, j] = 1
                    y = layer(x)[0, :, k // 2, k // 2] - layer.base_layer.bias
                    out.append(y)
        return torch.stack(out, 1).reshape(w.shape[0], w.shape[1], k, k)


@pytest.mark.parametrize("name", ["lin", "conv"])
def test_dora_file_layout_is_lycoris_wd_on_output_and_matches_training_there(dora, name):
    toy, adapted = dora
    _, m, w = next(a for a in adapted if a[0] == name)
    t = {k: v.to(torch.float16) for k, v in lycoris.module_tensors("dora", m, "sdtk").items()}  # save_precision fp16
    assert tuple(t["dora_scale"].shape) == (w.shape[0],) + (1,) * (w.dim() - 1)  # [out, 1] / [out, 1, 1, 1]
    trained = _trained_weight(getattr(toy, name), name, w)
    ly = lycoris_weight(w, file_delta(t, w.shape), t["dora_scale"].float())
    # fp16 rounding of the stored tensors (2^-11 relative per factor; 3.4e-4 of the largest weight measured)
    scale = trained.abs().max()
    assert (ly - trained).abs().max() <= 1e-3 * scale, float((ly - trained).abs().max() / scale)
    effect = (trained - w).abs().max()
    comfy = comfyui_weight(w, file_delta(t, w.shape), t["dora_scale"].float())
    a1111 = a1111_weight(w, file_delta(t, w.shape), t["dora_scale"].float())
    # The other two loaders compute another weight: off by far more than rounding, a share of the adapter's effect.
    assert (comfy - trained).abs().max() > 0.05 * effect
    assert (a1111 - trained).abs().max() > 0.05 * effect


@pytest.mark.parametrize("name", ["lin", "conv"])
def test_no_per_input_layout_reproduces_the_trained_weight_in_the_loaders_that_read_it(dora, name):
    """The best per-input magnitude for the trained direction (least squares per column) still misses: the layout
    ComfyUI's input branch, A1111 and LyCORIS (wd_on_output=False) share is another decomposition."""
    toy, adapted = dora
    _, m, w = next(a for a in adapted if a[0] == name)
    t = lycoris.module_tensors("dora", m, "sdtk")
    trained = _trained_weight(getattr(toy, name), name, w)
    merged = w + file_delta(t, w.shape)
    direction = merged / _per_input_norm(merged)  # what every per-input loader scales column by column
    d2, t2 = direction.transpose(0, 1).flatten(1), trained.transpose(0, 1).flatten(1)
    best = ((d2 * t2).sum(1) / (d2 * d2).sum(1)).reshape(1, -1, *[1] * (w.dim() - 2))
    fit = direction * best
    assert torch.allclose(comfyui_weight(w, file_delta(t, w.shape), best), fit, atol=1e-6)
    assert torch.allclose(a1111_weight(w, file_delta(t, w.shape), best), fit, atol=1e-6)
    assert (fit - trained).abs().max() > 0.05 * (trained - w).abs().max()


def test_dora_file_metadata_and_help_say_where_it_computes_the_trained_weight():
    import dataclasses

    from library.config.fields import help_of
    from library.config.network import NetworkConfig
    from library.networks.kohya import DORA_NOTE, metadata_for

    md = metadata_for(family="sd1", v_prediction=False, network_module="dora", network_dim=4, network_alpha=1.0,
                      title="t")
    args = json.loads(md["ss_network_args"])
    assert args == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    assert md["sdtk_dora_layout"] == DORA_NOTE
    for phrase in ("dora_scale per output row", "LyCORIS", "ComfyUI", "A1111", "merge_models.py"):
        assert phrase in DORA_NOTE
    field = next(f for f in dataclasses.fields(NetworkConfig) if f.name == "network_module")
    assert "ComfyUI and A1111 compute another weight" in help_of(field)
    assert "sdtk_dora_layout" not in metadata_for(family="sd1", v_prediction=False, network_module="lora",
                                                  network_dim=4, network_alpha=1.0, title="t")


@pytest.mark.parametrize("name", ["lin", "conv"])
def test_merging_the_dora_file_into_the_checkpoint_gives_the_trained_weight(dora, name):
    """What the README offers for ComfyUI / A1111: merge_models.py's LoRA merge (lora_tools.merge_lora)."""
    from library.networks.lora_tools import merge_lora

    toy, adapted = dora
    _, m, w = next(a for a in adapted if a[0] == name)
    t = {k: v.to(torch.float16) for k, v in lycoris.module_tensors("dora", m, "sdtk").items()}
    lora = {f"lora_unet_{name}.{k}": v for k, v in t.items()}
    merged = merge_lora({f"{name}.weight": w}, lora, {f"lora_unet_{name}": f"{name}.weight"})[f"{name}.weight"]
    trained = _trained_weight(getattr(toy, name), name, w)
    assert (merged - trained).abs().max() <= 1e-3 * trained.abs().max()
