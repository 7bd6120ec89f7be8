"""LoRA-family adapters (LoRA, LoCon, LoHa, LoKr, DoRA) added to an SDModel with peft, and their optimizer groups.

Which layers get an adapter and at what rank follows sd-scripts' networks/lora.py (`LoRANetwork.create_modules`,
`get_block_index`, `get_block_lr_weight`), re-derived here on diffusers module paths; the adapters are peft's
(`inject_adapter_in_model`). Names in memory are diffusers / transformers module paths; the kohya file names are made
only when saving (library/networks/kohya.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from library.config.network import NetworkConfig
from library.errors import ConfigError
from library.models.model import SDModel

ADAPTER_NAME = "sdtk"
Component = Literal["unet", "text_encoder", "text_encoder_2", "text_encoder_3"]  # SD3's T5: text_encoder_3
Kind = Literal["linear", "conv"]  # "linear" covers 1x1 convs: sd-scripts gives them network_dim, not conv_dim

# sd-scripts: UNET_TARGET_REPLACE_MODULE, UNET_TARGET_REPLACE_MODULE_CONV2D_3X3, TEXT_ENCODER_TARGET_REPLACE_MODULE.
_UNET_TRANSFORMER = ("Transformer2DModel",)
_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_ATTN = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")  # transformers 4 had one class per kernel
_TE_MLP = ("CLIPMLP",)

# sd-scripts NUM_OF_BLOCKS * 2 + 1 (SD1/SD2) and 1 + 9 + 3 + 9 + 1 (SDXL)
NUM_BLOCKS = {"sd1": 25, "sd2": 25, "sdxl": 23}
_DOWN_UP_LEN = {"sd1": 12, "sd2": 12, "sdxl": 9}
_MID_LEN = {"sd1": 1, "sd2": 1, "sdxl": 3}


@dataclass
class AdaptedModule:
    """One layer that received an adapter."""

    component: Component
    path: str  # module path inside the component, diffusers / transformers naming (e.g. "down_blocks.0...to_q")
    kind: Kind
    rank: int
    alpha: float
    block: int  # sd-scripts block index (UNet), -1 for text encoders
    layer: Any = field(repr=False)  # the peft tuner layer that replaced the original module


@dataclass
class Network:
    """What inject_network added: the adapted layers, the adapter type and what the optimizer grouping needs."""

    family: str
    module_type: Literal["lora", "loha", "lokr", "dora"]  # LoCon is "lora" with conv layers
    adapter_name: str
    modules: list[AdaptedModule]
    network_dim: int
    network_alpha: float
    conv_dim: int
    conv_alpha: float
    block_lr_weights: list[float] | None = None
    loraplus_unet_ratio: float = 0.0
    loraplus_te_ratio: float = 0.0

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in adapter_params(m.layer, self.adapter_name).values()]


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: block index and per-block values (sd-scripts semantics).


def block_index(path: str, family: str) -> int:
    """sd-scripts' block index of a UNet module from its diffusers path (networks/lora.py `get_block_index`).

    Down and up blocks count LDM input_blocks / output_blocks (3 per diffusers block: 2 layers + sampler, 3 layers up):
    SD1/SD2 -> the input index (1..11; 0 is conv_in), 12 for the mid block, 13 + output index (0..24). SDXL -> 0 for the time / label
    embeddings, 1 + input index, 10 + middle_block index (resnet, attention, resnet), 13 + output index, 22 for `out`.
    """
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)", path)
    if m:
        i, j = int(m[2]), int(m[4])
        idx = 3 * i + (2 if m[3] in ("downsamplers", "upsamplers") else j)
        if m[1] == "up":
            return 13 + idx  # idx = output_blocks index
        return 1 + idx if family != "sdxl" else 2 + idx  # SD: input index (IN00 has no LoRA); SDXL: 1 + input index
    if path.startswith("mid_block."):
        if family != "sdxl":
            return 12
        return {"resnets.0": 10, "attentions.0": 11, "resnets.1": 12}[".".join(path.split(".")[1:3])]
    if family == "sdxl":
        if path.startswith(("time_embedding", "add_embedding")):
            return 0
        if path.startswith(("conv_out", "conv_norm_out")):
            return 22
    return -1


def lr_weight_list(spec: str | list[float], length: int) -> list[float]:
    """A down/up lr-weight preset or list, as sd-scripts `get_block_lr_weight` reads it.

    Presets over i = 0..n-1: cosine sin(pi/2 * i/(n-1)) reversed, sine the same forward, linear i/(n-1),
    reverse_linear reversed, zeros 0; "+b" adds b to each. A short list is padded with 1.0 (sd-scripts does, warning).
    """
    if isinstance(spec, str):
        name, _, base = spec.partition("+")
        b = float(base) if base else 0.0
        ramp = [i / (length - 1) for i in range(length)]
        match name:
            case "cosine":
                return [math.sin(math.pi * r / 2) + b for r in reversed(ramp)]
            case "sine":
                return [math.sin(math.pi * r / 2) + b for r in ramp]
            case "linear":
                return [r + b for r in ramp]
            case "reverse_linear":
                return [r + b for r in reversed(ramp)]
            case "zeros":
                return [b] * length
            case other:
                raise ConfigError(f"unknown block lr weight preset {other!r}")
    if len(spec) > length:
        raise ConfigError(f"a block lr weight list has {len(spec)} entries; this model has {length} such blocks")
    return [float(w) for w in spec] + [1.0] * (length - len(spec))


def block_lr_weights(family: str, down: str | list[float], mid: list[float], up: str | list[float],
                     zero_threshold: float) -> list[float] | None:
    """Per-block lr multipliers (NUM_BLOCKS[family] entries), or None when none is set (sd-scripts semantics)."""
    if not down and not mid and not up:
        return None
    n, n_mid = _DOWN_UP_LEN[family], _MID_LEN[family]
    if len(mid) > n_mid:
        raise ConfigError(f"network.mid_lr_weight has {len(mid)} entries; {family} has {n_mid} mid block(s)")
    parts = [lr_weight_list(down, n) if down else [1.0] * n,
             [float(w) for w in mid] + [1.0] * (n_mid - len(mid)),
             lr_weight_list(up, n) if up else [1.0] * n]
    weights = [w if w > zero_threshold else 0.0 for part in parts for w in part]
    return [1.0, *weights, 1.0] if family == "sdxl" else weights  # SDXL: embeddings and `out` fixed at 1


def _per_block(values: list, default, n: int, key: str) -> list:
    if not values:
        return [default] * n
    if len(values) != n:
        raise ConfigError(f"network.{key} has {len(values)} entries; this model family needs {n}")
    return list(values)


# ---------------------------------------------------------------------------------------------------------------
# Which layers are adapted.


def select_targets(root: nn.Module, component: Component, target: str, adapts_conv: bool) -> list[tuple[str, Kind]]:
    """(module path, kind) of every layer the preset adapts (see library/config/network.py `Target`)."""
    base = target.removesuffix("+conv")
    found: dict[str, Kind] = {}

    def add_children(prefix: str, parent: nn.Module, want_linear: bool, want_conv: bool, attn_only: bool) -> None:
        for child_name, child in parent.named_modules():
            if not child_name:
                continue
            is_1x1 = isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, nn.Linear) or is_1x1:
                if not want_linear:
                    continue
                if attn_only and not _is_attention_child(parent, child_name):
                    continue
                found[f"{prefix}.{child_name}"] = "linear"
            elif isinstance(child, nn.Conv2d) and want_conv:
                found[f"{prefix}.{child_name}"] = "conv"

    for name, module in root.named_modules():
        cls = type(module).__name__
        if component == "unet":
            if cls in _UNET_TRANSFORMER:
                add_children(name, module, True, False, attn_only=base == "attn")
            elif cls in _UNET_CONV_BLOCKS:
                add_children(name, module, adapts_conv or base == "all_linear", adapts_conv, attn_only=False)
        elif cls in _TE_ATTN or (cls in _TE_MLP and base != "attn"):
            add_children(name, module, True, False, attn_only=False)
    return sorted(found.items())


def _is_attention_child(parent: nn.Module, child_name: str) -> bool:
    """True when a layer sits directly in a diffusers `Attention` (to_q, to_k, to_v, to_out.0)."""
    parts = child_name.split(".")
    for cut in (1, 2):
        if len(parts) > cut and type(parent.get_submodule(".".join(parts[:-cut]))).__name__ == "Attention":
            return True
    return False


def _roots(model: SDModel, cfg: NetworkConfig) -> list[tuple[Component, nn.Module]]:
    roots: list[tuple[Component, nn.Module]] = []
    if not cfg.train_text_encoder_only:
        roots.append(("unet", model.unet))
    if not cfg.train_unet_only:
        names: tuple[Component, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
        roots += [(names[i], te) for i, te in enumerate(model.text_encoders)]
    return roots


def plan_ranks(model: SDModel, cfg: NetworkConfig) -> dict[Component, dict[str, tuple[Kind, int, float, int]]]:
    """component -> module path -> (kind, rank, alpha, block) of every adapter to add (rank 0 modules left out)."""
    if model.family == "sd3":  # MMDiT targets and no UNet blocks: library/networks/sd3_keys.py
        from library.networks.sd3_keys import plan_sd3

        return plan_sd3(model, cfg)  # type: ignore[return-value]
    n = NUM_BLOCKS[model.family]
    lr_w = block_lr_weights(model.family, cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight,
                            cfg.block_lr_zero_threshold)
    per_block = bool(cfg.block_dims) or lr_w is not None
    dims = _per_block(cfg.block_dims, cfg.network_dim, n, "block_dims")
    alphas = _per_block(cfg.block_alphas, cfg.network_alpha, n, "block_alphas")
    conv_dims = _per_block(cfg.conv_block_dims, cfg.conv_dim, n, "conv_block_dims")
    conv_alphas = _per_block(cfg.conv_block_alphas, cfg.conv_alpha, n, "conv_block_alphas")
    if lr_w is not None:  # sd-scripts remove_block_dims_and_alphas: a block with lr weight 0 gets no adapter
        dims = [0 if w == 0 else d for d, w in zip(dims, lr_w)]
        conv_dims = [0 if w == 0 else d for d, w in zip(conv_dims, lr_w)]

    plan: dict[Component, dict[str, tuple[Kind, int, float, int]]] = {}
    for component, root in _roots(model, cfg):
        entries: dict[str, tuple[Kind, int, float, int]] = {}
        for path, kind in select_targets(root, component, cfg.target, cfg.adapts_conv):
            block = block_index(path, model.family) if component == "unet" else -1
            if component != "unet" or not per_block:
                rank, alpha = (cfg.network_dim, cfg.network_alpha) if kind == "linear" else (cfg.conv_dim, cfg.conv_alpha)
            elif not 0 <= block < n:
                raise ConfigError(f"UNet module {path} has no sd-scripts block index; per-block options cannot place it")
            elif kind == "linear":
                rank, alpha = dims[block], alphas[block]
            else:
                rank, alpha = conv_dims[block], conv_alphas[block]
            if rank > 0:
                entries[path] = (kind, int(rank), float(alpha), block)
        plan[component] = entries
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Injection with peft.


def _peft_config(cfg: NetworkConfig, entries: dict[str, tuple[Kind, int, float, int]]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    # Exact full paths as one regex (peft fullmatches a str target_modules against every module path); rank and
    # alpha through one pattern per distinct value. peft tries each pattern against each module, so one pattern per
    # module made injection quadratic (minutes for SDXL).
    def alternation(paths) -> str:
        return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")"

    by_rank: dict[int, list[str]] = {}
    by_alpha: dict[float, list[str]] = {}
    for path, (_, rank, alpha, _) in entries.items():
        if rank != cfg.network_dim:  # the default needs no pattern
            by_rank.setdefault(rank, []).append(path)
        if alpha != cfg.network_alpha:
            by_alpha.setdefault(alpha, []).append(path)
    common = dict(r=cfg.network_dim, target_modules=alternation(entries),
                  rank_pattern={alternation(ps): r for r, ps in by_rank.items()},
                  alpha_pattern={alternation(ps): a for a, ps in by_alpha.items()})
    match cfg.module:
        case "lora" | "locon" | "dora":
            return LoraConfig(lora_alpha=cfg.network_alpha, lora_dropout=cfg.network_dropout,
                              use_dora=cfg.module == "dora", **common)
        case "loha":
            return LoHaConfig(alpha=cfg.network_alpha, rank_dropout=cfg.rank_dropout,
                              module_dropout=cfg.module_dropout, use_effective_conv2d=False, **common)
        case "lokr":
            return LoKrConfig(alpha=cfg.network_alpha, rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout,
                              decompose_both=cfg.lokr_decompose_both, decompose_factor=cfg.lokr_factor,
                              use_effective_conv2d=False, **common)
        case other:
            raise ConfigError(f"network.network_module = {other!r} is not supported")


def _inject(inject_adapter_in_model, cfg: NetworkConfig, entries: dict, root: nn.Module) -> None:
    """peft's injection of `entries` (exact module paths) into `root`. A transformers model (a root whose config has
    a model_type: the text encoders) is handed to peft inside a plain container: for such a root peft first builds
    transformers' v4 -> v5 checkpoint conversion table (~1100 regexes, a quarter of a tiny run's injection time),
    which only renames the targets of adapters saved under transformers v4; ours are exact paths of this model."""
    if not hasattr(getattr(root, "config", None), "model_type"):
        inject_adapter_in_model(_peft_config(cfg, entries), root, adapter_name=ADAPTER_NAME)
        return
    holder = nn.Module()
    holder.add_module("m", root)
    inject_adapter_in_model(_peft_config(cfg, {f"m.{k}": v for k, v in entries.items()}), holder,
                            adapter_name=ADAPTER_NAME)


def inject_network(model: SDModel, cfg: NetworkConfig) -> Network:
    """Add the configured adapters to `model` in place (peft); only adapter parameters stay trainable.

    A `cfg.network_weights` file is the caller's to load into the new adapters, after this returns
    (library.networks.kohya.load_kohya_file_into: strict, same modules and ranks), so this module never imports the
    file format's.
    """
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg.validate()
    plan = plan_ranks(model, cfg)
    if not any(plan.values()):
        raise ConfigError("network: no layer gets an adapter (check network.target, block_dims and lr weights)")
    roots = dict(_roots(model, cfg))
    modules: list[AdaptedModule] = []
    for component, entries in plan.items():
        root = roots[component]
        if not entries:
            continue
        _inject(inject_adapter_in_model, cfg, entries, root)
        for path, (kind, rank, alpha, block) in sorted(entries.items()):
            layer = root.get_submodule(path)
            if not isinstance(layer, BaseTunerLayer):
                raise RuntimeError(f"peft did not adapt {component}.{path}")
            modules.append(AdaptedModule(component, path, kind, rank, alpha, block, layer))
    lr_w = block_lr_weights(model.family, cfg.down_lr_weight, cfg.mid_lr_weight, cfg.up_lr_weight,
                            cfg.block_lr_zero_threshold)
    network = Network(
        family=model.family, module_type="lora" if cfg.module == "locon" else cfg.module, adapter_name=ADAPTER_NAME,
        modules=modules, network_dim=cfg.network_dim, network_alpha=cfg.network_alpha, conv_dim=cfg.conv_dim,
        conv_alpha=cfg.conv_alpha, block_lr_weights=lr_w,
        loraplus_unet_ratio=cfg.loraplus_unet_lr_ratio or cfg.loraplus_lr_ratio,
        loraplus_te_ratio=cfg.loraplus_text_encoder_lr_ratio or cfg.loraplus_lr_ratio,
    )
    return network


def adapter_params(layer: Any, adapter: str) -> dict[str, nn.Parameter]:
    """peft attribute name ("lora_A", "hada_w1_a", "lora_magnitude_vector", ...) -> the adapter's parameter."""
    out: dict[str, nn.Parameter] = {}
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr, None)
        if holder is None or adapter not in holder:
            continue
        item = holder[adapter]
        out[attr] = item if isinstance(item, nn.Parameter) else item.weight
    return out


# ---------------------------------------------------------------------------------------------------------------
# Optimizer groups and max-norm.


def param_groups(network: Network, base_lr: float, unet_lr: float | None, te_lr: float | None) -> list[dict]:
    """Optimizer parameter groups, sd-scripts `prepare_optimizer_params` semantics, each with a "name".

    Text encoders share one group at te_lr (else base_lr); the UNet one group at unet_lr (else base_lr), or one per
    block ("unet_block<i>", lr x block lr weight) when block lr weights are set. With LoRA+ the up (B) matrices get
    their own "... plus" group at lr x ratio (Hayou et al. 2024, arXiv 2402.12354). A group whose lr is 0 is left
    out, as sd-scripts does (e.g. te_lr = 0 leaves the text encoders untrained).
    """
    buckets: dict[tuple[str, float, float], list[nn.Parameter]] = {}
    for m in network.modules:
        if m.component == "unet":
            lr = unet_lr if unet_lr is not None else base_lr
            name, ratio = "unet", network.loraplus_unet_ratio
            if network.block_lr_weights is not None:
                name, lr = f"unet_block{m.block}", lr * network.block_lr_weights[m.block]
        else:
            lr = te_lr if te_lr is not None else base_lr
            name, ratio = "text_encoder", network.loraplus_te_ratio
        for attr, p in adapter_params(m.layer, network.adapter_name).items():
            if ratio and attr == "lora_B":
                buckets.setdefault((f"{name} plus", lr * ratio, 0.0), []).append(p)
            else:
                buckets.setdefault((name, lr, 0.0), []).append(p)
    return [{"name": name, "params": ps, "lr": lr} for (name, lr, _), ps in buckets.items() if lr != 0]


@torch.no_grad()
def apply_max_norm(network: Network, max_norm: float) -> tuple[int, float, float]:
    """Rescale adapters whose weight delta has Frobenius norm > max_norm (sd-scripts `apply_max_norm_regularization`).

    Each over-norm adapter's delta is scaled by max_norm / norm, spread evenly over its factor matrices (LoRA: up and
    down each by sqrt(ratio); LoHa: 4 factors; LoKr: 2-4). Returns (modules scaled, mean norm, max norm) after scaling.
    """
    if network.module_type == "dora":
        raise ConfigError("max-norm (network.scale_weight_norms) is not defined for DoRA")
    scaled, norms = 0, []
    for m in network.modules:
        delta = m.layer.get_delta_weight(network.adapter_name)
        norm = delta.float().norm()
        ratio = min(1.0, max_norm / norm.item()) if norm > 0 else 1.0
        if ratio < 1.0:
            scaled += 1
            factors = adapter_params(m.layer, network.adapter_name)
            for p in factors.values():
                p.mul_(ratio ** (1.0 / len(factors)))
        norms.append(norm.item() * ratio)
    return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)
