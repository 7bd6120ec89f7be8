"""SD3 LoRAs in merge_models.py's LoRA modes: which single-file tensor (and which rows of it) each LoRA module
changes, in both layouts SD3 LoRAs come in (library/networks/sd3_keys.py), and the diffusers / peft layout an
extracted or resized LoRA is written in. Pure names and tensors; library/merge/lora_ops.py does the streaming.

- diffusers / peft layout (train_lora.py's default, what `StableDiffusion3Pipeline.load_lora_weights` reads):
  `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`, `text_encoder[_2|_3].<module>` (CLIP paths with
  `text_model.`), no alpha (scale 1: our writer folds alpha / rank into lora_B; an `.alpha` tensor, where a file has
  one, is read). A diffusers module maps to a single-file tensor through the MMDiT key map's tables
  (keymaps.mmdit_modules): q / k / v are row blocks of the fused `qkv`, and the two AdaLayerNormContinuous linears
  stored as (shift, scale) in the file (the last block's context modulation, `norm_out`) have their halves swapped.
- sd-scripts layout: `lora_unet_<single-file module with _>` (fused `qkv` as one module), `lora_te1_` / `lora_te2_` /
  `lora_te3_`; a module changes its whole single-file tensor, in the file's row order (sd-scripts trains the MMDiT in
  Stability's layout).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch

from library.errors import ModelFileError
from library.models.sd3 import keymaps as km
from library.networks.sd3_keys import DIFFUSERS_PREFIX, KOHYA_PREFIX

# Which rows of the single-file tensor a LoRA layer is: a q/k/v block of a fused qkv (0, 1, 2), "swap" (the whole
# tensor with its halves exchanged) or None (the whole tensor as it is).
Block = int | Literal["swap"] | None
Target = tuple[str, Block]
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")
_TE_FILE_PREFIX = {"text_encoder": km.CLIP_L_PREFIX, "text_encoder_2": km.CLIP_G_PREFIX,
                   "text_encoder_3": km.T5_PREFIX}
_KOHYA_FILE_PREFIX = {KOHYA_PREFIX["unet"]: km.MMDIT_PREFIX, KOHYA_PREFIX["text_encoder"]: km.CLIP_L_PREFIX,
                      KOHYA_PREFIX["text_encoder_2"]: km.CLIP_G_PREFIX, KOHYA_PREFIX["text_encoder_3"]: km.T5_PREFIX}
_DUAL = re.compile(r"joint_blocks\.(\d+)\.x_block\.attn2\.")
_CLIP_LINEAR = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])"
                          r"\.weight")


def mmdit_layout(keys: Iterable[str]) -> dict[str, Any]:
    """The part of a transformer config the MMDiT key map reads (block count, dual-attention blocks), from the
    single-file keys of an SD3 model."""
    from library.merge.blocks import sd3_blocks_in

    keys = list(keys)
    dual = sorted({int(m.group(1)) for k in keys if k.startswith(km.MMDIT_PREFIX)
                   and (m := _DUAL.match(k[len(km.MMDIT_PREFIX):]))})
    return {"num_layers": sd3_blocks_in(keys), "dual_attention_layers": dual}


def diffusers_target(layout: Mapping[str, Any], name: str) -> Target:
    """The single-file tensor and rows of a diffusers / peft module name ('transformer.transformer_blocks.0.attn.to_q',
    'text_encoder.text_model.encoder.layers.0.self_attn.q_proj'); ModelFileError for a name SD3 has no layer for."""
    component, _, path = name.partition(".")
    if component in _TE_FILE_PREFIX:
        return _TE_FILE_PREFIX[component] + path + ".weight", None
    if component != DIFFUSERS_PREFIX["unet"]:
        raise ModelFileError(f"'{name}' is no SD3 LoRA module (known prefixes: transformer., text_encoder., "
                             "text_encoder_2., text_encoder_3.)")
    modules, fused, swapped = km.mmdit_modules(layout)
    if path in modules:
        return km.MMDIT_PREFIX + modules[path] + ".weight", "swap" if path in swapped else None
    for group, (file_module, _) in fused.items():
        part = path[len(group):] if path.startswith(group) else ""
        if part in ("q", "k", "v", "q_proj", "k_proj", "v_proj"):
            return km.MMDIT_PREFIX + file_module + ".weight", "qkv".index(part[0])
    raise ModelFileError(f"'{name}' is no layer of this SD3 transformer ({layout['num_layers']} joint blocks)")


def sd_scripts_names(keys: Iterable[str]) -> dict[str, str]:
    """sd-scripts module name -> single-file weight, for every weight of the model's sections."""
    out: dict[str, str] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        for kohya, prefix in _KOHYA_FILE_PREFIX.items():
            if key.startswith(prefix):
                out[f"{kohya}_{key[len(prefix):-len('.weight')].replace('.', '_')}"] = key
    return out


def layout_of(tensors: Mapping[str, torch.Tensor], path: Path) -> Literal["diffusers", "sd_scripts"]:
    """The layout of an SD3 LoRA file by its keys; a file mixing them, or of neither, is refused by name."""
    if not tensors:
        raise ModelFileError(f"{path}: holds no tensors (an empty LoRA file)")
    kohya = [k for k in tensors if k.startswith(tuple(f"{p}_" for p in KOHYA_PREFIX.values()))]
    peft = [k for k in tensors if k.startswith(tuple(f"{p}." for p in DIFFUSERS_PREFIX.values()))]
    if kohya and not peft and len(kohya) == len(tensors):
        return "sd_scripts"
    if peft and not kohya and len(peft) == len(tensors):
        return "diffusers"
    other = next(k for k in tensors if k not in kohya and k not in peft) if len(kohya) + len(peft) < len(tensors) \
        else (kohya or peft)[0]
    raise ModelFileError(f"{path}: key '{other}' is not of an SD3 LoRA in the diffusers layout (transformer.*, "
                         "text_encoder*.*) nor in sd-scripts' (lora_unet_*, lora_te1_* .. lora_te3_*)"
                         + (": the file mixes both" if kohya and peft else "; a LoRA of another family, SD1 / SD2 / SDXL?"))


def is_peft(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether a LoRA file's keys are SD3's diffusers / peft layout (every key under transformer. / text_encoder*.)."""
    return bool(tensors) and all(k.startswith(tuple(f"{p}." for p in DIFFUSERS_PREFIX.values())) for k in tensors)


def peft_modules(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers / peft module name -> its tensors under the kohya suffixes (lora_down / lora_up / alpha), so the
    LoRA tools read them; a module without an alpha has scale 1 (alpha = rank), as diffusers applies it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in PEFT_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ModelFileError(f"{path}: key '{key}' is not a plain LoRA tensor (lora_A / lora_B / alpha; SD3 "
                                 "LoRAs are merged as plain LoRA, not DoRA or LyCORIS)")
        kohya = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight", ".alpha": "alpha"}[suffix]
        out.setdefault(key[: -len(suffix)], {})[kohya] = t
    for name, module in out.items():
        if "lora_down.weight" not in module or "lora_up.weight" not in module:
            raise ModelFileError(f"{path}: module '{name}' lacks its lora_A or lora_B weight")
        module.setdefault("alpha", torch.tensor(float(module["lora_down.weight"].shape[0])))
    return out


def file_modules(tensors: Mapping[str, torch.Tensor], path: Path, keys: Iterable[str]
                 ) -> list[tuple[str, dict[str, torch.Tensor], Target]]:
    """(module name, kohya-suffixed tensors, target) for every module of an SD3 LoRA file, checked against the
    single-file keys of the model it is merged into (a module with no tensor there is an error naming it)."""
    from library.networks.lora_tools import group_modules

    keys = list(keys)
    have = set(keys)
    found: list[tuple[str, dict[str, torch.Tensor], Target]] = []
    if layout_of(tensors, path) == "diffusers":
        layout = mmdit_layout(keys)
        for name, module in peft_modules(tensors, path).items():
            try:
                target = diffusers_target(layout, name)
            except ModelFileError as e:
                raise ModelFileError(f"{path}: {e}") from None
            found.append((name, module, target))
    else:
        names = sd_scripts_names(keys)
        for name, module in group_modules(tensors).items():
            if name not in names:
                raise ModelFileError(f"{path}: LoRA module {name} has no layer in this SD3 model (a LoRA of another "
                                     "family, SD1 / SD2 / SDXL, another SD3 variant, or a text encoder the model "
                                     "does not hold?)")
            found.append((name, module, (names[name], None)))
    for name, _, (key, _) in found:
        if key not in have:
            raise ModelFileError(f"{path}: LoRA module {name} targets '{key}', which the model lacks (a text encoder "
                                 "it does not hold, or another SD3 variant?)")
    return found


def extract_targets(keys: Iterable[str], text_encoders: bool) -> dict[str, Target]:
    """diffusers / peft module name -> target, for the layers an SD3 LoRA adapts by default (network.target =
    'attn_mlp', sd3_keys.select_sd3_targets): every joint block's attention projections of both streams (and SD3.5
    Medium's attn2) and both MLPs; with `text_encoders`, the CLIP-L / CLIP-G attention and MLP linears (T5 is left
    out, as SD3 LoRA training leaves it by default)."""
    keys = list(keys)
    have = set(keys)
    layout = mmdit_layout(keys)
    modules, fused, _ = km.mmdit_modules(layout)
    paths = [p for p in modules if p.startswith("transformer_blocks.") and p.split(".", 2)[2] in _ATTN_MLP]
    for group in fused:
        paths += [f"{group}{q}" if group.endswith(".to_") else f"{group}{q}_proj" for q in "qkv"]
    out = {}
    for path in paths:
        name = f"{DIFFUSERS_PREFIX['unet']}.{path}"
        target = diffusers_target(layout, name)
        if target[0] in have:  # the last block's context stream has no output projection or MLP
            out[name] = target
    if text_encoders:
        for component in ("text_encoder", "text_encoder_2"):
            prefix = _TE_FILE_PREFIX[component]
            for key in keys:
                if key.startswith(prefix) and _CLIP_LINEAR.fullmatch(key[len(prefix):]):
                    out[f"{component}.{key[len(prefix):-len('.weight')]}"] = (key, None)
    return out


_ATTN_MLP = ("attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
             "ff_context.net.0.proj", "ff_context.net.2")


def to_peft(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers / peft module name -> kohya-suffixed tensors, back to the peft layout with the scale alpha / rank
    folded into lora_B (so every reader applies scale 1, as our SD3 writer does)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in modules.items():
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        alpha = float(t["alpha"].reshape(()).item()) if "alpha" in t else float(down.shape[0])
        out[f"{name}.lora_A.weight"] = down.contiguous()
        out[f"{name}.lora_B.weight"] = (up.float() * (alpha / down.shape[0])).to(up.dtype).contiguous()
    return out


def lora_metadata(variant: str, rank: int, title: str, base_model: str, recipe_text: str,
                  recipe_hash: str) -> dict[str, str]:
    """`ss_*` / `modelspec.*` of an SD3 LoRA written by a merge (the names train_lora.py writes; scale folded)."""
    from library.models.families import SD3_VARIANTS

    v = SD3_VARIANTS[variant]
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": repr(float(rank)),
        "ss_base_model_version": v.ss_base_model_version, "ss_sd_model_name": Path(base_model).name,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{v.architecture}/lora",
        "modelspec.implementation": "diffusers", "modelspec.prediction_type": "flow", "modelspec.title": title,
        "sdtk_lora_layout": "diffusers", "sdtk_config": recipe_text, "sdtk_config_hash": recipe_hash,
    }
