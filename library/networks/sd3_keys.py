"""SD3 LoRA: which MMDiT / text-encoder layers are adapted, and the two file layouts users load.

Targets (`network.target`, the same names as the UNet families):
- "attn": the attention projections of every JointTransformerBlock (image stream to_q/k/v, to_out.0; context stream
  add_q/k/v_proj, to_add_out; SD3.5 Medium's second image attention attn2.*);
- "attn_mlp" (default): also both streams' MLPs (ff.net.0.proj / ff.net.2, ff_context.*);
- "all_linear": also the adaLN modulation linears (norm1.linear, norm1_context.linear).
Text encoders (unless network.train_unet_only): CLIP-L / CLIP-G attention and MLP linears, as for SDXL; T5 only when
asked (`train_t5`, sd-scripts' default is off: T5 is large and usually cached).

Layouts:
- "diffusers" (default): `transformer.<module path>.lora_A.weight` / `.lora_B.weight` and `text_encoder[_2|_3].<path>`
  (CLIP paths with `text_model.`), the peft layout diffusers' `StableDiffusion3Pipeline.load_lora_weights` reads
  natively (diffusers has no converter for sd-scripts' SD3 names) and ComfyUI maps too (comfy/lora.py
  `model_lora_keys_unet`, SD3 branch: `transformer.<diffusers key>` through `comfy.utils.mmdit_to_diffusers`, q/k/v
  placed into the fused qkv by offset). The file has no alpha tensors, so the
  scale alpha / rank is folded into lora_B (both readers then apply scale 1); `ss_network_alpha` / `ss_network_dim`
  record the trained values and loading unfolds it.
- "sd_scripts": `lora_unet_<MMDiT path with _>` (`lora_unet_joint_blocks_0_x_block_attn_qkv`), `lora_te1_` /
  `lora_te2_` / `lora_te3_`, tensors `lora_down.weight`, `lora_up.weight`, `alpha` (sd-scripts networks/lora_sd3.py;
  ComfyUI's `model_lora_keys_unet` maps `lora_unet_<key with _>` for every `diffusion_model.` weight). sd-scripts fuses q, k, v into one `qkv` layer; our separate q, k, v LoRAs of rank r are
  written exactly as one rank-3r LoRA: down = [A_q; A_k; A_v], up = blockdiag(B_q, B_k, B_v), alpha' = 3 alpha, so
  up @ down * alpha' / 3r = [B_q A_q; B_k A_k; B_v A_v] * alpha / r. Reading back needs that block-diagonal up (what
  we write); a fused LoRA trained by sd-scripts has no exact split into three rank-r LoRAs and is refused by name.
  Deltas are of the tensors as the file stores them: the last block's context adaLN linear (`all_linear`), stored
  with its (shift, scale) halves in the other order than diffusers' (scale, shift), gets lora_up's halves exchanged.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from torch import nn

from library.errors import ConfigError, ModelFileError

Layout = Literal["diffusers", "sd_scripts"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3")
DIFFUSERS_PREFIX = {"unet": "transformer", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
                    "text_encoder_3": "text_encoder_3"}
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2",
                "text_encoder_3": "lora_te3"}
_CLIP_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
_T5_CLASSES = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")
_ATTN_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def select_sd3_targets(root: nn.Module, component: str, target: str) -> list[str]:
    """Module paths of the Linear layers `target` adapts in one component (see the module docstring)."""
    base = target.removesuffix("+conv")
    if base != target:
        raise ConfigError(f"network.target = '{target}': SD3 blocks have no convolutions; use '{base}'")
    found: list[str] = []
    for name, module in root.named_modules():
        cls = type(module).__name__
        if component == "unet" and cls == "JointTransformerBlock":
            for child, layer in module.named_modules():
                if not isinstance(layer, nn.Linear):
                    continue
                head, _, _ = child.partition(".")
                is_attn = head in ("attn", "attn2") and child.split(".", 1)[1] in _ATTN_LEAVES
                is_mlp = head in ("ff", "ff_context")
                if is_attn or (is_mlp and base in ("attn_mlp", "all_linear")) or base == "all_linear":
                    found.append(f"{name}.{child}")
        elif component != "unet" and (cls in _CLIP_CLASSES or cls in _T5_CLASSES):
            if base == "attn" and cls.endswith(("MLP", "DenseGatedActDense", "DenseActDense")):
                continue
            found += [f"{name}.{c}" for c, layer in module.named_modules() if c and isinstance(layer, nn.Linear)]
    return sorted(set(found))


def plan_sd3(model: Any, cfg: Any, *, train_t5: bool | None = None) -> dict[str, dict[str, tuple[str, int, float, int]]]:
    """component -> module path -> (kind, rank, alpha, block) as library/networks/lora.py `plan_ranks` returns it."""
    if cfg.block_dims or cfg.block_alphas or cfg.conv_block_dims or cfg.conv_block_alphas or \
            cfg.down_lr_weight or cfg.mid_lr_weight or cfg.up_lr_weight:
        raise ConfigError("network: per-block dims, alphas and lr weights follow the UNet's blocks; SD3 has none "
                          "(remove block_dims / block_alphas / *_lr_weight)")
    if cfg.module != "lora":  # state_dict_sd3 writes plain LoRA only: refused here, not after training
        raise ConfigError(f"network.network_module = '{cfg.module}' is not offered for SD3 (plain LoRA only): the "
                          "SD3 LoRA files written (diffusers/peft or sd-scripts layout) hold no DoRA magnitudes, and "
                          "neither SD3 loader (diffusers, ComfyUI) reads our LoHa/LoKr layout for MMDiT; set "
                          "network.network_module = 'lora'")
    train_t5 = bool(getattr(cfg, "train_t5xxl", False)) if train_t5 is None else train_t5
    roots: list[tuple[str, nn.Module]] = []
    if not cfg.train_text_encoder_only:
        roots.append(("unet", model.unet))
    if not cfg.train_unet_only:
        roots += [(COMPONENTS[1 + i], te) for i, te in enumerate(model.text_encoders) if i < 2 or train_t5]
    return {c: {p: ("linear", int(cfg.network_dim), float(cfg.network_alpha), -1)
                for p in select_sd3_targets(root, c, cfg.target)} for c, root in roots}


# ---------------------------------------------------------------------------------------------------------------
# Names.


def _te_path(component: str, path: str) -> str:
    """CLIP paths carry `text_model.` in files (transformers 5 module names lack it); T5 paths are as they are."""
    if component in ("text_encoder", "text_encoder_2") and not path.startswith("text_model."):
        return "text_model." + path
    return path


def diffusers_name(component: str, path: str) -> str:
    return f"{DIFFUSERS_PREFIX[component]}.{_te_path(component, path) if component != 'unet' else path}"


def _mmdit_file_module(config: Mapping[str, Any], path: str) -> tuple[str, int | None]:
    """(sd-scripts MMDiT module path, index in the fused qkv or None) of a diffusers transformer Linear."""
    from library.models.sd3.keymaps import mmdit_modules

    modules, fused, _ = mmdit_modules(config)
    if path in modules:
        return modules[path], None
    for group, (file_module, _) in fused.items():
        part = path[len(group):] if path.startswith(group) else ""
        if part in ("q", "k", "v", "q_proj", "k_proj", "v_proj"):
            return file_module, "qkv".index(part[0])
    raise ModelFileError(f"transformer.{path}: no sd-scripts name is known for this layer")


def stored_swapped(config: Mapping[str, Any], component: str, path: str) -> bool:
    """Whether the single file stores this layer's output rows with their halves exchanged (the last block's
    context adaLN linear, keymaps.mmdit_modules): its sd-scripts LoRA then has lora_up's halves exchanged too, so
    that up @ down is the delta of the stored tensor, as sd-scripts and ComfyUI apply it."""
    from library.models.sd3.keymaps import mmdit_modules

    return component == "unet" and path in mmdit_modules(config)[2]


def _swap_rows(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def sd_scripts_name(config: Mapping[str, Any], component: str, path: str) -> tuple[str, int | None]:
    if component == "unet":
        module, index = _mmdit_file_module(config, path)
    else:
        module, index = _te_path(component, path), None
    return f"{KOHYA_PREFIX[component]}_{module.replace('.', '_')}", index


# ---------------------------------------------------------------------------------------------------------------
# Save / load.


def _lora_pair(m: Any, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    layer = m.layer
    if adapter not in getattr(layer, "lora_A", {}):
        raise ModelFileError(f"{m.component}.{m.path}: not a LoRA layer (SD3 files hold plain LoRA only)")
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def state_dict_sd3(model: Any, network: Any, layout: Layout = "diffusers",
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The network's LoRA tensors in `layout` (see the module docstring); every trained tensor lands in one key."""
    if network.module_type != "lora":
        raise ModelFileError(f"SD3 LoRA files hold plain LoRA; this network is {network.module_type!r}")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[int, Any]]] = {}
    for m in network.modules:
        a, b = (t.detach().to("cpu").float() for t in _lora_pair(m, network.adapter_name))
        if layout == "diffusers":
            name = diffusers_name(m.component, m.path)
            out[f"{name}.lora_A.weight"] = a
            out[f"{name}.lora_B.weight"] = b * (m.alpha / m.rank)
        else:
            name, index = sd_scripts_name(model.unet.config, m.component, m.path)
            if index is None:
                if stored_swapped(model.unet.config, m.component, m.path):
                    b = _swap_rows(b)
                out.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                            f"{name}.alpha": torch.tensor(float(m.alpha))})
            else:
                fused.setdefault(name, []).append((index, m))
    for name, parts in fused.items():
        parts.sort(key=lambda p: p[0])
        if [i for i, _ in parts] != [0, 1, 2] or len({(m.rank, m.alpha) for _, m in parts}) != 1:
            raise ModelFileError(f"{name}: q, k and v need LoRAs of one rank and alpha to be written fused (qkv)")
        pairs = [tuple(t.detach().to("cpu").float() for t in _lora_pair(m, network.adapter_name)) for _, m in parts]
        out[f"{name}.lora_down.weight"] = torch.cat([a for a, _ in pairs], dim=0)
        out[f"{name}.lora_up.weight"] = torch.block_diag(*[b for _, b in pairs])
        out[f"{name}.alpha"] = torch.tensor(3.0 * parts[0][1].alpha)
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


@torch.no_grad()
def load_sd3_into(model: Any, network: Any, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                  source: str = "LoRA file") -> None:
    """Load a file in either layout into the network's adapters; strict (every key used, shapes and ranks match)."""
    layout: Layout = "sd_scripts" if any(k.startswith("lora_") for k in sd) else "diffusers"
    want = state_dict_sd3(model, network, layout)
    missing = sorted(set(want) - set(sd))
    stray = sorted(set(sd) - set(want))
    if missing or stray:
        what = f"unexpected key '{stray[0]}'" if stray else f"missing key '{missing[0]}'"
        raise ModelFileError(f"{source}: {what} (the network built from the config adapts other layers or ranks)")
    for key, t in sd.items():
        if tuple(t.shape) != tuple(want[key].shape):
            raise ModelFileError(f"{source}: '{key}' has shape {list(t.shape)}, the network expects "
                                 f"{list(want[key].shape)}")
    fused_parts: dict[str, list[tuple[int, Any]]] = {}
    for m in network.modules:
        a, b = _lora_pair(m, network.adapter_name)
        if layout == "diffusers":
            name = diffusers_name(m.component, m.path)
            alpha = float(metadata.get("ss_network_alpha", m.alpha))
            rank = int(metadata.get("ss_network_dim", m.rank))
            a.copy_(sd[f"{name}.lora_A.weight"])
            b.copy_(sd[f"{name}.lora_B.weight"].float() * (rank / alpha))
            continue
        name, index = sd_scripts_name(model.unet.config, m.component, m.path)
        if index is None:
            up = sd[f"{name}.lora_up.weight"]
            a.copy_(sd[f"{name}.lora_down.weight"])
            b.copy_(_swap_rows(up) if stored_swapped(model.unet.config, m.component, m.path) else up)
        else:
            fused_parts.setdefault(name, []).append((index, m))
    for name, parts in fused_parts.items():
        down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
        r, o = down.shape[0] // 3, up.shape[0] // 3
        blocks = [up[i * o:(i + 1) * o, j * r:(j + 1) * r] for i in range(3) for j in range(3) if i != j]
        if any(blk.abs().max() > 0 for blk in blocks):
            raise ModelFileError(f"{source}: '{name}' is a fused qkv LoRA whose up matrix is not block-diagonal "
                                 "(trained fused, e.g. by sd-scripts): it has no exact split into q, k, v adapters")
        for index, m in parts:
            a, b = _lora_pair(m, network.adapter_name)
            a.copy_(down[index * r:(index + 1) * r])
            b.copy_(up[index * o:(index + 1) * o, index * r:(index + 1) * r])


def metadata_sd3(model: Any, network: Any, layout: Layout) -> dict[str, str]:
    """`ss_*` / `modelspec.*` for an SD3 LoRA (sd-scripts' names; its SD3 variant strings, families.SD3_VARIANTS)."""
    from library.models.families import SD3_VARIANTS, sd3_variant

    variant = SD3_VARIANTS[sd3_variant(dict(model.unet.config))]
    return {
        "ss_network_module": "networks.lora_sd3" if layout == "sd_scripts" else "networks.lora",
        "ss_network_dim": str(network.network_dim), "ss_network_alpha": repr(float(network.network_alpha)),
        "ss_base_model_version": variant.ss_base_model_version,
        "modelspec.architecture": f"{variant.architecture}/lora", "sdtk_lora_layout": layout,
    }


PREFIXES = {"diffusers": tuple(f"{p}." for p in DIFFUSERS_PREFIX.values()),
            "sd_scripts": tuple(f"{p}_" for p in KOHYA_PREFIX.values())}


def save_sd3_lora(path: Any, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Any:
    """Write an SD3 LoRA atomically as .safetensors (library/networks/lora_file.py: no inf / NaN after the cast,
    sshs hashes added), once every key has its layout's prefix; the layout is read from the keys."""
    from library.networks.lora_file import write_lora_file

    layout: Layout = "sd_scripts" if any(k.startswith("lora_") for k in state_dict) else "diffusers"
    bad = [k for k in state_dict if not k.startswith(PREFIXES[layout])]
    if bad:
        raise ModelFileError(f"refusing to write {path}: key {bad[0]} lacks the {layout} prefixes "
                             f"({', '.join(PREFIXES[layout])})")
    return write_lora_file(path, state_dict, metadata)


def load_sd3_file_into(model: Any, network: Any, path: Any) -> dict[str, str]:
    """Read an SD3 LoRA file (weights only, header checked) into the network; returns its metadata."""
    from library.models.safe_load import open_tensor_file

    f = open_tensor_file(path)
    load_sd3_into(model, network, {k: f[k] for k in f.keys()}, f.metadata, source=str(path))
    return dict(f.metadata)
