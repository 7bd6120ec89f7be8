"""The data interface of the training loop: `build_train_data(cfg.data, ...) -> TrainData`.

A batch is a dict:
  latents [B, 4, h, w] (cached) or pixels [B, 3, H, W] in [-1, 1]; captions: list[str] (transformed);
  original_sizes, crop_top_lefts, target_sizes: LongTensor [B, 2] as (h, w) / (top, left) (SDXL size conditioning:
  the image size before resizing, the crop's top-left in the resized image, the bucket size);
  masks: [B, 1, h, w] at latent size, or None when no subset uses alpha_mask; loss_weights: FloatTensor [B]
  (regularization images get data.prior_loss_weight); is_reg: BoolTensor [B].

Everything random about a sample (caption line, caption transforms, flip, crop) comes from a generator seeded by
(seed, epoch, sample index), and the batch order from (seed, epoch); so any batch can be recomputed exactly, which is
what makes `state_dict()` = (epoch, batches consumed) enough for an exact resume.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch

from library.config.caption_keys import varying_caption_keys
from library.config.data import DataConfig
from library.data import buckets as bk
from library.data.cache import CacheRequest, LatentStore, build_latent_store
from library.data.captions import CaptionOptions, choose_caption, pick_caption_line, transform_caption
from library.data.collate import Collate
from library.data.dataset import (DataIndex, caption_options, dataset_specs, index_datasets, load_item_image,
                                  load_synonyms, subset_tag_frequency)
from library.data.images import BadImage, prepare_image
from library.data.sampler import BucketBatchSampler
from library.errors import ConfigError, DataError
from library.paths import cache_dir as sdtk_cache_dir


class SampleDataset(torch.utils.data.Dataset):
    """One training sample per key (epoch, entry); entries are images with their repeats expanded."""

    def __init__(self, index: DataIndex, entries: list[int], options: list[CaptionOptions], seed: int,
                 store: LatentStore | None, prior_loss_weight: float):
        self.index, self.entries, self.options, self.seed = index, entries, options, seed
        self.store, self.prior_loss_weight = store, prior_loss_weight
        self._groups: dict | None = None  # (dataset, bucket) -> items, built on the first damaged file
        self._bad: set[int] = set()  # items already reported as undecodable (per process)

    def __len__(self) -> int:
        return len(self.entries)

    def _decode(self, ii: int):
        """(item, image) for item `ii`; if its file no longer decodes (its header was fine at indexing, but the
        pixels are damaged, or it changed since), the next item of the same bucket that decodes takes its place, so
        hours of training are not lost to one file. Deterministic (the same file fails the same way on resume);
        each bad file is named once per process on stderr. DataError only when no image of the bucket decodes."""
        try:
            return ii, load_item_image(self.index.items[ii], self.index.items[ii].placement.resized)
        except BadImage as err:
            first = (ii, str(err))
        if self._groups is None:
            self._groups = defaultdict(list)
            for j, it in enumerate(self.index.items):
                self._groups[(it.dataset, it.placement.bucket)].append(j)
        it = self.index.items[ii]
        group = self._groups[(it.dataset, it.placement.bucket)]
        start = group.index(ii)
        for j in group[start + 1:] + group[:start]:
            if j in self._bad:
                continue
            try:
                img = load_item_image(self.index.items[j], self.index.items[j].placement.resized)
            except BadImage as err:
                self._report(j, str(err))
                continue
            self._report(*first, instead=self.index.items[j].path)
            return j, img
        self._report(*first)
        raise DataError(f"{it.path}: {first[1]}, and no other image of its bucket {it.placement.bucket} decodes; "
                        "fix or remove the damaged files")

    def _report(self, ii: int, why: str, instead: Path | None = None) -> None:
        if ii not in self._bad:
            self._bad.add(ii)
            stand_in = f"; {instead.name} of the same bucket stands in for it" if instead is not None else ""
            print(f"warning: skipped {self.index.items[ii].path} while training: {why}{stand_in} "
                  "(fix or remove the file)", file=sys.stderr)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, e = key
        ii, img = (self.entries[e], None) if self.store is not None else self._decode(self.entries[e])
        it = self.index.items[ii]  # a stand-in for a damaged file brings its own caption, size and subset
        s = self.index.subsets[it.subset]
        rng = random.Random(f"sample:{self.seed}:{epoch}:{e}")  # draw order: (level,) line, caption, flip, crop
        text, opts = choose_caption(it.captions, it.levels, self.options[it.subset], rng)
        caption = transform_caption(text, opts, rng, epoch, it.quality_tag)
        flip = s.flip_aug and rng.random() < 0.5
        pl = it.placement
        sample = {"caption": caption}
        if self.store is not None:
            crop = bk.crop_offset(pl.resized, pl.bucket, None)
            sample["latents"], sample["mask"] = self.store.get(ii, flip)
        else:
            crop = bk.crop_offset(pl.resized, pl.bucket, rng if s.random_crop else None)
            sample["pixels"], sample["mask"] = prepare_image(img, pl.resized, pl.bucket, crop, flip, s.alpha_mask)
        left = pl.resized[0] - pl.bucket[0] - crop[0] if flip else crop[0]
        w, h = it.header.size
        sample.update(original_size=(h, w), crop_top_left=(crop[1], left), target_size=(pl.bucket[1], pl.bucket[0]),
                      loss_weight=self.prior_loss_weight if it.is_reg else 1.0, is_reg=it.is_reg)
        return sample


class _EpochBatches:
    """The sampler's batches as DataLoader keys (epoch, entry), so workers need no epoch state."""

    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.sampler:
            yield [(self.sampler.epoch, e) for e in batch]


class TrainData:
    """What the training loop iterates: batches of the current epoch from the current position."""

    def __init__(self, index: DataIndex, sampler: BucketBatchSampler, loader: torch.utils.data.DataLoader,
                 report: str):
        self.index, self.sampler, self.loader, self.report = index, sampler, loader, report
        self.steps_per_epoch = len(sampler)
        self.num_images = len(index.items)
        self.epoch = 0
        self.position = 0  # batches of this epoch consumed by the caller
        self.text_cache_dir: Path | None = None  # data.cache_text_encoder_outputs_to_disk: where the outputs live
        self.validation = None  # library.data.holdout.ValidationData when data.validation_split holds images out

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` (0-based) from its first batch; the same epoch, part-way through (a resume), continues."""
        if epoch != self.epoch or not 0 < self.position < self.steps_per_epoch:
            self.epoch, self.position = epoch, 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        self.sampler.epoch, self.sampler.position = self.epoch, self.position
        for batch in self.loader:
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.sampler.seed,
                "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("seed", self.sampler.seed) != self.sampler.seed:
            raise ConfigError(f"the resume state was made with train.seed = {sd['seed']}; this run uses "
                              f"{self.sampler.seed}; set it back to resume exactly")
        if sd.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise ConfigError(f"the resume state had {sd['steps_per_epoch']} batches per epoch, the data now gives "
                              f"{self.steps_per_epoch}: the dataset or batch settings changed since it was saved")
        self.epoch, self.position = int(sd["epoch"]), int(sd["position"])

    def fixed_captions(self) -> list[str]:
        """Every caption training will use, when captions are fixed (for text-encoder output caching).

        A subset that changes captions while training (shuffle, dropout, synonyms, several caption lines) is a
        ConfigError naming the subset and the key: its text-encoder outputs cannot be computed in advance.
        """
        out = set()
        options = self.loader.dataset.options
        for it in self.index.items:
            o, s = options[it.subset], self.index.subsets[it.subset]
            live = varying_caption_keys(o)
            if len(it.captions) > 1:
                live.append(f"several caption lines in {it.path}")
            if sum(1 for name, w in o.caption_levels if w > 0 and it.levels.get(name)) > 1:
                live.append(f"data.caption_levels (several levels for {it.path})")
            if live:
                raise ConfigError(f"data.cache_text_encoder_outputs = true, but subset '{s.name}' changes its captions "
                                  f"while training ({', '.join(live)}): turn those off or turn the caching off")
            text, opts = choose_caption(it.captions, it.levels, o, random.Random(0))
            out.add(transform_caption(text, opts, random.Random(0), 0, it.quality_tag))
        if self.validation is not None:  # its captions are encoded with the others, before the encoders leave
            out.update(self.validation.captions())
        return sorted(out)

    def tag_frequency(self) -> dict:
        """kohya `ss_tag_frequency`: {subset folder name: {tag: number of images}}."""
        return subset_tag_frequency(self.index)

    def summary(self) -> dict:
        """kohya `ss_datasets`-style description: {"datasets": [...]} (json.dumps the list into the metadata)."""
        out = []
        for di, spec in enumerate(self.index.datasets):
            items = [it for it in self.index.items if it.dataset == di]
            subsets = []
            for s in spec.subsets:
                si = next(i for i, x in enumerate(self.index.subsets) if x is s)
                mine = [it for it in items if it.subset == si]
                subsets.append({"img_count": len(mine), "num_repeats": s.num_repeats,
                                "image_dir": Path(s.image_dir).name or s.name,
                                "class_tokens": s.class_tokens, "is_reg": s.is_reg, "flip_aug": s.flip_aug,
                                "random_crop": s.random_crop, "shuffle_caption": s.shuffle_caption,
                                "keep_tokens": s.keep_tokens, "caption_prefix": s.caption_prefix,
                                "caption_suffix": s.caption_suffix, "alpha_mask": s.alpha_mask})
            counts: dict[str, int] = defaultdict(int)
            for it in items:
                counts[f"{it.placement.bucket[0]}x{it.placement.bucket[1]}"] += it.repeats
            out.append({"is_dreambooth": not any(s.metadata_file or s.dataset_path or s.dataset_name for s in spec.subsets),
                        "batch_size_per_device": spec.batch_size,
                        "num_train_images": sum(it.repeats for it in items if not it.is_reg),
                        "num_reg_images": sum(it.repeats for it in items if it.is_reg),
                        "resolution": list(spec.resolution), "enable_bucket": spec.enable_bucket,
                        "min_bucket_reso": spec.min_bucket_reso, "max_bucket_reso": spec.max_bucket_reso,
                        "bucket_info": {"buckets": dict(counts)}, "subsets": subsets})
        return {"datasets": out}


def text_cache_dir(cfg: DataConfig, index: DataIndex) -> Path:
    """Folder of the on-disk text-encoder output cache (library/data/text_cache.py): `text_encoder_outputs/` in
    data.cache_dir, or a folder per dataset in the sdtk cache, as the latents."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser() / "text_encoder_outputs"
    return sdtk_cache_dir() / "text_encoder_outputs" / _latent_cache_dir(cfg, index).name


def _latent_cache_dir(cfg: DataConfig, index: DataIndex) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    roots = sorted({s.dataset_name if s.dataset_name and not s.image_dir else
                    str(Path(s.image_dir or s.metadata_file or s.dataset_path).resolve()) for s in index.subsets})
    return sdtk_cache_dir() / "latents" / hashlib.sha256("\n".join(roots).encode()).hexdigest()[:16]


def _build_cache(cfg: DataConfig, index: DataIndex, vae, cache_dtype: torch.dtype) -> LatentStore:
    """Encode (or reuse) every image's latent; images that fail to decode are dropped from the index and listed."""
    for s in index.subsets:
        if s.random_crop:
            raise ConfigError(f"random_crop = true (subset '{s.name}') cannot be used with data.cache_latents = true "
                              "(a cached latent has one fixed crop); turn one of them off")
    requests = []
    for ii, it in enumerate(index.items):
        pl, s = it.placement, index.subsets[it.subset]
        requests.append(CacheRequest(ii, it.path, pl.resized, pl.bucket, bk.crop_offset(pl.resized, pl.bucket, None),
                                     s.flip_aug, s.alpha_mask, it.header.mtime_ns, it.header.file_size,
                                     source=it.source, row=it.row))
    cache_dir = _latent_cache_dir(cfg, index) if cfg.cache_latents_to_disk else None
    store, skipped = build_latent_store(requests, vae, cache_dir=cache_dir, dtype=cache_dtype,
                                        batch_size=cfg.vae_batch_size, num_workers=cfg.num_workers)
    if skipped:
        lines = "\n".join(f"  {p}: {why}" for p, why in skipped)
        print(f"warning: skipped {len(skipped)} image(s) that could not be decoded:\n{lines}", file=sys.stderr)
        index.skipped.extend(skipped)
        keep = [ii for ii in range(len(index.items)) if ii in store]
        if not keep:
            raise DataError("no usable images left after decoding; see the skipped files above")
        remap = {old: new for new, old in enumerate(keep)}
        index.items = [index.items[ii] for ii in keep]
        moved = LatentStore()
        moved.memory = {remap[k]: v for k, v in store.memory.items() if k in remap}
        moved.files = {remap[k]: v for k, v in store.files.items() if k in remap}
        store = moved
    return store


def _hold_out(cfg: DataConfig, index: DataIndex, store: LatentStore | None, seed: int):
    """(training index, its store, (validation index, its store, validation seed) or None): the images
    library/data/holdout.py holds out move to the validation index; copies of them in other subsets are dropped."""
    import dataclasses

    from library.data.holdout import held_out_items, item_key, split_settings

    settings = [split_settings(spec, cfg, seed) for spec in index.datasets]
    if not any(fraction > 0 for fraction, _ in settings):
        return index, store, None
    held = held_out_items(index, cfg, seed)
    if not held:
        raise ConfigError("validation_split holds out no image: every training subset has fewer than 2 images; "
                          "add images or set validation_split = 0")
    keys = {item_key(index.items[ii]) for ii in held}
    train = [ii for ii, it in enumerate(index.items) if item_key(it) not in keys]

    def select(ids: list[int]) -> tuple[DataIndex, LatentStore | None]:
        sub = dataclasses.replace(index, items=[index.items[ii] for ii in ids])
        if store is None:
            return sub, None
        moved = LatentStore()
        moved.memory = {new: store.memory[old] for new, old in enumerate(ids) if old in store.memory}
        moved.files = {new: store.files[old] for new, old in enumerate(ids) if old in store.files}
        return sub, moved

    train_index, train_store = select(train)
    held_index, held_store = select(held)
    # The noise seed: the first held-out dataset's validation seed (one figure for the whole validation set).
    noise_seed = next(s for f, s in settings if f > 0)
    return train_index, train_store, (held_index, held_store, noise_seed)


def build_train_data(cfg: DataConfig, *, default_resolution: int, seed: int, rank: int = 0, world_size: int = 1,
                     vae=None, cache_dtype: torch.dtype = torch.float32, family: str | None = None) -> TrainData:
    """Index the data, bucket it, (with `vae` and data.cache_latents) cache the latents now, and set up the loader.

    `family` (optional) lets the SDXL-only bucket step 32 be checked.
    """
    if family is not None and family != "sdxl" and cfg.bucket_reso_steps == 32:
        raise ConfigError("data.bucket_reso_steps = 32 is for SDXL only; SD1/SD2 need a multiple of 64")
    index = index_datasets(dataset_specs(cfg, default_resolution), cfg)
    store = _build_cache(cfg, index, vae, cache_dtype) if (vae is not None and cfg.cache_latents) else None
    index, store, held = _hold_out(cfg, index, store, seed)

    entries = [ii for ii, it in enumerate(index.items) for _ in range(it.repeats)]
    group_of: dict[tuple[int, bk.Size], list[int]] = defaultdict(list)
    for e, ii in enumerate(entries):
        it = index.items[ii]
        group_of[(it.dataset, it.placement.bucket)].append(e)
    keys = sorted(group_of)
    sizes = []
    for di, bucket in keys:
        spec = index.datasets[di]
        if cfg.bucket_mode == "sd-scripts":
            sizes.append(spec.batch_size)
        elif cfg.bucket_mode == "sequence_length":
            target = cfg.tokens_per_batch or spec.batch_size * bk.latent_tokens(spec.resolution)
            sizes.append(bk.sequence_batch_sizes([bucket], target)[bucket])
        else:
            raise ConfigError(f"data.bucket_mode must be 'sd-scripts' or 'sequence_length' (got {cfg.bucket_mode!r})")
    sampler = BucketBatchSampler([group_of[k] for k in keys], sizes, seed, rank, world_size)

    synonyms = load_synonyms(cfg)
    options = [caption_options(s, cfg, synonyms) for s in index.subsets]
    dataset = SampleDataset(index, entries, options, seed, store, cfg.prior_loss_weight)
    use_masks = any(s.alpha_mask for s in index.subsets)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_EpochBatches(sampler), num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0, collate_fn=Collate(use_masks),
                                         pin_memory=torch.cuda.is_available(),
                                         # Its own generator: each new iterator draws a worker base seed, which from
                                         # torch's global RNG would shift dropout draws and break exact resume.
                                         generator=torch.Generator().manual_seed(seed))
    report = bk.bucket_report([(it.placement.bucket, it.placement.ar_error) for it in index.items],
                              {b: n for (_, b), n in zip(keys, sizes)} if cfg.bucket_mode == "sequence_length" else None)
    if rank == 0:
        print(report, file=sys.stderr)
    data = TrainData(index, sampler, loader, report)
    if held is not None:
        from library.data.holdout import ValidationData

        held_index, held_store, held_seed = held
        data.validation = ValidationData(held_index, [caption_options(s, cfg, synonyms) for s in held_index.subsets],
                                         held_seed, held_store)
        if rank == 0:
            print(f"validation: {data.validation.num_samples} images held out "
                  f"({len(data.validation)} batches), {len(index.items)} left for training", file=sys.stderr)
    data.text_cache_dir = text_cache_dir(cfg, index) if cfg.cache_text_encoder_outputs_to_disk else None
    return data


def build_latent_cache(cfg: DataConfig, vae, *, default_resolution: int, cache_dtype: torch.dtype = torch.float32) -> int:
    """`--cache-only`: write the on-disk latent cache and return how many images it holds."""
    if not cfg.cache_latents_to_disk:
        raise ConfigError("caching only (--cache-only) needs data.cache_latents = true and data.cache_latents_to_disk = true")
    index = index_datasets(dataset_specs(cfg, default_resolution), cfg)
    store = _build_cache(cfg, index, vae, cache_dtype)
    return len(store.files)
