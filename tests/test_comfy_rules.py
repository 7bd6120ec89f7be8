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

Hypernetworks (item 2). A1111 (modules/hypernetworks/hypernetwork.py) is the reference for the format; ComfyUI
(comfy_extras/nodes_hypernetwork.py `load_hypernetwork_patch`) rebuilds each module from the file's `.weight` keys in
order, LayerNorm weights included, and applies `k + module(k) * strength` to the attention contexts by width. Its
rule is re-implemented below (`comfyui_build`, independent of library/networks/hypernetwork_layers.py) and run on
our files; the toolkit's config check must agree with it over a grid of settings.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from library.networks import lycoris
from library.networks.lora import AdaptedModule


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


# --- hypernetworks: ComfyUI's rebuild, re-written from load_hypernetwork_patch ------------------------------------

COMFY_ACTS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
              "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish}


def comfyui_build(sd: dict) -> dict[int, nn.ModuleList] | None:
    act = sd.get("activation_func", "linear")
    ln, drop = sd.get("is_layer_norm", False), sd.get("use_dropout", False)
    act_out, lld = sd.get("activate_output", False), sd.get("last_layer_dropout", False)
    if act not in COMFY_ACTS:
        return None  # ComfyUI logs "Unsupported Hypernetwork format" and the model stays unpatched
    out = {}
    for dim in [k for k in sd if isinstance(k, int)]:
        pair = []
        for state in sd[dim]:
            names = [k[:-len(".weight")] for k in state if k.endswith(".weight")]
            layers, i = [], 0
            while i < len(names):
                last, penultimate = i == len(names) - 1, i == len(names) - 2
                w = state[names[i] + ".weight"]
                lin = nn.Linear(w.shape[1], w.shape[0])
                lin.load_state_dict({"weight": w, "bias": state[names[i] + ".bias"]})
                layers.append(lin)
                if act != "linear" and (not last or act_out):
                    layers.append(COMFY_ACTS[act]())
                if ln:
                    i += 1
                    norm = nn.LayerNorm(state[names[i] + ".weight"].shape[0])
                    norm.load_state_dict({"weight": state[names[i] + ".weight"], "bias": state[names[i] + ".bias"]})
                    layers.append(norm)
                if drop and not last and (not penultimate or lld):
                    layers.append(nn.Dropout(p=0.3))
                i += 1
            pair.append(nn.Sequential(*layers))  # never .eval(): ComfyUI leaves the modules in training mode
        out[dim] = nn.ModuleList(pair)
    return out


def _hypernetwork_file(tmp_path, **settings):
    """Our file for these [hypernetwork] settings (random non-trivial weights, LayerNorms included), read back as
    ComfyUI reads it (torch.load weights_only)."""
    from library.config.hypernetwork import HypernetworkConfig
    from library.networks.hypernetwork import HypernetworkSpec, create_hypernetwork, parse_dropout_structure
    from library.networks.hypernetwork_file import HypernetworkInfo, save_hypernetwork

    h = HypernetworkConfig(**settings)
    dropout = h.dropout_structure or parse_dropout_structure(h.layer_structure, h.use_dropout, h.last_layer_dropout)
    spec = HypernetworkSpec(tuple(h.layer_structure), h.activation_func, h.add_layer_norm, h.activate_output,
                            tuple(dropout), "KaimingUniform", h.use_dropout)
    hn = create_hypernetwork(spec, [16, 24], torch.Generator().manual_seed(3))
    with torch.no_grad():
        for p in hn.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    path = save_hypernetwork(tmp_path / "hn.pt", hn, HypernetworkInfo(name="t"))
    return hn, torch.load(str(path), weights_only=True)


def _same_in_comfyui(hn, sd, strength=0.7) -> bool:
    comfy = comfyui_build(sd)
    if comfy is None:
        return False
    hn.eval()
    hn.set_multiplier(strength)
    g = torch.Generator().manual_seed(0)
    for width, pair in zip(hn.widths, hn.pairs.values()):
        x = torch.randn(2, 5, width, generator=g)
        for ours, theirs in zip(pair, comfy[width]):
            with torch.no_grad():
                got = [x + theirs(x) * strength for _ in range(2)]  # twice: an active dropout shows as a change
                if not all(torch.allclose(ours(x), y, atol=1e-6) for y in got):
                    return False
    return True


GRID = [dict(activation_func=a, add_layer_norm=ln, activate_output=ao, layer_structure=ls)
        for a in ("linear", "relu", "mish", "gelu") for ln in (False, True) for ao in (False, True)
        for ls in ([1, 2, 1], [1, 1.5, 2, 1])] + \
       [dict(activation_func="relu", use_dropout=True, layer_structure=ls, last_layer_dropout=lld)
        for ls in ([1, 2, 1], [1, 2, 2, 1]) for lld in (False, True)] + \
       [dict(activation_func="relu", use_dropout=True, add_layer_norm=True, activate_output=True,
             layer_structure=[1, 2, 1], last_layer_dropout=lld) for lld in (False, True)] + \
       [dict(activation_func="tanh", use_dropout=True, dropout_structure=[0, 0.1, 0.2, 0], layer_structure=[1, 2, 2, 1])]


@pytest.mark.parametrize("settings", GRID, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_the_config_check_agrees_with_comfyuis_rebuild_of_our_file(tmp_path, capsys, settings):
    from library.config.hypernetwork import HypernetworkConfig

    hn, sd = _hypernetwork_file(tmp_path, **settings)
    same = _same_in_comfyui(hn, sd)
    causes = HypernetworkConfig(**settings).check_comfyui()
    assert same == (causes == []), (same, causes)
    warned = capsys.readouterr().err
    assert (warned == "") == same
    if not same:
        with pytest.raises(Exception) as err:
            HypernetworkConfig(preset="comfyui_compatible", **settings).validate()
        assert str(err.value).startswith("hypernetwork.preset = 'comfyui_compatible', but ComfyUI would build this "
                                         "file differently: hypernetwork.")


def test_the_warning_names_the_keys(capsys):
    from library.config.hypernetwork import HypernetworkConfig
    from library.errors import ConfigError

    HypernetworkConfig(activation_func="relu", add_layer_norm=True, use_dropout=True, layer_structure=[1, 2, 2, 1],
                       last_layer_dropout=True).validate()
    assert capsys.readouterr().err == (
        "warning: ComfyUI builds this hypernetwork differently from A1111 and the toolkit: hypernetwork.add_layer_norm "
        "= true with activation_func = 'relu' and activate_output = false: ComfyUI counts LayerNorm weights as layers "
        "and adds the activation after the last Linear too (set activate_output = true, activation_func = 'linear' or "
        "add_layer_norm = false); hypernetwork.use_dropout = true: ComfyUI never puts the modules in eval mode, so its "
        "dropout (p = 0.3, whatever dropout_structure says) stays on when generating (set use_dropout = false). Set "
        "hypernetwork.preset = 'comfyui_compatible' to make this an error.\n")
    with pytest.raises(ConfigError, match=r"activation_func = 'gelu': ComfyUI knows only linear, relu, leakyrelu, "
                                          r"elu, swish, tanh, sigmoid, softsign, mish; it logs an error"):
        HypernetworkConfig(preset="comfyui_compatible", activation_func="gelu").validate()
    HypernetworkConfig(preset="comfyui_compatible", activation_func="relu", add_layer_norm=True,
                       activate_output=True).validate()
    HypernetworkConfig(activation_func="gelu", network_weights="old.pt").validate()  # continuing: the file decides
    assert capsys.readouterr().err == ""
