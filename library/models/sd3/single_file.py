"""SD3 / SD3.5 single files: detect, load into an `SDModel` (strict key maps, weights-only reading), save one.

Load: the header's keys pick the layout (`joint_blocks.N.x_block.attn.ln_k` -> q/k norm, `x_block.attn2` -> SD3.5
Medium's dual attention; sd-scripts' `analyze_state_dict_state` rule), the bundled config of that variant (or
`model.config_dir`) builds the modules on the meta device, every tensor's stored shape is checked, and the strict
maps of keymaps.py assign the weights. Text encoders come from the file when it holds them, else from
`model.clip_l` / `model.clip_g` / `model.t5xxl` (separate files, text_encoders.py); T5 is optional.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from library.errors import ModelFileError
from library.models.keymaps import KeyMapError, vae_keymap
from library.models.keymaps import from_ldm as vae_from_file
from library.models.keymaps import to_ldm as vae_to_file
from library.models.model import SDModel
from library.models.safe_load import TensorView, open_tensor_file
from library.models.single_file_write import check_single_file_target, write_single_file
from library.models.sd3 import keymaps as km

MARKER = km.MMDIT_PREFIX + "joint_blocks.0."
# Keys released text-encoder sections carry that are no weight of the transformers module: CLIP's position ids
# (a buffer), OpenCLIP's contrastive temperature, and T5's second name for the tied embedding (stable-diffusion.cpp
# lists it as "only used during training"). Dropped on load, never written.
IGNORED_SUFFIXES = ("text_model.embeddings.position_ids", "logit_scale", "encoder.embed_tokens.weight")


def is_sd3_keys(keys: Iterable[str]) -> bool:
    return any(k.startswith(MARKER) for k in keys)


def variant_of_keys(keys: Iterable[str], prefix: str = km.MMDIT_PREFIX) -> str:
    """sd3_medium | sd35_medium | sd35_large, by sd-scripts' analyze_state_dict_state rule (see families.py)."""
    keys = list(keys)
    if not any(k.startswith(prefix) and k.endswith(".attn.ln_k.weight") for k in keys):
        return "sd3_medium"
    return "sd35_medium" if any(".x_block.attn2." in k for k in keys if k.startswith(prefix)) else "sd35_large"


def model_parts(model: SDModel) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """(name, module, key map, state dict in key-map form) for every part, in file order."""
    from library.models.keymaps_clip import te_state_dict

    sd_t = model.unet.state_dict()
    sd_v = model.vae.state_dict()
    parts: list[tuple[str, Any, Any, dict[str, Any]]] = [
        ("transformer", model.unet, km.mmdit_keymap(model.unet.config, sd_t.keys()), sd_t),
        ("vae", model.vae, vae_keymap(model.vae.config, sd_v.keys()), sd_v),
    ]
    for name, prefix, te in zip(("clip_l", "clip_g", "t5xxl"), km.TE_PREFIXES, model.text_encoders):
        sd = te_state_dict(te) if name != "t5xxl" else {k: v for k, v in te.state_dict().items()
                                                         if not k.endswith(IGNORED_SUFFIXES)}
        parts.append((name, te, km.identity_keymap(prefix, sd.keys(), name), sd))
    return parts


def model_to_sd3_file(model: SDModel) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, _, keymap, sd in model_parts(model):
        out.update(vae_to_file(sd, keymap) if name == "vae" else km.to_file(sd, keymap))
    return out


def save_sd3_single_file(model: SDModel, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                         metadata: Mapping[str, str] | None = None) -> None:
    """Write `model` as one `.safetensors` file in the released layout (atomic), floating tensors in `dtype`;
    `metadata` (str -> str) goes into the header, plus `modelspec.architecture` unless given."""
    from library.models.families import SD3_VARIANTS, sd3_variant

    path = Path(path)
    meta = check_single_file_target(path, dtype, metadata)
    meta.setdefault("modelspec.architecture", SD3_VARIANTS[sd3_variant(dict(model.unet.config))].architecture)
    write_single_file(path, model_to_sd3_file(model), dtype, meta)


def load_sd3_single_file(path: str | os.PathLike, cfg: Any) -> SDModel:
    """Load an SD3-family single file (`cfg`: a ModelConfig). Tensors keep the file's dtype."""
    return load_sd3_tensors(open_tensor_file(path), cfg)


def load_sd3_tensors(f: Any, cfg: Any) -> SDModel:
    """`load_sd3_single_file` on an opened file: `f` maps key -> tensor with `.shapes`, `.metadata`, `.path` (a
    safe_load.TensorFile, or any mapping of that shape, e.g. meta tensors of a full-size layout in tests)."""
    from library.models.sd3 import text_encoders as tes
    from library.models.sd3.load import build_empty, config_folder, scheduler_config, tokenizers_for

    path = f.path
    variant = variant_of_keys(f.keys())
    config_dir = config_folder(cfg, variant)
    te_in_file = [any(k.startswith(p) for k in f.keys()) for p in km.TE_PREFIXES]
    use_t5 = bool(getattr(cfg, "use_t5", True)) and (te_in_file[2] or bool(getattr(cfg, "t5xxl", "")))
    transformer, vae, encoders = build_empty(config_dir, use_t5=use_t5, path=f.path)
    names = {k: k for k in f.keys() if not k.endswith(IGNORED_SUFFIXES) or not k.startswith(km.TE_PREFIXES)}
    if not use_t5:  # T5 dropped by the config: its section is read by nothing
        names = {k: v for k, v in names.items() if not k.startswith(km.T5_PREFIX)}
    known_prefixes = (km.MMDIT_PREFIX, km.VAE_PREFIX, *km.TE_PREFIXES)
    stray = [k for k in names if not k.startswith(known_prefixes)]
    if stray:
        raise ModelFileError(f"{f.path}: unexpected key '{stray[0]}' ({len(stray)} keys outside the SD3 sections "
                             f"{', '.join(known_prefixes)}); is this an SD3 / SD3.5 checkpoint?")
    view = TensorView(f, names)
    _load_part(view, transformer, km.mmdit_keymap(transformer.config, transformer.state_dict().keys()), f.path)
    vae_km = vae_keymap(vae.config, vae.state_dict().keys())
    _check_vae(view, vae, vae_km, f.path)
    try:
        vae.load_state_dict(vae_from_file(view, vae_km), strict=True, assign=True)
    except KeyMapError as e:
        raise ModelFileError(f"{f.path}: {e}") from e
    loaded = []
    for i, (name, prefix, te) in enumerate(zip(("clip_l", "clip_g", "t5xxl"), km.TE_PREFIXES, encoders)):
        separate = getattr(cfg, name, "") or ""
        if separate:
            tes.load_separate(te, name, Path(separate).expanduser())
        elif te_in_file[i]:
            tes.load_from_view(te, name, prefix, view, f.path)
        else:
            raise ModelFileError(
                f"{f.path}: the file holds no {name} text encoder ({prefix}*); give it as model.{name} "
                f"(e.g. {tes.USUAL_FILE[name]})" + (" or set model.use_t5 = false" if name == "t5xxl" else ""))
        loaded.append(te)
    for m in (transformer, vae, *loaded):
        m.eval()
    return SDModel(
        family="sd3", prediction_type="flow", unet=transformer, vae=vae, text_encoders=loaded,
        tokenizers=tokenizers_for(config_dir, cfg, use_t5), scheduler_config=scheduler_config(config_dir),
        source=str(path), config_dir=config_dir,
        extra={"sd3_variant": variant, "file_metadata": dict(f.metadata)},
    )


def _load_part(view: TensorView, module: Any, keymap: Any, path: Path) -> None:
    sd = module.state_dict()
    for key, want in km.expected_shapes(sd, keymap).items():
        if key not in view.names:
            raise ModelFileError(f"{path}: missing key '{key}' (the file does not hold a complete {keymap.prefix}*)")
        if view.shape(key) != want:
            raise ModelFileError(f"{path}: key '{key}' has shape {list(view.shape(key))} but the config in use "
                                 f"expects {list(want)} (wrong model.config_dir or variant?)")
    try:
        state = km.from_file(view, keymap)
    except KeyMapError as e:
        raise ModelFileError(f"{path}: {e}") from e
    module.load_state_dict(state, strict=True, assign=True)


def _check_vae(view: TensorView, vae: Any, keymap: Any, path: Path) -> None:
    meta = {k: v.to("meta") for k, v in vae.state_dict().items()}
    for key, want in vae_to_file(meta, keymap).items():
        if key not in view.names:
            raise ModelFileError(f"{path}: missing key '{key}' (the file does not hold a complete VAE)")
        have = view.shape(key)
        if have != tuple(want.shape) and not (want.dim() == 4 and have == tuple(want.shape[:2])):
            raise ModelFileError(f"{path}: key '{key}' has shape {list(have)} but the VAE expects {list(want.shape)}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from e
