"""SD3's text encoders read from a single file's sections or from the separate files users download.

Separate files, as Stability ships them in `text_encoders/` and ComfyUI's TripleCLIPLoader reads them:
`clip_l.safetensors` and `clip_g.safetensors` in transformers' CLIP layout (`text_model.*`, `text_projection.weight`),
`t5xxl_fp16.safetensors` (or fp32/bf16) in transformers' T5 layout (`shared.weight`, `encoder.*`). Some of these
files carry the single file's prefix (`text_encoders.clip_l.transformer.`, ...) or none; both are read. A CLIP-L file
without `text_projection.weight` gets the identity, as sd-scripts' `sd3_utils.load_clip_l` does (CLIP-L's
projection is square, 768 x 768). Anything else unknown is an error naming the key: fp8-"scaled" T5 files
(`scale_weight` keys) are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from library.errors import ModelFileError
from library.models.keymaps import KeyMapError
from library.models.keymaps_clip import te_module_keys, te_state_dict
from library.models.safe_load import open_tensor_file
from library.models.sd3 import keymaps as km

USUAL_FILE = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
PREFIX = {"clip_l": km.CLIP_L_PREFIX, "clip_g": km.CLIP_G_PREFIX, "t5xxl": km.T5_PREFIX}
_IGNORED = ("text_model.embeddings.position_ids", "logit_scale", "encoder.embed_tokens.weight")


def our_state_dict(te: Any, name: str) -> dict[str, Any]:
    """The encoder's tensors in the file form (CLIP: `text_model.` keys; T5: without the tied embed_tokens)."""
    if name == "t5xxl":
        return {k: v for k, v in te.state_dict().items() if not k.endswith(_IGNORED)}
    return te_state_dict(te)


def load_from_view(te: Any, name: str, prefix: str, view: Mapping[str, Any], path: Path) -> None:
    """Assign `te`'s weights from the keys under `prefix` of a single file's (already filtered) view."""
    sd = our_state_dict(te, name)
    keymap = km.identity_keymap(prefix, sd.keys(), name)
    shapes = getattr(view, "shape", None)
    for key, want in km.expected_shapes(sd, keymap).items():
        if key in view and shapes is not None and shapes(key) != want:
            raise ModelFileError(f"{path}: key '{key}' has shape {list(shapes(key))} but the {name} of the config "
                                 f"in use expects {list(want)} (wrong model.config_dir?)")
    try:
        state = km.from_file(view, keymap)
    except KeyMapError as e:
        raise ModelFileError(f"{path}: {name}: {e}") from e
    _assign(te, name, state, path)


def load_separate(te: Any, name: str, path: Path) -> None:
    """Assign `te`'s weights from a separate text-encoder file (see the module docstring)."""
    if not path.is_file():
        raise ModelFileError(f"model.{name}: {path} does not exist (expected a file such as {USUAL_FILE[name]})")
    f = open_tensor_file(path)
    keys = [k for k in f.keys() if not k.endswith(_IGNORED)]
    prefix = next((p for p in (PREFIX[name], "transformer.") if keys and all(k.startswith(p) for k in keys)), "")
    view = {k[len(prefix):]: k for k in keys}
    sd = our_state_dict(te, name)
    extra: dict[str, Any] = {}
    if name == "clip_l" and "text_projection.weight" in sd and "text_projection.weight" not in view:
        extra["text_projection.weight"] = torch.eye(*sd["text_projection.weight"].shape)
    stray = [view[k] for k in view if k not in sd]
    if stray:
        raise ModelFileError(f"model.{name}: {path}: unexpected key '{stray[0]}' ({len(stray)} keys a {name} "
                             "encoder of the config in use does not have; is this the right file?)")
    state: dict[str, Any] = dict(extra)
    for key, want in sd.items():
        if key in extra:
            continue
        if key not in view:
            raise ModelFileError(f"model.{name}: {path}: missing key '{prefix}{key}' (not a complete {name} file)")
        have = tuple(f.shapes[view[key]])
        if have != tuple(want.shape):
            raise ModelFileError(f"model.{name}: {path}: key '{view[key]}' has shape {list(have)}, the {name} "
                                 f"encoder expects {list(want.shape)}")
        state[key] = f[view[key]]
    _assign(te, name, state, path)


def _assign(te: Any, name: str, state: dict[str, Any], path: Path) -> None:
    if name == "t5xxl":
        state = dict(state)
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in the module
    else:
        state = te_module_keys(te, state)
    try:
        te.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: cannot load the {name} weights ({e})") from e
    if name == "t5xxl":
        te.tie_weights()  # `assign=True` replaced the parameter objects; tie embed_tokens to shared again
