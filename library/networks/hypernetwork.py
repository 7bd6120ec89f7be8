"""A1111-style hypernetworks: one (k, v) pair of small MLPs per context width, applied to attention contexts.

Semantics follow AUTOMATIC1111's modules/hypernetworks/hypernetwork.py (read, not copied):
- A module for width `dim` is `nn.Sequential` named `linear` of, for each step i of `layer_structure`:
  Linear(dim*ls[i] -> dim*ls[i+1]); the activation unless it is "linear" or (i is the last step and not
  `activate_output`); a LayerNorm when `add_layer_norm`; Dropout(p) when `dropout_structure[i+1] > 0`. The entries
  shift the Sequential indices, which are the file's keys (`linear.0.weight`, ...).
- It is applied as `x + linear(x) * m` to the context that feeds `to_k` (k module) and `to_v` (v module) of every
  attention layer whose context width is `dim`; for self-attention the context is the hidden states themselves, so
  SD1's 320/640/1280 pairs hit self-attention and 768 hits cross-attention. m is 1 while training and the user's
  strength otherwise (A1111: `self.multiplier if not self.training else 1`).
- Initialisation: "Normal" draws weights from N(0, 0.01) with zero biases; Xavier/Kaiming use torch.nn.init with
  zero biases (Kaiming with leaky_relu gain for "leakyrelu", else relu). LayerNorm weights are ALSO drawn from
  N(0, 0.01) (A1111 does so whatever weight_init says); kept for parity.
Here the modules run inside a diffusers attention processor (`HypernetworkAttnProcessor`), installed on the UNet's
`Attention` layers by `apply_hypernetwork`; the file format is in library/networks/hypernetwork_file.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import ModelFileError
from library.networks.hypernetwork_layers import parse_dropout_structure  # noqa: F401  (torch-free, re-exported)

# A1111's activation_dict: torch.nn classes by lower-cased name, plus its aliases ("swish" is Hardswish there).
ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish, "gelu": nn.GELU,
    "silu": nn.SiLU, "softplus": nn.Softplus, "selu": nn.SELU, "celu": nn.CELU, "hardswish": nn.Hardswish,
    "relu6": nn.ReLU6,
}
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


@dataclass(frozen=True)
class HypernetworkSpec:
    """The structure every module of one hypernetwork shares (the metadata keys of the A1111 file)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str = "linear"
    add_layer_norm: bool = False
    activate_output: bool = False
    dropout_structure: tuple[float, ...] = field(default=(0.0, 0.0, 0.0))
    weight_init: str = "Normal"
    use_dropout: bool = False  # stored as given; dropout_structure alone decides the layers (A1111 writes
    # last_layer_dropout as dropout_structure[-2] != 0, so it is derived, not kept)

    def __post_init__(self):
        if self.activation_func not in ACTIVATIONS:
            raise ModelFileError(f"hypernetwork activation_func {self.activation_func!r} is not supported "
                                 f"(supported: {', '.join(ACTIVATIONS)})")
        if len(self.dropout_structure) != len(self.layer_structure):
            raise ModelFileError(f"hypernetwork dropout_structure {list(self.dropout_structure)} does not match "
                                 f"layer_structure {list(self.layer_structure)} (one entry per layer)")


def build_layers(dim: int, spec: HypernetworkSpec) -> nn.Sequential:
    """The `linear` Sequential of one module, entry for entry as A1111 builds it (so indices match its files)."""
    ls, n = spec.layer_structure, len(spec.layer_structure)
    layers: list[nn.Module] = []
    for i in range(n - 1):
        width = int(dim * ls[i + 1])
        layers.append(nn.Linear(int(dim * ls[i]), width))
        last = i == n - 2
        act = ACTIVATIONS[spec.activation_func]
        if act is not None and (not last or spec.activate_output):
            layers.append(act())
        if spec.add_layer_norm:
            layers.append(nn.LayerNorm(width))
        if spec.dropout_structure[i + 1] > 0:
            layers.append(nn.Dropout(p=spec.dropout_structure[i + 1]))
    return nn.Sequential(*layers)


def init_layers(layers: nn.Sequential, weight_init: str, activation_func: str, generator: torch.Generator) -> None:
    """Initialise new Linear / LayerNorm entries as A1111 does (see the module docstring), from `generator`."""
    gain_for = "leaky_relu" if activation_func == "leakyrelu" else "relu"
    for layer in layers:
        if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
            continue
        w, b = layer.weight.data, layer.bias.data
        b.zero_()
        match "Normal" if isinstance(layer, nn.LayerNorm) else weight_init:
            case "Normal":
                nn.init.normal_(w, mean=0.0, std=0.01, generator=generator)
            case "XavierUniform":
                nn.init.xavier_uniform_(w, generator=generator)
            case "XavierNormal":
                nn.init.xavier_normal_(w, generator=generator)
            case "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=gain_for, generator=generator)
            case "KaimingNormal":
                nn.init.kaiming_normal_(w, nonlinearity=gain_for, generator=generator)
            case _:
                raise ModelFileError(f"hypernetwork weight_init {weight_init!r} is not one of {', '.join(WEIGHT_INITS)}")


class HypernetworkModule(nn.Module):
    """One k or v module: `x + linear(x) * m`, m = 1 in training mode and `multiplier` in eval mode (A1111)."""

    def __init__(self, dim: int, spec: HypernetworkSpec):
        super().__init__()
        self.linear = build_layers(dim, spec)
        self.multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 1.0 if self.training else self.multiplier
        return x + self.linear(x) * m


class Hypernetwork(nn.Module):
    """All (k, v) pairs: `pairs[str(width)]` is ModuleList([k, v]); iteration order is the file's key order."""

    def __init__(self, spec: HypernetworkSpec, widths: list[int]):
        super().__init__()
        self.spec = spec
        self.pairs = nn.ModuleDict({str(w): nn.ModuleList([HypernetworkModule(w, spec), HypernetworkModule(w, spec)])
                                    for w in widths})

    @property
    def widths(self) -> list[int]:
        return [int(w) for w in self.pairs]

    def set_multiplier(self, multiplier: float) -> None:
        """The strength used in eval mode (sampling); training always uses 1."""
        for pair in self.pairs.values():
            for module in pair:
                module.multiplier = float(multiplier)


def create_hypernetwork(spec: HypernetworkSpec, widths: list[int], generator: torch.Generator) -> Hypernetwork:
    """A new hypernetwork with (k, v) pairs for `widths` (in that order), initialised from `generator`."""
    hn = Hypernetwork(spec, widths)
    for pair in hn.pairs.values():
        for module in pair:
            init_layers(module.linear, spec.weight_init, spec.activation_func, generator)
    return hn


def attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The UNet's diffusers `Attention` layers by module path."""
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


def attention_widths(unet: nn.Module) -> list[int]:
    """Distinct context widths the UNet's attention layers see (= to_k input width), ascending."""
    return sorted({m.to_k.in_features for m in attention_layers(unet).values()})


class HypernetworkAttnProcessor(nn.Module):
    """diffusers' AttnProcessor2_0 (attention_processor.py) with the context passed through the hypernetwork pair
    before `to_k` and `to_v`, as A1111's CrossAttention forward does (`apply_hypernetworks(..., context)`).

    An nn.Module, so the pair is a sub-module of the Attention layer: `unet.to(device)`, `.train()` / `.eval()` (and
    so the strength) follow the UNet. Shared pairs are one set of parameters however many layers use them.
    """

    def __init__(self, hyper_k: HypernetworkModule, hyper_v: HypernetworkModule):
        super().__init__()
        self.hyper_k = hyper_k
        self.hyper_v = hyper_v

    def forward(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states  # self-attention: A1111's `default(context, x)`
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(self.hyper_k(context))
        value = attn.to_v(self.hyper_v(context))
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def apply_hypernetwork(unet: nn.Module, hn: Hypernetwork, strength: float | None = None) -> dict[str, object]:
    """Install `hn` on every attention layer of `unet` whose context width it has; returns the replaced processors
    (for `remove_hypernetwork`). `strength` (if given) sets the eval-mode multiplier.

    Works on any diffusers UNet2DConditionModel (SD1/SD2/SDXL pipelines sample with it as they are). Widths the UNet
    does not have are left unused, as in A1111 (e.g. a 1024 pair in an SD1 file); none matching is an error.
    """
    if strength is not None:
        hn.set_multiplier(strength)
    layers = attention_layers(unet)
    unet_widths = {m.to_k.in_features for m in layers.values()}
    if not unet_widths & set(hn.widths):
        raise ModelFileError(f"the hypernetwork's context widths {hn.widths} match none of this UNet's attention "
                             f"widths {sorted(unet_widths)}: it was trained for another model family")
    unused = sorted(set(hn.widths) - unet_widths)
    if unused:
        print(f"note: hypernetwork widths {unused} match no attention layer of this UNet and are unused",
              file=sys.stderr)
    originals = {}
    for name, attn in layers.items():
        pair = hn.pairs[str(attn.to_k.in_features)] if str(attn.to_k.in_features) in hn.pairs else None
        if pair is not None:
            originals[name] = attn.processor
            attn.set_processor(HypernetworkAttnProcessor(pair[0], pair[1]))
    return originals


def remove_hypernetwork(unet: nn.Module, originals: dict[str, object]) -> None:
    """Put back the processors `apply_hypernetwork` replaced."""
    layers = attention_layers(unet)
    for name, processor in originals.items():
        layers[name].set_processor(processor)
