"""SD3 / SD3.5 diffusers folders in merges: read as the released single file's keys (`sd3_folder_source`) and
written from them (`SD3FolderSink`), key by key, through the strict key maps the SD3 loader and writer use
(library/models/sd3/keymaps.py for the MMDiT and the text encoders, library/models/keymaps.py for the VAE).

A folder and the single file of the same model are equal views: the same keys (model.diffusion_model.joint_blocks.N,
first_stage_model., text_encoders.{clip_l,clip_g,t5xxl}.transformer.), shapes and values, the text-encoder extras that
are no weights (CLIP position ids, T5's tied second name of its embedding) left out as the single-file reader does.
T5 (text_encoder_3) is optional, as in the folders diffusers saves with `text_encoder_3=None`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from library.errors import ModelFileError
from library.merge.tensor_file import Entry, SafetensorsFile, TensorSource, read_json
from library.merge.writers import DirectSafetensorsWriter, SafetensorsWriter, WriterGroup, open_writer
from library.models import keymaps as ldm
from library.models.keymaps_clip import TEXT_MODEL
from library.models.sd3 import keymaps as km
from library.models.sd3.single_file import IGNORED_SUFFIXES

Kind = Literal["mmdit", "vae", "clip", "t5"]
# (sub-folder, single-file prefix, kind, weight file), in the single file's order.
PARTS: tuple[tuple[str, str, Kind, str], ...] = (
    ("transformer", km.MMDIT_PREFIX, "mmdit", "diffusion_pytorch_model.safetensors"),
    ("vae", km.VAE_PREFIX, "vae", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", km.CLIP_L_PREFIX, "clip", "model.safetensors"),
    ("text_encoder_2", km.CLIP_G_PREFIX, "clip", "model.safetensors"),
    ("text_encoder_3", km.T5_PREFIX, "t5", "model.safetensors"),
)
OPTIONAL = ("text_encoder_3",)


@dataclass(frozen=True)
class FileRule:
    """One single-file key and the diffusers tensors it is made of (q/k/v fused, halves swapped or the same)."""

    key: str
    ours: tuple[str, ...]
    to_file: Callable[[Sequence[torch.Tensor]], torch.Tensor]
    from_file: Callable[[torch.Tensor], dict[str, torch.Tensor]]


def part_rules(kind: Kind, prefix: str, config: Any, keys: Sequence[str]) -> list[FileRule]:
    """The rules of one component from its config and its diffusers keys (CLIP keys in the `text_model.` form,
    T5's without the tied embedding); a key no rule covers raises KeyMapError."""
    if kind == "vae":
        vmap = ldm.vae_keymap(config, list(keys))
        return [_vae_rule(ldm.KeyMap(prefix, (r,))) for r in vmap.rules]
    smap = km.mmdit_keymap(config, keys) if kind == "mmdit" else km.identity_keymap(prefix, keys, kind)
    return [_sd3_rule(km.SD3KeyMap(prefix, (r,))) for r in smap.rules]


def _sd3_rule(one: km.SD3KeyMap) -> FileRule:
    rule = one.rules[0]
    key = one.prefix + rule.file
    return FileRule(key, rule.ours, lambda ts: km.to_file(dict(zip(rule.ours, ts)), one)[key],
                    lambda t: km.from_file({key: t}, one))


def _vae_rule(one: ldm.KeyMap) -> FileRule:
    rule = one.rules[0]
    key = one.prefix + rule.ldm
    return FileRule(key, rule.diffusers, lambda ts: ldm.to_ldm(dict(zip(rule.diffusers, ts)), one)[key],
                    lambda t: ldm.from_ldm({key: t}, one))


def diffusers_form(kind: Kind, key: str) -> str | None:
    """A component file's key as the key maps name it, or None for the extras that are no weights."""
    if kind in ("clip", "t5") and key.endswith(IGNORED_SUFFIXES):
        return None
    if kind == "clip" and not key.startswith((TEXT_MODEL, "text_projection.")):
        return TEXT_MODEL + key  # transformers 5 writes CLIPTextModel keys without `text_model.`
    return key


def _present(folder: Path, index: dict[str, Any], sub: str) -> bool:
    declared = index.get(sub, ["", ""])
    return (folder / sub / "config.json").is_file() and not (isinstance(declared, list) and declared[0] is None)


def sd3_folder_source(folder: Path, name: str | None = None) -> TensorSource:
    """An SD3 diffusers folder as single-file keys, each read (and fused / swapped) on demand."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    entries: dict[str, Entry] = {}
    closers: list[SafetensorsFile] = []
    try:
        for sub, prefix, kind, weights in PARTS:
            if not _present(folder, index, sub):
                if sub in OPTIONAL:
                    continue
                raise ModelFileError(f"{folder}: missing {sub}/config.json (an SD3 diffusers folder has transformer/, "
                                     "vae/, text_encoder/, text_encoder_2/ and optionally text_encoder_3/)")
            path = folder / sub / weights
            if not path.is_file():
                raise ModelFileError(f"{folder}: missing {sub}/{weights} (merges read .safetensors diffusers "
                                     "folders; re-save a .bin folder with save_pretrained)")
            f = SafetensorsFile(path)
            closers.append(f)
            raw = {ours: k for k in f.keys() if (ours := diffusers_form(kind, k)) is not None}
            try:
                rules = part_rules(kind, prefix, read_json(folder / sub / "config.json"), list(raw))
            except ModelFileError as e:
                raise ModelFileError(f"{folder / sub}: {e}") from e
            for rule in rules:
                meta = rule.to_file([torch.empty(f.shapes[raw[k]], device="meta") for k in rule.ours])
                entries[rule.key] = Entry(tuple(meta.shape), f.dtype(raw[rule.ours[0]]), _reader(f, raw, rule))
        return TensorSource(name or str(folder), entries, {}, list(closers), folder=folder)
    except BaseException:
        for c in closers:
            c.close()
        raise


def _reader(f: SafetensorsFile, raw: dict[str, str], rule: FileRule) -> Callable[[], torch.Tensor]:
    return lambda: rule.to_file([f.read(raw[k]) for k in rule.ours])


def section_gap(a: TensorSource, b: TensorSource) -> str | None:
    """Why two SD3 inputs cannot merge key by key when one holds a text encoder the other lacks (released SD3
    files come with and without them), or None."""
    for (sub, prefix, _, _), label in zip(PARTS[2:], ("clip_l", "clip_g", "t5xxl")):
        has_a, has_b = (any(k.startswith(prefix) for k in s.entries) for s in (a, b))
        if has_a != has_b:
            holder, other = (a, b) if has_a else (b, a)
            return (f"{holder.name} holds the {label} text encoder ({prefix}*, a folder's {sub}/) but {other.name} "
                    "does not: merge inputs that both hold it or neither (a file without text encoders loads them "
                    f"from model.{label}; saving it with them makes it mergeable)")
    return None


class SD3FolderSink(WriterGroup):
    """Writes merged SD3 single-file keys into a diffusers folder: configs copied from `config_dir`, each key split
    into its diffusers tensors and written into its component's weight file at once. A merged model without T5
    writes a folder without it (text_encoder_3 / tokenizer_3 null in model_index.json, as diffusers does)."""

    def __init__(self, folder: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], config_dir: Path,
                 recipe_text: str):
        have = {prefix: any(k.startswith(prefix) for k in specs) for _, prefix, _, _ in PARTS}
        if not (have[km.CLIP_L_PREFIX] and have[km.CLIP_G_PREFIX]):
            raise ModelFileError("the merged SD3 model holds no CLIP text encoders (its inputs are single files "
                                 "without them), and a diffusers folder needs them: write a single file instead "
                                 "(output.path = '....safetensors')")
        use_t5 = have[km.T5_PREFIX]
        if use_t5 and not (config_dir / "text_encoder_3" / "config.json").is_file():
            raise ModelFileError(f"the merged model holds T5 (text_encoders.t5xxl.*) but the configs in {config_dir} "
                                 "have no text_encoder_3/: set output.config_dir to a folder with it")
        _copy_configs(config_dir, folder, recipe_text, use_t5)
        self.rules: dict[str, tuple[FileRule, str]] = {}
        self._opened: list[SafetensorsWriter | DirectSafetensorsWriter] = []
        self.writers: dict[str, SafetensorsWriter | DirectSafetensorsWriter] = {}
        order = {k: i for i, k in enumerate(specs)}  # the order keys will be written in
        for sub, prefix, expected, rules in _config_rules(config_dir, use_t5):
            placed: list[tuple[int, str, tuple[torch.dtype, tuple[int, ...]]]] = []
            for rule in rules:
                if rule.key not in specs:
                    raise ModelFileError(f"the merged model has no '{rule.key}', which the configs in {config_dir} "
                                         "expect: set output.config_dir to the inputs' diffusers config folder")
                dt, shape = specs[rule.key]
                for k, t in rule.from_file(torch.empty(shape, device="meta")).items():
                    if tuple(t.shape) != expected[k]:
                        raise ModelFileError(f"'{rule.key}' has shape {list(shape)}, which does not fit the configs in "
                                             f"{config_dir} ({sub} '{k}' is {list(expected[k])} there): set "
                                             "output.config_dir to the inputs' diffusers config folder")
                    placed.append((order[rule.key], k, (dt, tuple(t.shape))))
                self.rules[rule.key] = (rule, sub)
            # Declared in write order, so each component file is written front to back (O_DIRECT where possible).
            part_specs = {k: spec for _, k, spec in sorted(placed, key=lambda p: p[0])}
            weights = next(w for s, _, _, w in PARTS if s == sub)
            writer = open_writer(folder / sub / weights, part_specs, {"format": "pt"})
            self._opened.append(writer)
            self.writers[sub] = writer
        stray = [k for k in specs if k not in self.rules]
        if stray:
            raise ModelFileError(f"the merged model has {len(stray)} tensors the configs in {config_dir} have no "
                                 f"place for, e.g. '{stray[0]}': set output.config_dir to the inputs' config folder")

    def write(self, key: str, tensor: torch.Tensor) -> None:
        rule, sub = self.rules[key]
        for k, t in rule.from_file(tensor).items():
            self.writers[sub].write(k, t.contiguous())


def _config_rules(config_dir: Path, use_t5: bool) -> list[tuple[str, str, dict[str, tuple[int, ...]], list[FileRule]]]:
    """(sub-folder, prefix, diffusers key -> shape the configs give it, rules) of every component, from modules
    built on the meta device from `config_dir`."""
    from library.models.sd3.load import build_empty
    from library.models.sd3.text_encoders import our_state_dict

    transformer, vae, encoders = build_empty(config_dir, use_t5=use_t5, path=config_dir)
    modules = [transformer, vae, *encoders]
    out = []
    for (sub, prefix, kind, _), module in zip(PARTS, modules):
        if kind in ("mmdit", "vae"):
            sd = module.state_dict()
        else:
            sd = our_state_dict(module, "t5xxl" if kind == "t5" else "clip")
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        out.append((sub, prefix, shapes, part_rules(kind, prefix, module.config, list(sd))))
    return out


def _copy_configs(config_dir: Path, folder: Path, recipe_text: str, use_t5: bool) -> None:
    skip = ("*.safetensors", "*.bin", "*.ckpt", "*.pth", "*.pt", ".*")
    skip_dirs = () if use_t5 else ("text_encoder_3", "tokenizer_3")

    def ignore(d: str, names: list[str]) -> set[str]:
        out = set(shutil.ignore_patterns(*skip)(d, names))
        if Path(d) == config_dir:
            out.update(n for n in names if n in skip_dirs)
        return out

    shutil.copytree(config_dir, folder, ignore=ignore)
    (folder / "merge_recipe.toml").write_text(recipe_text, encoding="utf-8")
    index_path = folder / "model_index.json"
    if not use_t5 and index_path.is_file():
        index = read_json(index_path)
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
