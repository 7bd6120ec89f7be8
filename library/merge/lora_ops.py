"""LoRA modes of `merge_models.py`, streamed in the single-file key space: LoRAs merged into a checkpoint, a LoRA
extracted from (tuned - base), a LoRA resized. The tensor math is library/networks/lora_tools.py (engineer L's);
this module only finds, for each kohya module, the single-file tensor (and rows of it) that the module changes.

kohya module names (DESIGN.md "LoRA (kohya format)") are built on a meta-device model of the input's family
(`kohya.kohya_weight_map` / `target_weight_map`: diffusers names); diffusers names are mapped to single-file keys:
- UNet: through the LDM/SGM module table `keymaps.unet_modules` (longest module-path prefix);
- transformers-layout text encoders (SD1, SDXL encoder 1): the same `text_model.` key under the file prefix;
- OpenCLIP text encoders (SD2, SDXL encoder 2): q / k / v are the three row blocks of the fused `in_proj_weight`
  (torch.nn.MultiheadAttention layout, open_clip transformer.py), the other layers are renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from library.config.merge import MergeRecipe
from library.config.network import NetworkConfig
from library.errors import ModelFileError
from library.merge.blocks import block_slot, parse_block_alphas
from library.merge.recipe import check_compatible, open_sources, write_merge
from library.merge.stream import TE_PARTS, TensorSource, read_json
from library.models.keymaps import UNET_PREFIX, unet_modules
from library.models.model import SDModel
from library.networks import kohya, lora_tools
from library.precision import DTYPES
from library.config.core import config_hash

# Target: (single-file key, index of the q/k/v row block of a fused in_proj, or None for the whole tensor)
Target = tuple[str, int | None]
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


def _rows(t: torch.Tensor, block: int | None) -> slice:
    if block is None:
        return slice(None)
    d = t.shape[0] // 3
    return slice(block * d, (block + 1) * d)


# ---------------------------------------------------------------------------------------------------------------
# Merge LoRAs into a checkpoint.


def merge_loras(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True) -> Path:
    """model_a + sum over [[lora]] of strength * block weight(slot) * delta, each LoRA checked against the family."""
    sources = open_sources([cfg.merge.model_a], ["merge.model_a"])
    a = sources[0]
    try:
        model = meta_model(a)
        names = kohya.kohya_weight_map(model)
        plan: dict[str, list[tuple[str, dict[str, torch.Tensor], float, int | None]]] = {}
        for i, entry in enumerate(cfg.lora):
            tensors, _ = kohya.read_kohya(Path(entry.path).expanduser())
            weights = parse_block_alphas(entry.block_weights, a.family, 1.0,  # type: ignore[arg-type]
                                         what=f"lora[{i}].block_weights")
            for name, module in lora_tools.group_modules(tensors).items():
                if name not in names:
                    raise ModelFileError(f"{entry.path}: LoRA module {name} has no layer in the {a.family} model "
                                         f"{a.name} (a LoRA for another family, or not kohya format?)")
                key, block = single_file_target(names[name], model)
                if key not in a.entries:
                    raise ModelFileError(f"{entry.path}: LoRA module {name} targets '{key}', which {a.name} lacks")
                strength = entry.strength * weights[block_slot(key, a.family)]  # type: ignore[arg-type]
                plan.setdefault(key, []).append((name, {f"{name}.{s}": t for s, t in module.items()}, strength,
                                                 block))

        def combine(key: str, ts: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
            w = ts[0]
            for name, module, strength, block in plan.get(key, []):
                rows = _rows(w, block)
                w[rows] = lora_tools.merge_lora({key: w[rows]}, module, {name: key}, strength)[key]
            return w

        return write_merge(sources, a.keys(), combine, False, cfg, recipe_text, progress=progress)
    finally:
        a.close()


# ---------------------------------------------------------------------------------------------------------------
# Extract and resize.


def extract(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True) -> Path:
    """A kohya LoRA of model_b - model_a, one layer at a time (lora_tools.extract_lora per module)."""
    from tqdm import tqdm

    ex = cfg.extract
    sources = open_sources([cfg.merge.model_a, cfg.merge.model_b], ["merge.model_a", "merge.model_b"])
    base, tuned = sources
    try:
        check_compatible(sources)
        model = meta_model(base)
        net = NetworkConfig(network_dim=ex.rank, network_alpha=float(ex.rank), conv_dim=ex.conv_rank,
                            conv_alpha=float(max(ex.conv_rank, 1)), target="attn_mlp+conv" if ex.conv_rank else "attn_mlp",
                            train_unet_only=not ex.text_encoder)
        targets = {name: single_file_target(w, model) for name, w in kohya.target_weight_map(model, net).items()}
        targets = {n: t for n, t in targets.items() if t[0] in base.entries}  # a smaller model than its configs
        te = [n for n in targets if n.startswith("lora_te")]
        te_changed = any(_diff(base, tuned, *targets[n]).abs().max().item() > ex.min_diff for n in te)
        out: dict[str, torch.Tensor] = {}
        quantile = None if ex.clamp_quantile >= 1 else ex.clamp_quantile
        for name in tqdm(sorted(targets), desc="extracting", disable=not progress, dynamic_ncols=True):
            if name.startswith("lora_te") and not te_changed:
                continue  # sd-scripts leaves the text encoder out when it did not change
            key, block = targets[name]
            ta, tb = base.get(key), tuned.get(key)
            a, b = ta[_rows(ta, block)], tb[_rows(tb, block)]
            out.update(lora_tools.extract_lora({key: a}, {key: b}, {name: key}, ex.rank, ex.conv_rank or None,
                                               quantile, min_diff=-1.0))
        meta = kohya.metadata_for(
            family=base.family, v_prediction=base.prediction_type == "v_prediction",
            network_module="locon" if ex.conv_rank else "lora", network_dim=ex.rank, network_alpha=float(ex.rank),
            network_args={"conv_dim": ex.conv_rank, "conv_alpha": ex.conv_rank} if ex.conv_rank else None,
            title=Path(cfg.output.path).stem, base_model=base.name, config_text=recipe_text,
            config_hash=config_hash(cfg))
        precision = DTYPES[cfg.output.precision]
        out = {k: v if k.endswith(".alpha") else v.to(precision) for k, v in out.items()}
        return kohya.save_kohya(Path(cfg.output.path).expanduser(), out, meta)
    finally:
        for s in sources:
            s.close()


def _diff(base: TensorSource, tuned: TensorSource, key: str, block: int | None) -> torch.Tensor:
    a, b = base.get(key).float(), tuned.get(key).float()
    return (b - a)[_rows(a, block)]


def resize(cfg: MergeRecipe, recipe_text: str) -> Path:
    """extract.lora at rank extract.rank (3x3 convs extract.conv_rank, 0 = the same rank), metadata kept."""
    ex = cfg.extract
    tensors, metadata = kohya.read_kohya(Path(ex.lora).expanduser())
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
    return kohya.save_kohya(Path(cfg.output.path).expanduser(), out, meta)
