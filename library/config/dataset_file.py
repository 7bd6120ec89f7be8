"""The sd-scripts dataset TOML (`--dataset_config`): `[general]`, `[[datasets]]`, `[[datasets.subsets]]`.

Key names, places and meanings follow sd-scripts' docs/config_README-en.md: dataset keys (resolution, batch_size,
bucket keys) may appear in `[general]` and `[[datasets]]`; subset keys (caption options, flip_aug, num_repeats, ...)
anywhere; `image_dir`, `class_tokens`, `is_reg`, `metadata_file` only in `[[datasets.subsets]]`. A value is taken
from the subset, else its dataset, else `[general]`, else the `[data]` table (sd-scripts: the command line).
Checked as strictly as every other table: an unknown key, a key in the wrong place, or a wrong type is a
ConfigError naming the file, the table and the valid keys. sd-scripts keys sdtk does not implement (color_aug,
face_crop_aug_range, enable_wildcard, token warm-up, resize_interpolation, conditioning_data_dir) are accepted only at their neutral value, and refused otherwise, never silently ignored.
sdtk additions: a subset may give its images as a Hugging Face `datasets` dataset (`dataset_path` or `dataset_name`
in `[[datasets.subsets]]`, with `dataset_split`, `image_column`, `caption_column` and the caption-level columns
allowed at every level), instead of `image_dir` / `metadata_file`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.config.caption_keys import CaptionKeys
from library.config.data import DataConfig
from library.config.fields import opt, unset_copy
from library.config.schema import build
from library.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Keys of sd-scripts we accept but do not implement -> their neutral value (anything else is refused).
UNSUPPORTED_NEUTRAL: dict[str, Any] = {
    "color_aug": False, "face_crop_aug_range": None, "enable_wildcard": False, "token_warmup_min": 1,
    "token_warmup_step": 0, "resize_interpolation": None, "conditioning_data_dir": None,
}


@dataclass
class _SubsetKeys(unset_copy(CaptionKeys, "_SubsetCaptionKeys")):
    """Keys allowed at every level (sd-scripts 'Options for Subsets' + caption dropout + DreamBooth common): the
    caption keys (library/config/caption_keys.py), unset unless given, and these."""

    num_repeats: int | None = opt(None, "Times each image is seen per epoch.")
    flip_aug: bool | None = opt(None, "Random horizontal flip.")
    random_crop: bool | None = opt(None, "Random instead of centre crop.")
    alpha_mask: bool | None = opt(None, "Alpha channel as loss mask.")
    cache_info: bool | None = opt(None, "sd-scripts metadata cache; sdtk reads image headers fast, so it is ignored.")
    color_aug: bool | None = opt(None, "Not supported by sdtk (only false).")
    face_crop_aug_range: list[float] | None = opt(None, "Not supported by sdtk.")
    enable_wildcard: bool | None = opt(None, "Not supported by sdtk (only false).")
    token_warmup_min: int | None = opt(None, "Not supported by sdtk (only 1).")
    token_warmup_step: float | None = opt(None, "Not supported by sdtk (only 0).")
    resize_interpolation: str | None = opt(None, "Not supported by sdtk (Lanczos is used).")
    # sdtk: Hugging Face `datasets` subsets (dataset_path / dataset_name) and caption levels
    dataset_split: str | None = opt(None, "Split of the subset's dataset_path / dataset_name.")
    image_column: str | None = opt(None, "Image column of a dataset_path / dataset_name subset.")
    caption_column: str | None = opt(None, "Caption column of a dataset_path / dataset_name subset ('' = none).")
    tags_column: str | None = opt(None, "Column of the 'tags' caption level.")
    short_column: str | None = opt(None, "Column of the 'short' caption level.")
    detailed_column: str | None = opt(None, "Column of the 'detailed' caption level.")


@dataclass
class _DatasetKeys:
    """Keys allowed in `[general]` and `[[datasets]]` only (sd-scripts 'Data set specific options')."""

    resolution: int | list[int] | None = opt(None, "A side, or [width, height].")
    batch_size: int | None = opt(None, "Images per batch.")
    enable_bucket: bool | None = opt(None, "Aspect-ratio bucketing.")
    min_bucket_reso: int | None = opt(None, "Smallest bucket side.")
    max_bucket_reso: int | None = opt(None, "Largest bucket side.")
    bucket_reso_steps: int | None = opt(None, "Bucket side step.")
    bucket_no_upscale: bool | None = opt(None, "Never upscale; per-image buckets.")
    skip_image_resolution: int | list[int] | None = opt(None, "Leave out images whose area is at most this size.")
    validation_split: float | None = opt(None, "Fraction of each training subset's images held out for the validation loss.")
    validation_seed: int | None = opt(None, "Seed of the validation split (-1 = train.seed).")


@dataclass
class GeneralTable(_DatasetKeys, _SubsetKeys):
    """`[general]`."""


@dataclass
class SubsetTable(_SubsetKeys):
    """`[[datasets.subsets]]`."""

    image_dir: str | None = opt(None, "Folder holding the images directly (required unless metadata_file has full paths).")
    metadata_file: str | None = opt(None, "Fine-tuning metadata JSON / JSONL (makes this a fine-tuning subset).")
    class_tokens: str | None = opt(None, "Caption for images without a caption file.")
    dataset_path: str | None = opt(None, "sdtk: a local Hugging Face `datasets` dataset (parquet, save_to_disk, imagefolder) instead of image_dir.")
    dataset_name: str | None = opt(None, "sdtk: a Hugging Face dataset id instead of image_dir.")
    is_reg: bool | None = opt(None, "Regularization (prior preservation) images.")
    conditioning_data_dir: str | None = opt(None, "ControlNet data; not supported by sdtk.")


@dataclass
class DatasetTable(_DatasetKeys, _SubsetKeys):
    """`[[datasets]]`."""

    subsets: list[SubsetTable] = opt([], "The dataset's subsets.")


@dataclass
class DatasetFile:
    general: GeneralTable = opt(GeneralTable(), "Fallback for every dataset and subset.")
    datasets: list[DatasetTable] = opt([], "The datasets.")


# ---------------------------------------------------------------------------------------------- resolved form


@dataclass
class SubsetSpec(CaptionKeys):
    """One subset with every value resolved (subset > dataset > general > [data]): the caption keys, and these."""

    image_dir: str
    metadata_file: str
    class_tokens: str
    is_reg: bool
    num_repeats: int
    flip_aug: bool
    random_crop: bool
    alpha_mask: bool
    name: str = ""  # shown in reports and ss_tag_frequency (folder name)
    dataset_path: str = ""  # a Hugging Face `datasets` subset (library/data/hfdata.py) instead of image_dir
    dataset_name: str = ""
    dataset_split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    tags_column: str = "tags"
    short_column: str = "short"
    detailed_column: str = "detailed"


@dataclass
class DatasetSpec:
    """One dataset: shared resolution / batch / bucket settings and its subsets."""

    resolution: tuple[int, int]  # (width, height)
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: list[SubsetSpec]
    skip_image_resolution: int | list[int] = 0  # a side or [width, height]; 0 = keep every image
    validation_split: float | None = None  # None = data.validation_split (library/data/holdout.py)
    validation_seed: int | None = None  # None = data.validation_seed


SUBSET_FIELDS = [f.name for f in dataclasses.fields(SubsetSpec) if f.name not in ("image_dir", "metadata_file", "class_tokens", "is_reg", "name", "dataset_path", "dataset_name")]
DATASET_FIELDS = [f.name for f in dataclasses.fields(DatasetSpec) if f.name not in ("resolution", "subsets")]


def resolution_pair(value: int | list[int], default_resolution: int, where: str) -> tuple[int, int]:
    """`512` -> (512, 512); `[768, 512]` -> (768, 512) as (width, height); 0 -> the family default."""
    if isinstance(value, list):
        if len(value) != 2:
            raise ConfigError(f"{where}: resolution must be a side or [width, height] (got {value})")
        return int(value[0]), int(value[1])
    side = int(value) or default_resolution
    return side, side


def load_dataset_file(path: str | Path) -> DatasetFile:
    """Read and strictly check an sd-scripts dataset TOML (paths are kept as written)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"data.dataset_config: {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_dataset_dict(raw, str(path))


def parse_dataset_dict(raw: dict, source: str) -> DatasetFile:
    df = build(DatasetFile, raw, source=source)  # the shared strict loader (unknown keys, types)
    if not df.datasets:
        raise ConfigError(f"{source}: no [[datasets]] table; add at least one with a [[datasets.subsets]] image_dir")
    for i, ds in enumerate(df.datasets):
        if not ds.subsets:
            raise ConfigError(f"{source}: [[datasets]] #{i + 1} has no [[datasets.subsets]]")
        # A `datasets` subset brings a caption per image, so it is of the fine-tuning kind.
        kinds = {s.metadata_file is not None or s.dataset_path is not None or s.dataset_name is not None
                 for s in ds.subsets}
        if len(kinds) > 1:  # sd-scripts: the method is decided per dataset
            raise ConfigError(f"{source}: [[datasets]] #{i + 1} mixes subsets with and without metadata_file; "
                              "put fine-tuning (metadata_file) and DreamBooth subsets in separate [[datasets]]")
        for j, s in enumerate(ds.subsets):
            where = f"{source}: [[datasets]] #{i + 1} [[datasets.subsets]] #{j + 1}"
            given = [k for k in ("image_dir", "dataset_path", "dataset_name") if getattr(s, k) is not None]
            if not given and s.metadata_file is None:
                raise ConfigError(f"{where}: set image_dir (or metadata_file, dataset_path, dataset_name)")
            ways = given + (["metadata_file"] if s.metadata_file is not None else [])
            if any(w.startswith("dataset_") for w in ways) and len(ways) > 1:
                raise ConfigError(f"{where}: {' and '.join(ways)} are different ways to give a subset's images; "
                                  "keep one")
            for table in (df.general, ds, s):
                for key, neutral in UNSUPPORTED_NEUTRAL.items():
                    value = getattr(table, key, None)
                    if value is not None and value != neutral:
                        raise ConfigError(f"{where}: {key} = {value!r} is an sd-scripts option sdtk does not "
                                          "implement; remove it")
    return df


def resolve_datasets(df: DatasetFile, base: DataConfig, default_resolution: int, base_dir: Path) -> list[DatasetSpec]:
    """Apply the fallbacks subset > dataset > general > `[data]`; relative paths are taken from `base_dir`."""
    out = []
    for ds in df.datasets:
        chain = (ds, df.general)

        def pick(key: str, chain: tuple = chain) -> Any:
            for table in chain:
                value = getattr(table, key, None)
                if value is not None:
                    return value
            return getattr(base, key)

        res = resolution_pair(pick("resolution"), default_resolution, "dataset_config")
        subsets = []
        for s in ds.subsets:
            sub_chain = (s, *chain)
            values = {k: pick(k, sub_chain) for k in SUBSET_FIELDS}
            image_dir = _resolve_path(s.image_dir, base_dir)
            meta = _resolve_path(s.metadata_file, base_dir)
            dataset_path = _resolve_path(s.dataset_path, base_dir)
            subsets.append(SubsetSpec(
                image_dir=image_dir, metadata_file=meta, class_tokens=s.class_tokens or "", is_reg=bool(s.is_reg),
                name=Path(image_dir or meta or dataset_path).name or (s.dataset_name or ""),
                dataset_path=dataset_path, dataset_name=s.dataset_name or "", **values))
        out.append(DatasetSpec(resolution=res, subsets=subsets, **{k: pick(k) for k in DATASET_FIELDS}))
    return out


def _resolve_path(p: str | None, base_dir: Path) -> str:
    if not p:
        return ""
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else base_dir / q)
