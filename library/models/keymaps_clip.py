"""Text-encoder key maps: transformers CLIP (in memory) <-> the layouts inside single files.

- SD1 `cond_stage_model.transformer.` and SDXL `conditioner.embedders.0.transformer.`: the transformers layout
  itself (`text_model.embeddings...`), so the map is the identity.
- SD2 `cond_stage_model.model.` and SDXL `conditioner.embedders.1.model.`: the OpenCLIP layout (open_clip
  `transformer.py`: `resblocks.N.{ln_1, attn.in_proj_weight/bias (q|k|v fused), attn.out_proj, ln_2, mlp.c_fc,
  mlp.c_proj}`, `token_embedding`, `positional_embedding`, `ln_final`, `text_projection` used as `x @ P`).

transformers 5 `CLIPTextModel` state dicts have no `text_model.` prefix (the module was flattened), while
`CLIPTextModelWithProjection` and every file keep it; `te_state_dict` / `te_module_keys` convert at this edge, so
the key maps always see the `text_model.` form.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from library.models.keymaps import KeyMap, KeyMapError, KeyRule, expand_rules

TEXT_MODEL = "text_model."
POSITION_IDS = "text_model.embeddings.position_ids"

# OpenCLIP resblock module -> transformers CLIPEncoderLayer module (open_clip ResidualAttentionBlock).
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

# CLIP's initial temperature 1/0.07 (Radford et al. 2021, sec. 2.5). Only contrastive training reads logit_scale;
# we write it so our files have the released key set, and never read it back.
LOGIT_SCALE_INIT = math.log(1 / 0.07)


def te_state_dict(module: Any) -> dict[str, Any]:
    """The module's state dict with every encoder key in the `text_model.` form (text_projection stays top level)."""
    return {_with_prefix(k): v for k, v in module.state_dict().items()}


def te_module_keys(module: Any, sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename `text_model.`-form keys to the form `module.load_state_dict` expects (transformers 4 or 5)."""
    own = set(module.state_dict().keys())
    return {k if k in own else k.removeprefix(TEXT_MODEL): v for k, v in sd.items()}


def _with_prefix(key: str) -> str:
    return key if key.startswith(TEXT_MODEL) or key.startswith("text_projection.") else TEXT_MODEL + key


def clip_keymap(prefix: str, keys: Iterable[str]) -> KeyMap:
    """transformers layout inside the file (SD1, SDXL encoder 0): identity on `text_model.` keys."""
    keys = list(keys)
    return KeyMap(prefix, expand_rules(keys, {"text_model": "text_model"}, what=prefix.rstrip(".")))


def openclip_keymap(prefix: str, keys: Iterable[str]) -> KeyMap:
    """transformers layout (in memory) <-> OpenCLIP layout (SD2, SDXL encoder 1), q/k/v fused into `in_proj`."""
    keys = list(keys)
    what = prefix.rstrip(".")
    modules: dict[str, str] = {"text_model.embeddings.token_embedding": "token_embedding",
                               "text_model.final_layer_norm": "ln_final"}
    layers = n_layers(keys)
    for n in range(layers):
        for a, b in _OPENCLIP_LAYER.items():
            modules[f"text_model.encoder.layers.{n}.{a}"] = f"transformer.resblocks.{n}.{b}"
    special = {"text_model.embeddings.position_embedding.weight": KeyRule(
        ("text_model.embeddings.position_embedding.weight",), "positional_embedding"),
        "text_projection.weight": KeyRule(("text_projection.weight",), "text_projection", "transpose")}
    fused: list[KeyRule] = []
    plain: list[str] = []
    rules: list[KeyRule] = []
    for key in keys:
        if key in special:
            rules.append(special[key])
        elif ".self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]  # weight | bias
            qkv = tuple(key.replace(".q_proj.", f".{p}.") for p in ("q_proj", "k_proj", "v_proj"))
            n = key.split(".")[3]
            fused.append(KeyRule(qkv, f"transformer.resblocks.{n}.attn.in_proj_{kind}", "qkv"))
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            if key.replace(".k_proj.", ".q_proj.").replace(".v_proj.", ".q_proj.") not in keys:
                raise KeyMapError(f"{what}: '{key}' has no matching q_proj tensor to fuse into in_proj")
        else:
            plain.append(key)
    rules += expand_rules(plain, modules, what=what)
    return KeyMap(prefix, tuple(rules) + tuple(fused))


def n_layers(keys: Iterable[str]) -> int:
    """Number of encoder layers in a `text_model.`-form key list."""
    found = {int(k.split(".")[3]) for k in keys if k.startswith("text_model.encoder.layers.")}
    if found != set(range(len(found))):
        raise KeyMapError(f"text encoder layers are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def file_layers(sd_keys: Iterable[str], prefix: str) -> int:
    """Number of OpenCLIP resblocks under `prefix` in a file's keys."""
    start = prefix + "transformer.resblocks."
    found = {int(k[len(start):].split(".")[0]) for k in sd_keys if k.startswith(start)}
    return len(found)


def clip_extras_to_write(prefix: str, max_positions: int) -> dict[str, Any]:
    """`position_ids` of a transformers-layout encoder: not a weight, but released files carry it (int64 [1, 77])."""
    import torch

    return {prefix + POSITION_IDS: torch.arange(max_positions, dtype=torch.int64)[None]}


def openclip_extras_to_write(prefix: str, ldm: Mapping[str, Any], hidden: int, *, pad_layer: bool) -> dict[str, Any]:
    """Keys OpenCLIP files carry that a transformers encoder has no weight for.

    - `logit_scale` (both SD2 and SDXL): the initial CLIP temperature, unused by image generation.
    - SD2 only (`pad_layer`): the diffusers SD2 encoder keeps 23 of OpenCLIP ViT-H's 24 layers because SD2
      conditions on the penultimate layer (LDM `FrozenOpenCLIPEmbedder(layer="penultimate")` never runs the last
      one). Released files hold 24 resblocks and a `text_projection`, so, as sd-scripts' converter does
      (`make_dummy_weights`), we write the last kept layer again as resblocks.N and an identity text_projection.
      A1111 and ComfyUI build the 24-layer model, load every key and run up to the penultimate layer, so the
      padding changes no output; diffusers skips these keys (its SD_2_TEXT_ENCODER_KEYS_TO_IGNORE).
    """
    import torch

    out: dict[str, Any] = {prefix + "logit_scale": torch.tensor(LOGIT_SCALE_INIT)}
    if pad_layer:
        n = file_layers(ldm.keys(), prefix)
        last = f"{prefix}transformer.resblocks.{n - 1}."
        for key, value in ldm.items():
            if key.startswith(last):
                out[f"{prefix}transformer.resblocks.{n}." + key[len(last):]] = value.clone()
        out[prefix + "text_projection"] = torch.eye(hidden)
    return out


def openclip_extras_to_ignore(prefix: str, sd_keys: Iterable[str], model_layers: int, *, sd2: bool) -> list[str]:
    """File keys to drop before mapping an OpenCLIP encoder (see `openclip_extras_to_write` for why they exist).

    SD2: one resblock beyond the model's layers (exactly one: more is a wrong config), `text_projection`.
    """
    keys = [k for k in sd_keys if k.startswith(prefix)]
    drop = [prefix + "logit_scale"]
    if sd2:
        drop.append(prefix + "text_projection")
        have = file_layers(keys, prefix)
        if have == model_layers + 1:
            drop += [k for k in keys if k.startswith(f"{prefix}transformer.resblocks.{model_layers}.")]
    return [k for k in keys if k in set(drop)]
