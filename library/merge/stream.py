"""Tensor-by-tensor model I/O for merges: inputs are read one tensor at a time, outputs written one tensor at a time.

Every input is seen in the single-file (LDM/SGM, SD3: Stability's MMDiT) key space, where block slots are defined,
as a `TensorSource` (library/merge/tensor_file.py, with `SafetensorsFile`: each tensor read through its own small
memory map, released with the tensor):
- `single_file_source`: a single-file checkpoint of any family (`.safetensors`, or a `.ckpt` through the weights-only
  unpickler, which has to hold the whole file in memory: pickles cannot be read piecewise).
- `folder_source`: an SD1 / SD2 / SDXL diffusers folder seen through the strict key maps (`library.models.keymaps*`),
  key by key, with the same extra keys `save_single_file` writes, so a folder and the single file of the same model
  are equal views; SD3 folders: library/merge/sd3_stream.py.
Outputs are written by `library.merge.writers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from library.errors import ModelFileError
from library.models import keymaps_clip as kc
from library.models.keymaps import KeyMap, KeyRule, to_ldm, unet_keymap, vae_keymap
from library.models.safe_load import open_tensor_file
from library.models.sd3.keymaps import TE_PREFIXES
from library.models.sd3.single_file import IGNORED_SUFFIXES, is_sd3_keys
from library.models.single_file import (
    SD1_TE,
    SD2_TE,
    SDXL_TE1,
    SDXL_TE2,
    V_PRED_KEY,
    ZTSNR_KEY,
)

# The reading primitives live below this module (library/merge/tensor_file.py, shared with sd3_stream.py); their
# names stay importable from here.
from library.merge.tensor_file import (  # noqa: F401 (re-exported)
    DTYPE_NAMES,
    DTYPES,
    IN_FLIGHT,
    RING_MAX_BYTES,
    Entry,
    SafetensorsFile,
    TensorSource,
    _const,
    read_json,
)


def open_source(ref: str) -> TensorSource:
    """A single-file checkpoint, a diffusers folder or a `tiny:` reference, as a `TensorSource`."""
    if ref.startswith("tiny:"):
        from library.models.tiny import resolve_model_ref

        return any_folder_source(resolve_model_ref(ref), name=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        return any_folder_source(path)
    if path.is_file():
        return single_file_source(path)
    raise ModelFileError(f"{ref}: no such file or folder (give a .safetensors / .ckpt file, a diffusers folder or "
                         "a 'tiny:sd15:seed=1' reference)")


def any_folder_source(folder: Path, name: str | None = None) -> TensorSource:
    """An SD3 diffusers folder (sd3_stream) or an SD1 / SD2 / SDXL one (folder_source)."""
    from library.models.sd3.load import is_sd3_folder

    if is_sd3_folder(folder):
        from library.merge.sd3_stream import sd3_folder_source

        return sd3_folder_source(folder, name=name)
    return folder_source(folder, name=name)


def single_file_source(path: Path) -> TensorSource:
    """Keys as in the file, except: `model_ema.*` (the trainer's EMA copy) is left out, SD1 text-encoder keys
    saved without `text_model.` (old transformers) are read under their `text_model.` name, as `load_single_file`
    does, and an SD3 file's text-encoder extras that are no weights (CLIP position ids, OpenCLIP's logit scale,
    T5's tied second name of its embedding; sd3.single_file.IGNORED_SUFFIXES) are left out, as its loader and
    writer do. A pickle is read through torch's weights-only unpickler (`safe_load`)."""
    entries: dict[str, Entry] = {}
    closers: list[Any] = []
    if path.suffix.lower() == ".safetensors":
        f = SafetensorsFile(path)
        closers.append(f)
        shapes, metadata = f.shapes, f.metadata

        def reader(k: str) -> Callable[[], torch.Tensor]:
            return lambda: f.read(k)

        dtype, offset = f.dtype, f.offset
    else:
        tf = open_tensor_file(path)  # ModelFileError for unknown suffixes and unsafe pickles
        shapes, metadata = tf.shapes, tf.metadata

        def reader(k: str) -> Callable[[], torch.Tensor]:
            return lambda: tf[k]

        def dtype(k: str) -> torch.dtype:
            return tf[k].dtype

        def offset(k: str) -> int | None:
            return None

    sd3 = is_sd3_keys(shapes)
    for key, shape in shapes.items():
        if key.startswith("model_ema.") or (sd3 and key.startswith(TE_PREFIXES) and key.endswith(IGNORED_SUFFIXES)):
            continue
        name = key
        if key.startswith(SD1_TE) and not key.startswith(SD1_TE + kc.TEXT_MODEL):
            name = SD1_TE + kc.TEXT_MODEL + key[len(SD1_TE):]
        entries[name] = Entry(tuple(shape), dtype(key), reader(key), offset(key))
    return TensorSource(str(path), entries, metadata, closers)


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders.

TE_PARTS = {"sd1": [("text_encoder", SD1_TE, "clip")], "sd2": [("text_encoder", SD2_TE, "openclip")],
             "sdxl": [("text_encoder", SDXL_TE1, "clip"), ("text_encoder_2", SDXL_TE2, "openclip")]}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


@dataclass
class Part:
    """One component of a diffusers folder: its weight file, its key map and its config."""

    name: str
    file: SafetensorsFile | None  # None when the key map was built from a config only (no weights)
    keymap: KeyMap
    config: dict[str, Any]
    file_keys: dict[str, str]  # key-map (diffusers, `text_model.` form) key -> key in the file


def folder_parts(folder: Path, family: str | None = None, *, with_weights: bool = True) -> tuple[str, list[Part]]:
    """(family, parts) of a diffusers folder. Without weights, the key lists come from models built on the meta
    device from the folder's configs (a configs-only folder, e.g. a bundled one, is enough)."""
    from library.models.load import detect_family as folder_family

    index_path = folder / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    if not (folder / "unet" / "config.json").is_file():
        raise ModelFileError(f"{folder}: not a diffusers folder (no unet/config.json)")
    unet_cfg = read_json(folder / "unet" / "config.json")
    family = family or folder_family(index, unet_cfg)
    parts: list[Part] = []
    for name, kind, prefix in [("unet", "unet", ""), ("vae", "vae", ""),
                               *((n, k, p) for n, p, k in TE_PARTS[family])]:
        cfg_path = folder / name / "config.json"
        if not cfg_path.is_file():
            raise ModelFileError(f"{folder}: missing {name}/config.json (needed for an {family} model)")
        cfg = read_json(cfg_path)
        file = None
        if with_weights:
            wpath = folder / name / WEIGHT_FILES[name]
            if not wpath.is_file():
                raise ModelFileError(f"{folder}: missing {name}/{WEIGHT_FILES[name]} (merges read .safetensors "
                                     "diffusers folders; re-save a .bin folder with save_pretrained)")
            file = SafetensorsFile(wpath)
            raw = file.keys()
        else:
            raw = _meta_keys(kind, cfg)
        if kind in ("clip", "openclip"):
            keys = {_text_model_form(k): k for k in raw if not k.endswith("position_ids")}
            km = (kc.clip_keymap if kind == "clip" else kc.openclip_keymap)(prefix, list(keys))
        else:
            keys = {k: k for k in raw}
            km = (unet_keymap if kind == "unet" else vae_keymap)(cfg, list(keys))
        parts.append(Part(name, file, km, cfg, keys))
    return family, parts


def _text_model_form(key: str) -> str:
    """transformers 5 writes CLIPTextModel keys without `text_model.`; the key maps use the released form."""
    return key if key.startswith((kc.TEXT_MODEL, "text_projection.")) else kc.TEXT_MODEL + key


def _meta_keys(kind: str, cfg: dict[str, Any]) -> list[str]:
    from library.models.keymaps import meta_state_dict_keys

    if kind in ("unet", "vae"):
        return meta_state_dict_keys(kind, cfg)  # type: ignore[arg-type]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if cfg.get("architectures", [""])[0] == "CLIPTextModelWithProjection" \
        else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    return list(kc.te_state_dict(model))


def folder_source(folder: Path, name: str | None = None) -> TensorSource:
    """A diffusers folder as single-file keys: the key maps' keys, plus what `model_to_ldm` adds (CLIP
    position_ids, OpenCLIP logit_scale, SD2's padding layer and identity text_projection, v_pred / ztsnr markers)."""
    family, parts = folder_parts(folder)
    entries: dict[str, Entry] = {}
    for part in parts:
        f = part.file
        assert f is not None
        for rule in part.keymap.rules:
            key = part.keymap.prefix + rule.ldm
            shapes = [f.shapes[part.file_keys[k]] for k in rule.diffusers]
            meta = to_ldm({k: torch.empty(s, device="meta") for k, s in zip(rule.diffusers, shapes)},
                          KeyMap(part.keymap.prefix, (rule,)))[key]
            entries[key] = Entry(tuple(meta.shape), f.dtype(part.file_keys[rule.diffusers[0]]),
                                 _rule_reader(f, part, rule))
        prefix = part.keymap.prefix
        if prefix in (SD1_TE, SDXL_TE1):
            for k, t in kc.clip_extras_to_write(prefix, part.config["max_position_embeddings"]).items():
                entries[k] = _const(t)
        elif prefix in (SD2_TE, SDXL_TE2):
            ldm_meta = {k: torch.empty(e.shape, device="meta") for k, e in entries.items() if k.startswith(prefix)}
            n = kc.file_layers(ldm_meta, prefix)
            extras = kc.openclip_extras_to_write(prefix, ldm_meta, part.config["hidden_size"],
                                                 pad_layer=prefix == SD2_TE)
            last, pad = f"{prefix}transformer.resblocks.{n - 1}.", f"{prefix}transformer.resblocks.{n}."
            for k, t in extras.items():
                if k.startswith(pad):  # SD2's padding layer repeats the last layer: read that layer again
                    src = entries[last + k[len(pad):]]
                    entries[k] = Entry(src.shape, src.dtype, src.read)
                else:
                    entries[k] = _const(t.to(entries[prefix + "ln_final.weight"].dtype))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = read_json(sched_path) if sched_path.is_file() else {}
    v_pred = sched.get("prediction_type") == "v_prediction"
    metadata = {"modelspec.prediction_type": "v" if v_pred else "epsilon"}  # the folder says; no probe needed
    if v_pred:
        entries[V_PRED_KEY] = _const(torch.zeros(0))
    if sched.get("rescale_betas_zero_snr"):
        entries[ZTSNR_KEY] = _const(torch.zeros(0))
    closers = [p.file for p in parts]
    source = TensorSource(name or str(folder), entries, metadata, closers, folder=folder)
    if source.family != family:
        raise ModelFileError(f"{folder}: its configs say {family} but its keys say {source.family}")
    return source


def _rule_reader(f: SafetensorsFile, part: Part, rule: KeyRule) -> Callable[[], torch.Tensor]:
    km = KeyMap(part.keymap.prefix, (rule,))
    key = part.keymap.prefix + rule.ldm

    def read() -> torch.Tensor:
        return to_ldm({k: f.read(part.file_keys[k]) for k in rule.diffusers}, km)[key]

    return read


