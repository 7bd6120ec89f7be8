"""LoRA modes of `merge_models.py`, streamed in the single-file key space: LoRAs merged into a checkpoint, a LoRA
extracted from (tuned - base), a LoRA resized. The tensor math is library/networks/lora_tools.py (engineer L's);
this module only finds, for each kohya module, the single-file tensor (and rows of it) that the module changes.

kohya module names (DESIGN.md "LoRA (kohya format)") are built on a meta-device model of the input's family
(`kohya.kohya_weight_map` / `target_weight_map`: diffusers names); diffusers names are mapped to single-file keys:
- UNet: through the LDM/SGM module table `keymaps.unet_modules` (longest module-path prefix);
- transformers-layout text encoders (SD1, SDXL encoder 1): the same `text_model.` key under the file prefix;
- OpenCLIP text encoders (SD2, SDXL encoder 2): q / k / v are the three row blocks of the fused `in_proj_weight`
  (torch.nn.MultiheadAttention layout, open_clip transformer.py), the other layers are renamed.
SD3 LoRAs (diffusers / peft layout or sd-scripts') are named by library/merge/sd3_lora.py, and an extracted or resized
SD3 LoRA is written in the diffusers / peft layout train_lora.py writes by default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from library.config.merge import MergeRecipe
from library.config.network import NetworkConfig
from library.errors import ConfigError, ModelFileError
from library.merge import sd3_lora
from library.merge.blocks import block_slot, parse_block_alphas
from library.merge.recipe import check_compatible, joint_blocks, open_sources, write_merge
from library.merge.sd3_lora import Block
from library.merge.stream import TE_PARTS, TensorSource, read_json
from library.models.keymaps import UNET_PREFIX, unet_modules
from library.models.model import SDModel
from library.networks import kohya, lora_tools
from library.precision import DTYPES
from library.config.core import config_hash

# Target: (single-file key, which rows of it the layer is: a q/k/v block of a fused in_proj / qkv, SD3's halves
# swapped, or None for the whole tensor; sd3_lora.Block)
Target = tuple[str, Block]
# One LoRA module to merge: (name, tensors under kohya suffixes, target).
Module = tuple[str, dict[str, torch.Tensor], Target]
_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def run_lora_mode(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True) -> Path:
    match cfg.merge.mode:
        case "lora_merge":
            return merge_loras(cfg, recipe_text, progress=progress)
        case "lora_extract":
            return extract(cfg, recipe_text, progress=progress)
        case "lora_resize":
            return resize(cfg, recipe_text)
        case other:
            raise AssertionError(f"not a LoRA mode: {other!r}")


def meta_model(source: TensorSource) -> SDModel:
    """UNet and text encoder(s) of the source's family on the meta device (names only), from the source's own
    configs (diffusers folder) or the bundled configs of its family."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.configs import bundled_config_for

    config_dir = source.folder or bundled_config_for(source.family, source.prediction_type)
    unet_cfg = read_json(config_dir / "unet" / "config.json")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in unet_cfg.items() if not k.startswith("_")})
        tes = []
        for name, _, _ in TE_PARTS[source.family]:
            cfg = read_json(config_dir / name / "config.json")
            arch = cfg.get("architectures", [""])[0]
            cls = CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel
            tes.append(cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})))
    return SDModel(family=source.family, prediction_type=source.prediction_type, unet=unet, vae=None,  # type: ignore
                   text_encoders=tes, tokenizers=[], scheduler_config={}, source=source.name, config_dir=config_dir)


def single_file_target(weight: str, model: SDModel) -> Target:
    """'<component>.<module path>.weight' (kohya_weight_map's naming) -> the single-file key and q/k/v block."""
    component, _, rest = weight.partition(".")
    path = rest.removesuffix(".weight")
    if component == "unet":
        table = unet_modules(model.unet.config)
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            hit = table.get(".".join(parts[:n]))
            if hit is not None:
                return UNET_PREFIX + ".".join([hit, *parts[n:]]) + ".weight", None
        raise ModelFileError(f"UNet layer {path} has no single-file name")
    index = {"text_encoder": 0, "text_encoder_2": 1}[component]
    _, prefix, kind = TE_PARTS[model.family][index]
    if not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    if kind == "clip":
        return prefix + path + ".weight", None
    layer = path.removeprefix("text_model.encoder.layers.")
    n, _, module = layer.partition(".")
    if n.isdigit() and module.startswith("self_attn.") and module.split(".")[1] in _QKV:
        return f"{prefix}transformer.resblocks.{n}.attn.in_proj_weight", _QKV[module.split(".")[1]]
    if n.isdigit() and module in _OPENCLIP:
        return f"{prefix}transformer.resblocks.{n}.{_OPENCLIP[module]}.weight", None
    raise ModelFileError(f"{component} layer {path} has no OpenCLIP single-file name (not a LoRA target)")


def layer_weight(t: torch.Tensor, block: Block) -> torch.Tensor:
    """The rows of a single-file tensor that one layer's weight is, in that layer's row order."""
    if block is None:
        return t
    if block == "swap":
        h = t.shape[0] // 2
        return torch.cat([t[h:], t[:h]])
    d = t.shape[0] // 3
    return t[block * d:(block + 1) * d]


def set_layer_weight(t: torch.Tensor, block: Block, value: torch.Tensor) -> None:
    """Write a layer's (new) weight back into its rows of the single-file tensor `t` (in place)."""
    if block is None:
        t.copy_(value)
    elif block == "swap":
        h = t.shape[0] // 2
        t.copy_(torch.cat([value[h:], value[:h]]))
    else:
        d = t.shape[0] // 3
        t[block * d:(block + 1) * d] = value


# ---------------------------------------------------------------------------------------------------------------
# Merge LoRAs into a checkpoint.


def merge_loras(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True) -> Path:
    """model_a + sum over [[lora]] of strength * block weight(slot) * delta, each LoRA checked against the family."""
    sources = open_sources([cfg.merge.model_a], ["merge.model_a"])
    a = sources[0]
    try:
        modules_of = sd3_modules(a) if a.family == "sd3" else kohya_modules(a)
        plan: dict[str, list[tuple[dict[str, torch.Tensor], float, Block]]] = {}
        for i, entry in enumerate(cfg.lora):
            weights = parse_block_alphas(entry.block_weights, a.family, 1.0,  # type: ignore[arg-type]
                                         what=f"lora[{i}].block_weights", n_blocks=joint_blocks(a))
            modules = modules_of(Path(entry.path).expanduser())
            if not modules:  # merged as nothing, silently, otherwise
                raise ModelFileError(f"lora[{i}].path = '{entry.path}' holds no LoRA modules (an empty file?)")
            for _, module, (key, block) in modules:
                strength = entry.strength * weights[block_slot(key, a.family)]  # type: ignore[arg-type]
                # Named "m" for lora_tools (a kohya name has no dots; a diffusers / peft one has).
                plan.setdefault(key, []).append(({f"m.{s}": t for s, t in module.items()}, strength, block))

        def combine(key: str, ts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
            w = ts[0]
            for module, strength, block in plan.get(key, []):
                layer = layer_weight(w, block)
                set_layer_weight(w, block, lora_tools.merge_lora({key: layer}, module, {"m": key}, strength)[key])
            return w

        return write_merge(sources, a.keys(), combine, False, cfg, recipe_text, progress=progress)
    finally:
        a.close()


def kohya_modules(a: TensorSource) -> Callable[[Path], list[Module]]:
    """Reads a kohya LoRA of an SD1 / SD2 / SDXL model into its modules and their targets in `a`."""
    model = meta_model(a)
    names = kohya.kohya_weight_map(model)

    def read(path: Path) -> list[Module]:
        tensors, _ = kohya.read_kohya(path)
        if sd3_lora.is_peft(tensors) or any(k.startswith("lora_unet_joint_blocks_") for k in tensors):
            raise ModelFileError(f"{path} is an SD3 LoRA (keys such as '{next(iter(tensors))}') but {a.name} is an "
                                 f"{a.family} model: merge it into an SD3 checkpoint")
        found = []
        for name, module in lora_tools.group_modules(tensors).items():
            if name not in names:
                raise ModelFileError(f"{path}: LoRA module {name} has no layer in the {a.family} model "
                                     f"{a.name} (a LoRA for another family, or not kohya format?)")
            key, block = single_file_target(names[name], model)
            if key not in a.entries:
                raise ModelFileError(f"{path}: LoRA module {name} targets '{key}', which {a.name} lacks")
            found.append((name, module, (key, block)))
        return found

    return read


def sd3_modules(a: TensorSource) -> Callable[[Path], list[Module]]:
    """Reads an SD3 LoRA (either layout, sd3_lora.file_modules) into its modules and their targets in `a`."""

    def read(path: Path) -> list[Module]:
        tensors, _ = kohya.read_kohya(path)
        return sd3_lora.file_modules(tensors, path, a.entries)

    return read


# ---------------------------------------------------------------------------------------------------------------
# Extract and resize.


TE_NAMES = ("lora_te", "text_encoder")  # text-encoder modules: kohya names, SD3's diffusers / peft names


def extract(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True) -> Path:
    """A LoRA of model_b - model_a, one layer at a time (lora_tools.extract_lora per module): kohya format for
    SD1 / SD2 / SDXL, the diffusers / peft layout for SD3."""
    from tqdm import tqdm

    ex = cfg.extract
    sources = open_sources([cfg.merge.model_a, cfg.merge.model_b], ["merge.model_a", "merge.model_b"])
    base, tuned = sources
    try:
        check_compatible(sources)
        targets = extract_targets(base, cfg)
        te = [n for n in targets if n.startswith(TE_NAMES)]
        te_changed = any(_diff(base, tuned, *targets[n]).abs().max().item() > ex.min_diff for n in te)
        modules: dict[str, dict[str, torch.Tensor]] = {}
        quantile = None if ex.clamp_quantile >= 1 else ex.clamp_quantile
        for name in tqdm(sorted(targets), desc="extracting", disable=not progress, dynamic_ncols=True):
            if name.startswith(TE_NAMES) and not te_changed:
                continue  # sd-scripts leaves the text encoder out when it did not change
            key, block = targets[name]
            a, b = layer_weight(base.get(key), block), layer_weight(tuned.get(key), block)
            got = lora_tools.extract_lora({key: a}, {key: b}, {name: key}, ex.rank, ex.conv_rank or None,
                                          quantile, min_diff=-1.0)
            modules[name] = {k[len(name) + 1:]: v for k, v in got.items()}
        return _save_extracted(modules, base, cfg, recipe_text)
    finally:
        for s in sources:
            s.close()


def extract_targets(base: TensorSource, cfg: MergeRecipe) -> dict[str, Target]:
    """Module name -> target of every layer an extracted LoRA adapts (the training default, 'attn_mlp', plus
    3x3 convs with extract.conv_rank); SD3: sd3_lora.extract_targets."""
    ex = cfg.extract
    if base.family == "sd3":
        if ex.conv_rank:
            raise ConfigError(f"extract.conv_rank = {ex.conv_rank}: an SD3 LoRA adapts no convolutions (the MMDiT "
                              "has none); set extract.conv_rank = 0")
        return sd3_lora.extract_targets(base.entries, ex.text_encoder)
    model = meta_model(base)
    net = NetworkConfig(network_dim=ex.rank, network_alpha=float(ex.rank), conv_dim=ex.conv_rank,
                        conv_alpha=float(max(ex.conv_rank, 1)), target="attn_mlp+conv" if ex.conv_rank else "attn_mlp",
                        train_unet_only=not ex.text_encoder)
    targets = {name: single_file_target(w, model) for name, w in kohya.target_weight_map(model, net).items()}
    return {n: t for n, t in targets.items() if t[0] in base.entries}  # a smaller model than its configs


def _save_extracted(modules: dict[str, dict[str, torch.Tensor]], base: TensorSource, cfg: MergeRecipe,
                    recipe_text: str) -> Path:
    ex, path = cfg.extract, Path(cfg.output.path).expanduser()
    precision = DTYPES[cfg.output.precision]
    if base.family == "sd3":
        from library.models.sd3.single_file import variant_of_keys
        from library.networks.sd3_keys import save_sd3_lora

        meta = sd3_lora.lora_metadata(variant_of_keys(base.entries), ex.rank, path.stem, base.name, recipe_text,
                                      config_hash(cfg))
        return save_sd3_lora(path, {k: v.to(precision) for k, v in sd3_lora.to_peft(modules).items()}, meta)
    meta = kohya.metadata_for(
        family=base.family, v_prediction=base.prediction_type == "v_prediction",
        network_module="locon" if ex.conv_rank else "lora", network_dim=ex.rank, network_alpha=float(ex.rank),
        network_args={"conv_dim": ex.conv_rank, "conv_alpha": ex.conv_rank} if ex.conv_rank else None,
        title=path.stem, base_model=base.name, config_text=recipe_text, config_hash=config_hash(cfg))
    out = {f"{name}.{s}": v if s == "alpha" else v.to(precision) for name, t in modules.items() for s, v in t.items()}
    return kohya.save_kohya(path, out, meta)


def _diff(base: TensorSource, tuned: TensorSource, key: str, block: Block) -> torch.Tensor:
    return layer_weight(tuned.get(key).float(), block) - layer_weight(base.get(key).float(), block)


def resize(cfg: MergeRecipe, recipe_text: str) -> Path:
    """extract.lora at rank extract.rank (3x3 convs extract.conv_rank, 0 = the same rank), metadata kept. An SD3
    LoRA in the diffusers / peft layout stays in it (sd3_lora.to_peft: the scale stays folded into lora_B)."""
    ex = cfg.extract
    path = Path(ex.lora).expanduser()
    tensors, metadata = kohya.read_kohya(path)
    if sd3_lora.is_peft(tensors):
        return _resize_peft(tensors, metadata, path, cfg, recipe_text)
    out = lora_tools.resize_lora(tensors, ex.rank, ex.conv_rank or None)
    meta: dict[str, Any] = dict(metadata)
    meta["ss_network_dim"] = str(ex.rank)
    args = json.loads(meta.get("ss_network_args") or "{}")
    if ex.conv_rank and "conv_dim" in args:
        args["conv_dim"] = ex.conv_rank
        meta["ss_network_args"] = json.dumps(args)
    meta["sdtk_merge_recipe"] = recipe_text
    for k in ("sshs_model_hash", "sshs_legacy_hash"):
        meta.pop(k, None)  # recomputed by save_kohya
    if any(k.startswith(("lora_unet_joint_blocks_", "lora_te3_")) for k in out):  # SD3, sd-scripts' layout
        from library.networks.sd3_keys import save_sd3_lora

        return save_sd3_lora(Path(cfg.output.path).expanduser(), out, meta)
    return kohya.save_kohya(Path(cfg.output.path).expanduser(), out, meta)


def _resize_peft(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path, cfg: MergeRecipe,
                 recipe_text: str) -> Path:
    """Resize an SD3 LoRA of the diffusers / peft layout; ss_network_dim becomes the new rank and ss_network_alpha
    keeps the recorded scale alpha / dim (our loader unfolds the folded scale by them)."""
    from library.networks.sd3_keys import save_sd3_lora

    ex = cfg.extract
    modules = sd3_lora.peft_modules(tensors, path)
    names = {f"m{i}": name for i, name in enumerate(modules)}  # kohya-style names without dots for lora_tools
    flat = {f"m{i}.{s}": t for i, (name, module) in enumerate(modules.items()) for s, t in module.items()}
    resized = lora_tools.group_modules(lora_tools.resize_lora(flat, ex.rank))
    out = sd3_lora.to_peft({names[m]: t for m, t in resized.items()})
    meta = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    try:
        scale = float(meta["ss_network_alpha"]) / float(meta["ss_network_dim"])
    except (KeyError, ValueError, ZeroDivisionError):
        scale = 1.0
    meta.update(ss_network_dim=str(ex.rank), ss_network_alpha=repr(scale * ex.rank), sdtk_merge_recipe=recipe_text)
    return save_sd3_lora(Path(cfg.output.path).expanduser(), out, meta)
