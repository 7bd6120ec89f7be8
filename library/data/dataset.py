"""From config to an index of images: datasets and subsets, files, captions, repeats, regularization, buckets.

Sources (as sd-scripts reads them):
- `data.dataset_config`: the sd-scripts dataset TOML (library/config/dataset_file.py);
- `data.train_data_dir`: sd-scripts DreamBooth layout (`<repeats>_<class tokens>` sub-folders) or, when the folder
  has no such sub-folder, the images directly (repeats = data.num_repeats, class tokens = data.class_tokens);
  `demo:<name>` is the built-in demo dataset; `data.metadata_file` makes it a fine-tuning subset instead;
- `data.reg_data_dir`: the same layout, as regularization subsets;
- `data.dataset_path` / `data.dataset_name`: a Hugging Face `datasets` dataset (library/data/hfdata.py).
Caption levels (captions.CAPTION_LEVELS) come from `foo.tags.txt` / `foo.short.txt` / `foo.detailed.txt` beside
`foo.png`, metadata keys `tags` / `short` (alias `caption`) / `detailed`, or the dataset's level columns.
Image sizes come from file headers only. A file that cannot be used is skipped and listed with its reason.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from library.config.caption_keys import caption_keys_of
from library.config.data import DataConfig
from library.config.dataset_file import DatasetSpec, SubsetSpec, load_dataset_file, resolve_datasets, resolution_pair
from library.data import buckets as bk
from library.data.captions import CAPTION_LEVELS, CaptionOptions, quality_tags_for_scores, split_tags
from library.data.images import (IMAGE_EXTENSIONS, BadImage, ImageHeader, is_image_file, load_image, read_header,
                                 read_header_bytes)
from library.errors import ConfigError, DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_REPEATS_DIR = re.compile(r"^(\d+)_(.*)$")
# Files that normally sit beside images (captions, sd-scripts caches, metadata): not listed as skipped.
SIDECAR_EXTENSIONS = frozenset({".txt", ".caption", ".tags", ".json", ".jsonl", ".npz", ".toml", ".safetensors"})


@dataclass
class ImageItem:
    path: Path
    captions: list[str]  # alternatives (lines of the caption file); empty = "" caption
    header: ImageHeader
    dataset: int
    subset: int  # index into DataIndex.subsets
    is_reg: bool
    repeats: int
    score: float | None = None
    quality_tag: str | None = None
    placement: bk.Placement | None = None
    levels: dict[str, list[str]] = field(default_factory=dict)  # caption level -> alternatives
    source: object = None  # hfdata.RowImages when the image is bytes in a dataset row (then `path` is a label)
    row: int = -1


def load_item_image(it: ImageItem, fit: bk.Size | None = None):
    """Decode an item's image (a file, or a dataset row's bytes). Raises BadImage."""
    return it.source.load(it.row, fit) if it.source is not None else load_image(it.path, fit)


@dataclass
class DataIndex:
    datasets: list[DatasetSpec]
    subsets: list[SubsetSpec]  # every dataset's subsets, flattened
    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ config -> specs


def dataset_specs(cfg: DataConfig, default_resolution: int) -> list[DatasetSpec]:
    """The datasets the config describes, every value resolved."""
    if cfg.dataset_config:
        path = Path(cfg.dataset_config).expanduser()
        specs = resolve_datasets(load_dataset_file(path), cfg, default_resolution, path.parent)
        ignored = [k for k in ("train_data_dir", "reg_data_dir", "metadata_file") if getattr(cfg, k)]
        if ignored:  # sd-scripts ignores them too when a dataset config is given
            print(f"warning: data.{', data.'.join(ignored)} ignored: data.dataset_config defines the datasets",
                  file=sys.stderr)
    elif cfg.train_data_dir or cfg.dataset_path or cfg.dataset_name:
        if cfg.train_data_dir:
            subsets = _folder_subsets(cfg, cfg.train_data_dir, is_reg=False)
        else:
            path = str(Path(cfg.dataset_path).expanduser()) if cfg.dataset_path else ""
            subsets = [_subset(cfg, "", is_reg=False, repeats=cfg.num_repeats, class_tokens=cfg.class_tokens,
                               name=Path(path).name or cfg.dataset_name, dataset_path=path,
                               dataset_name=cfg.dataset_name)]
        if cfg.reg_data_dir:
            subsets += _folder_subsets(cfg, cfg.reg_data_dir, is_reg=True)
        res = resolution_pair(cfg.resolution, default_resolution, "data.resolution")
        specs = [DatasetSpec(res, cfg.batch_size, cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso,
                             cfg.bucket_reso_steps, cfg.bucket_no_upscale, subsets, cfg.skip_image_resolution)]
    else:
        raise ConfigError("no training data: set data.train_data_dir (a folder, or 'demo:shapes'), data.dataset_path "
                          "(a Hugging Face datasets folder or parquet file) or data.dataset_config")
    source = f"{cfg.dataset_config}: " if cfg.dataset_config else ""
    for i, spec in enumerate(specs):
        _check_spec(spec, f"{source}dataset #{i + 1}")
    return specs


def _check_spec(spec: DatasetSpec, where: str) -> None:
    step = spec.bucket_reso_steps
    if step != 32 and (step < 64 or step % 64):
        raise ConfigError(f"{where}: bucket_reso_steps must be a multiple of 64, or 32 for SDXL (got {step})")
    if min(spec.resolution) < 64 or spec.batch_size < 1:
        raise ConfigError(f"{where}: resolution must be at least 64 px and batch_size at least 1")
    max_reso = spec.max_bucket_reso or 2 * max(spec.resolution)
    if spec.enable_bucket and (spec.min_bucket_reso % step or max_reso % step or spec.min_bucket_reso > max_reso):
        raise ConfigError(f"{where}: min_bucket_reso ({spec.min_bucket_reso}) and max_bucket_reso ({max_reso}) must "
                          f"be multiples of bucket_reso_steps ({step}), min <= max")
    if spec.enable_bucket and max_reso < max(spec.resolution):  # sd-scripts asserts the same
        raise ConfigError(f"{where}: max_bucket_reso ({max_reso}) must be at least the resolution {spec.resolution}")
    for s in spec.subsets:
        if s.num_repeats < 1:
            raise ConfigError(f"{where}: subset {s.name}: num_repeats must be at least 1")
        s.check_caption_keys(f"{where}: subset {s.name}: ")


def _subset(cfg: DataConfig, image_dir: str, *, is_reg: bool, repeats: int, class_tokens: str, name: str,
            metadata_file: str = "", dataset_path: str = "", dataset_name: str = "") -> SubsetSpec:
    keys = {k: getattr(cfg, k) for k in SubsetSpec.__dataclass_fields__
            if k not in ("image_dir", "metadata_file", "class_tokens", "is_reg", "name", "num_repeats",
                         "dataset_path", "dataset_name")}
    return SubsetSpec(image_dir=image_dir, metadata_file=metadata_file, class_tokens=class_tokens, is_reg=is_reg,
                      num_repeats=repeats, name=name, dataset_path=dataset_path, dataset_name=dataset_name, **keys)


def _folder_subsets(cfg: DataConfig, folder: str, *, is_reg: bool) -> list[SubsetSpec]:
    key = "data.reg_data_dir" if is_reg else "data.train_data_dir"
    if folder.startswith("demo:"):
        from library.data.demo import resolve_dataset_ref

        root = Path(resolve_dataset_ref(folder))
    else:
        root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{key} = {folder!r}: folder not found")
    if cfg.metadata_file and not is_reg:
        return [_subset(cfg, str(root), is_reg=False, repeats=cfg.num_repeats, class_tokens=cfg.class_tokens,
                        name=root.name, metadata_file=str(Path(cfg.metadata_file).expanduser()))]
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and _REPEATS_DIR.match(p.name))
    if not subdirs:
        return [_subset(cfg, str(root), is_reg=is_reg, repeats=cfg.num_repeats, class_tokens=cfg.class_tokens,
                        name=root.name)]
    out = []
    for d in subdirs:
        m = _REPEATS_DIR.match(d.name)
        out.append(_subset(cfg, str(d), is_reg=is_reg, repeats=int(m.group(1)), class_tokens=m.group(2).strip(),
                           name=d.name))
    return out


# ------------------------------------------------------------------------------------------------ specs -> index


def index_datasets(specs: list[DatasetSpec], cfg: DataConfig) -> DataIndex:
    """Scan every subset, read headers and captions, balance regularization images, add quality tags, bucket."""
    index = DataIndex(datasets=specs, subsets=[], items=[])
    for di, spec in enumerate(specs):
        train_items, reg_items = [], []
        for s in spec.subsets:
            si = len(index.subsets)
            index.subsets.append(s)
            if s.dataset_path or s.dataset_name:
                items = _scan_dataset(s, di, si, index)
            else:
                items = _scan_metadata(s, di, si, index) if s.metadata_file else _scan_folder(s, di, si, index)
            if not items:
                where = s.metadata_file or s.image_dir or s.dataset_path or s.dataset_name
                raise DataError(f"{where}: no usable images (supported: .png .jpg .jpeg .webp .bmp"
                                f"{'; see the skipped files above' if index.skipped else ''})")
            if spec.skip_image_resolution:
                # sd-scripts `skip_image_resolution`: images whose area is at most this size are left out.
                w, h = resolution_pair(spec.skip_image_resolution, 0, "skip_image_resolution")
                small = [it for it in items if it.header.size[0] * it.header.size[1] <= w * h]
                if small:
                    print(f"note: {len(small)} image(s) of '{s.name}' are at most {w}x{h} pixels "
                          f"(skip_image_resolution) and are left out of dataset #{di + 1}", file=sys.stderr)
                    items = [it for it in items if it not in small]
            weighted = [name for name, w in cfg.caption_levels.items() if w > 0]
            if weighted and not any(it.levels.get(name) for it in items for name in weighted):
                print(f"warning: data.caption_levels draws {', '.join(weighted)}, but no image of subset '{s.name}' "
                      f"has those levels (files foo.<level>{s.caption_extension}, metadata keys or dataset columns); "
                      "its captions are used", file=sys.stderr)
            (reg_items if s.is_reg else train_items).extend(items)
        index.items.extend(train_items)
        index.items.extend(balance_regularization(train_items, reg_items))
    if index.skipped:
        lines = "\n".join(f"  {p}: {why}" for p, why in index.skipped)
        print(f"warning: skipped {len(index.skipped)} unusable image file(s):\n{lines}", file=sys.stderr)
    if index.missing_captions:
        lines = "\n".join(f"  {p}" for p in index.missing_captions[:20])
        more = f"\n  ... and {len(index.missing_captions) - 20} more" if len(index.missing_captions) > 20 else ""
        print(f"warning: {len(index.missing_captions)} image(s) have no caption file (or dataset caption); using "
              f"their class tokens (or an empty caption):\n{lines}{more}", file=sys.stderr)
    if cfg.quality_tags:
        tags = quality_tags_for_scores([it.score for it in index.items], cfg.quality_percentiles, cfg.quality_tag_names)
        for it, tag in zip(index.items, tags):
            it.quality_tag = tag
    assign_buckets(index)
    return index


def balance_regularization(train: list[ImageItem], reg: list[ImageItem]) -> list[ImageItem]:
    """sd-scripts' DreamBoothDataset rule: regularization images are seen as often as training images per epoch.

    With T = sum of the training images' repeats, reg images are taken in order, each adding its own repeats, until
    T is reached (later ones are left out); if one pass is not enough, further passes add one repeat to each image
    in turn until T is reached. Returns the reg items used, their `repeats` set accordingly.
    """
    target = sum(it.repeats for it in train)
    if not reg or target == 0:
        return []
    used: list[ImageItem] = []
    n = 0
    for it in reg:
        used.append(it)
        n += it.repeats
        if n >= target:
            return used
    while True:
        for it in used:
            it.repeats += 1
            n += 1
            if n >= target:
                return used


def assign_buckets(index: DataIndex) -> None:
    """Bucket placement per image (sd-scripts ladder, no-upscale, or one fixed size when bucketing is off)."""
    for di, spec in enumerate(index.datasets):
        items = [it for it in index.items if it.dataset == di]
        step = spec.bucket_reso_steps
        if not spec.enable_bucket:
            ladder = [spec.resolution]
        elif not spec.bucket_no_upscale:
            max_reso = spec.max_bucket_reso or 2 * max(spec.resolution)
            ladder = bk.make_bucket_resolutions(spec.resolution, spec.min_bucket_reso, max_reso, step)
        for it in items:
            if spec.enable_bucket and spec.bucket_no_upscale:
                it.placement = bk.select_bucket_no_upscale(it.header.size, spec.resolution[0] * spec.resolution[1], step)
            else:
                it.placement = bk.select_bucket(it.header.size, ladder)


def caption_options(s: SubsetSpec, cfg: DataConfig, synonyms: dict[str, tuple[str, ...]]) -> CaptionOptions:
    """The subset's caption keys and the run-wide caption techniques of `[data]` (`synonyms` as loaded)."""
    return CaptionOptions(
        **caption_keys_of(s), multilevel_tag_dropout=cfg.multilevel_tag_dropout,
        protected_tags=tuple(cfg.protected_tags), synonyms=synonyms, synonym_probability=cfg.synonym_probability,
        tag_order=tuple(cfg.tag_order), caption_levels=tuple((k, float(w)) for k, w in cfg.caption_levels.items()))


def load_synonyms(cfg: DataConfig) -> dict[str, tuple[str, ...]]:
    """`data.synonyms` plus `data.synonyms_file` (TOML or JSON: tag -> alternative or list of alternatives)."""
    table: dict = dict(cfg.synonyms)
    if cfg.synonyms_file:
        path = Path(cfg.synonyms_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
            extra = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"data.synonyms_file: {path} does not exist") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"data.synonyms_file: {path} is not valid {path.suffix[1:].upper() or 'TOML'}: {e}") from None
        table.update(extra)
    out = {}
    for tag, alts in table.items():
        alts = [alts] if isinstance(alts, str) else alts
        if not isinstance(alts, list) or not all(isinstance(a, str) for a in alts) or not alts:
            raise ConfigError(f"synonyms: '{tag}' must map to a string or a non-empty list of strings")
        out[tag] = tuple(alts)
    return out


def subset_tag_frequency(index: DataIndex) -> dict[str, dict[str, int]]:
    """kohya `ss_tag_frequency`: {subset folder name: {tag: images with it}}, from the raw captions."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for it in index.items:
        s = index.subsets[it.subset]
        freq = out[s.name]
        tags = set()
        for line in it.captions + it.levels.get("tags", []):
            tags.update(split_tags(line, s.caption_separator))
        for t in tags:
            freq[t] = freq.get(t, 0) + 1
    return dict(out)


# ------------------------------------------------------------------------------------------------ scanning


def _header(path: Path, index: DataIndex) -> ImageHeader | None:
    try:
        return read_header(path)
    except BadImage as e:
        index.skipped.append((path, str(e)))
        return None


def _try_header(path: Path) -> ImageHeader | BadImage:
    try:
        return read_header(path)
    except BadImage as e:
        return e


def _read_caption(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _list_files(root: Path) -> list[str]:
    """Names of the folder's regular files (not hidden), sorted: one directory read, no stat per file (the
    directory entry's type says file or folder), so 100k-image folders list in well under a second."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())


def _read_headers(paths: list[Path]) -> list[ImageHeader | BadImage]:
    """Headers in order. Header reads are I/O bound on network disks, so they overlap in threads; each task reads a
    chunk of files (one future per file cost more than the reads themselves on 100k local files)."""
    chunk = 256
    if len(paths) <= chunk:
        return [_try_header(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parts = pool.map(lambda i: [_try_header(p) for p in paths[i:i + chunk]], range(0, len(paths), chunk))
        return [h for part in parts for h in part]


def _scan_folder(s: SubsetSpec, di: int, si: int, index: DataIndex) -> list[ImageItem]:
    root = Path(s.image_dir)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found (subset '{s.name}')")
    names = _list_files(root)
    files = [root / n for n in names]
    paths = [p for p in files if is_image_file(p)]
    sidecars = SIDECAR_EXTENSIONS | {s.caption_extension.lower()}
    # GIF is not read, as in sd-scripts' IMAGE_EXTENSIONS: an animation has no one image to train on.
    index.skipped.extend((p, f"not a supported image type ({p.suffix or 'no extension'})") for p in files
                         if not is_image_file(p) and p.suffix.lower() not in sidecars)
    headers = _read_headers(paths)
    present = set(names)  # caption lookups against the listing, not one stat per image
    items = []
    for path, header in zip(paths, headers):
        if isinstance(header, BadImage):
            index.skipped.append((path, str(header)))
            continue
        cap = path.stem + s.caption_extension
        levels = {lvl: _read_caption(root / f) for lvl in CAPTION_LEVELS
                  if (f := f"{path.stem}.{lvl}{s.caption_extension}") in present}
        if cap in present:
            captions = _read_caption(root / cap)
        else:
            if not any(levels.values()):
                index.missing_captions.append(path)
            captions = [s.class_tokens] if s.class_tokens else []
        items.append(ImageItem(path, captions, header, di, si, s.is_reg, s.num_repeats,
                               levels={k: v for k, v in levels.items() if v}))
    return items


def _scan_metadata(s: SubsetSpec, di: int, si: int, index: DataIndex) -> list[ImageItem]:
    """sd-scripts metadata JSON ({image key: {"caption", "tags"}}) or a JSON list / JSONL of records
    {"path" | "file_name" | "image", "caption", "tags" (string or list), "score", "short", "detailed"}.

    The caption is `caption` and `tags` joined with the separator, as sd-scripts' FineTuningDataset joins them
    (library/train_util.py); with data.caption_levels they are the levels `short` and `tags` instead, chosen between
    per sample (a record's own `short` key wins over `caption`)."""
    meta = Path(s.metadata_file)
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"metadata file {meta} not found (subset '{s.name}')") from None
    except UnicodeDecodeError:
        raise DataError(f"metadata file {meta} is not UTF-8 text; re-save it as UTF-8") from None
    try:
        if meta.suffix.lower() == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            records = [{"path": k, **v} for k, v in data.items()] if isinstance(data, dict) else data
    except json.JSONDecodeError as e:
        raise DataError(f"metadata file {meta} is not valid JSON: {e}") from None
    base = Path(s.image_dir) if s.image_dir else meta.parent
    items = []
    for n, rec in enumerate(records):
        key = rec.get("path") or rec.get("file_name") or rec.get("image") if isinstance(rec, dict) else None
        if not key:
            raise DataError(f"metadata file {meta}: record {n + 1} has no 'path' (or 'file_name')")
        path = _find_image(Path(key) if Path(key).is_absolute() else base / key)
        if path is None:
            index.skipped.append((base / key, f"listed in {meta.name} but not found"))
            continue
        header = _header(path, index)
        if header is None:
            continue
        tags = rec.get("tags") or ""
        tags = ", ".join(tags) if isinstance(tags, list) else str(tags)
        sep = s.caption_separator + " " if s.caption_separator == "," else s.caption_separator
        caption = sep.join(t for t in (str(rec.get("caption") or "").strip(), tags.strip()) if t)
        levels = {"tags": tags.strip(), "short": str(rec.get("short") or rec.get("caption") or "").strip(),
                  "detailed": str(rec.get("detailed") or "").strip()}
        caption = caption or levels["short"] or levels["detailed"]
        score = rec.get("score")
        if score is not None and not isinstance(score, (int, float)):
            raise DataError(f"metadata file {meta}: record {n + 1} has a non-numeric score {score!r}")
        items.append(ImageItem(path, [caption] if caption else [], header, di, si, s.is_reg, s.num_repeats,
                               score=None if score is None else float(score),
                               levels={k: [v] for k, v in levels.items() if v}))
    return items


def _scan_dataset(s: SubsetSpec, di: int, si: int, index: DataIndex) -> list[ImageItem]:
    """A Hugging Face `datasets` subset: one item per row (hfdata.py); rows with a file path are file items."""
    from library.data import hfdata

    where = f"dataset {s.dataset_path or s.dataset_name!r} (subset '{s.name}')"
    ds = hfdata.open_dataset(s.dataset_path, s.dataset_name, s.dataset_split)
    hfdata.check_columns(ds, s.image_column, s.caption_column, where, s.dataset_path)
    rows = hfdata.RowImages(ds, s.image_column, s.dataset_path or s.dataset_name)
    items = []
    for row, data, path, captions, levels in hfdata.scan_rows(s, ds):
        source = None
        if data is not None:
            source, shown = rows, rows.display(row)
            try:
                header = read_header_bytes(data)
            except BadImage as e:
                index.skipped.append((shown, str(e)))
                continue
        elif path is not None:
            shown = path
            header = _header(path, index)
            if header is None:
                continue
        else:
            index.skipped.append((rows.display(row), f"no image in column {s.image_column!r}"))
            continue
        if not captions and not levels:
            index.missing_captions.append(shown)
            captions = [s.class_tokens] if s.class_tokens else []
        items.append(ImageItem(shown, captions, header, di, si, s.is_reg, s.num_repeats, levels=levels,
                               source=source, row=row if source is not None else -1))
    return items


def _find_image(p: Path) -> Path | None:
    """The path itself, or with an image extension added (sd-scripts metadata keys may omit it)."""
    if p.is_file():
        return p
    for ext in sorted(IMAGE_EXTENSIONS):
        q = p.with_name(p.name + ext)
        if q.is_file():
            return q
    return None
