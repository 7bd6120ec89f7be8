"""The held-out validation set (`validation_split`, `validation_seed`: sd-scripts dataset keys) and its fixed batches.

Split (as sd-scripts' per-subset split of its image list, kohya-ss/sd-scripts PR #1864 / #2190): in every dataset, the
images of each training subset are put in a fixed order (sorted by path), shuffled by a generator seeded with the
validation seed (`validation_seed`, -1 = train.seed as in sd-scripts) and the subset's position, and the first
round(n * validation_split) are held out: at least one when the fraction is above 0 and the subset has two or more
images, never all of them. Regularization subsets are never held out (they are the prior, not the subject). An image
that appears in several subsets is held out everywhere once any of its copies is, so no image is both trained on and
validated on.

Validation samples (`ValidationData`) have no randomness: no flip, the centre crop, one caption per image chosen once
by (seed, sample) with shuffle, dropout and synonyms off. Batches are the images grouped by bucket, in a fixed order,
of the dataset's batch size; `max_validation_steps` keeps the first N batches, always the same ones.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Iterator

import torch

from library.config.caption_keys import without_varying
from library.data import buckets as bk
from library.data.captions import CaptionOptions, choose_caption, transform_caption
from library.data.collate import Collate
from library.data.images import BadImage, prepare_image
from library.errors import ConfigError, DataError


def split_validation(keys: list[str], fraction: float, seed: int, salt: str = "") -> set[str]:
    """The keys held out for validation: round(n * fraction) of them (at least 1 for fraction > 0 and n >= 2, at most
    n - 1), chosen by shuffling the sorted keys with random.Random(f"validation:{seed}:{salt}")."""
    order = sorted(set(keys))
    n = len(order)
    if fraction <= 0 or n < 2:
        return set()
    count = min(n - 1, max(1, math.floor(n * fraction + 0.5)))
    random.Random(f"validation:{seed}:{salt}").shuffle(order)
    return set(order[:count])


def item_key(it) -> str:
    """What identifies an image across subsets: its file (or dataset row)."""
    return f"{it.path}#{it.row}" if it.source is not None else str(it.path)


def split_settings(spec, cfg, seed: int) -> tuple[float, int]:
    """(validation_split, validation seed) of a dataset: its own keys (dataset TOML: dataset > general > [data]),
    else data.validation_split / validation_seed; seed -1 = `seed` (train.seed)."""
    fraction = spec.validation_split if spec.validation_split is not None else cfg.validation_split
    split_seed = spec.validation_seed if spec.validation_seed is not None else cfg.validation_seed
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation_split = {fraction} (dataset with {spec.subsets[0].name or 'its subsets'}): "
                          "must be at least 0 and below 1")
    return fraction, split_seed if split_seed >= 0 else seed


def held_out_items(index, cfg, seed: int) -> list[int]:
    """Indices (into index.items) of the validation images, in index order, one per distinct image."""
    held: set[str] = set()
    for di, spec in enumerate(index.datasets):
        fraction, split_seed = split_settings(spec, cfg, seed)
        if fraction <= 0:
            continue
        by_subset: dict[int, list[str]] = defaultdict(list)
        for it in index.items:
            if it.dataset == di and not it.is_reg:
                by_subset[it.subset].append(item_key(it))
        for si, keys in sorted(by_subset.items()):
            held |= split_validation(keys, fraction, split_seed, salt=f"{di}:{si}")
    out, seen = [], set()
    for ii, it in enumerate(index.items):
        key = item_key(it)
        if key in held and key not in seen:
            seen.add(key)
            out.append(ii)
    return out


class ValidationData:
    """The validation images as fixed batches (dicts as the training batches, plus `sample_ids` [B])."""

    def __init__(self, index, options: list[CaptionOptions], seed: int, store):
        self.index, self.store, self.seed = index, store, seed
        self.collate = Collate(any(s.alpha_mask for s in index.subsets))
        self.captions_of = []
        for i, it in enumerate(index.items):
            rng = random.Random(f"validation-caption:{seed}:{i}")
            text, opts = choose_caption(it.captions, it.levels, without_varying(options[it.subset]), rng)
            self.captions_of.append(transform_caption(text, without_varying(opts), rng, 0, it.quality_tag))
        groups: dict[tuple[int, bk.Size], list[int]] = defaultdict(list)
        for i, it in enumerate(index.items):
            groups[(it.dataset, it.placement.bucket)].append(i)
        self.batches_ids: list[list[int]] = []
        for key in sorted(groups):
            size = index.datasets[key[0]].batch_size
            ids = groups[key]
            self.batches_ids += [ids[j:j + size] for j in range(0, len(ids), size)]
        self.num_samples = len(index.items)

    def __len__(self) -> int:
        return len(self.batches_ids)

    def captions(self) -> list[str]:
        """Every caption the validation batches use (for text-encoder output caching)."""
        return sorted(set(self.captions_of))

    def batches(self, max_batches: int = 0) -> Iterator[dict]:
        """The first `max_batches` batches (train.max_validation_steps; 0 = all), the same ones every time."""
        for ids in self.batches_ids[:max_batches] if max_batches > 0 else self.batches_ids:
            batch = self.collate([self._sample(i) for i in ids])
            batch["sample_ids"] = torch.tensor(ids, dtype=torch.long)
            yield batch

    def _sample(self, i: int) -> dict:
        from library.data.dataset import load_item_image

        it = self.index.items[i]
        s = self.index.subsets[it.subset]
        pl = it.placement
        crop = bk.crop_offset(pl.resized, pl.bucket, None)
        sample = {"caption": self.captions_of[i]}
        if self.store is not None:
            sample["latents"], sample["mask"] = self.store.get(i, False)
        else:
            try:
                img = load_item_image(it, pl.resized)
            except BadImage as e:
                raise DataError(f"{it.path}: {e} (a validation image); fix or remove the file") from None
            sample["pixels"], sample["mask"] = prepare_image(img, pl.resized, pl.bucket, crop, False, s.alpha_mask)
        w, h = it.header.size
        sample.update(original_size=(h, w), crop_top_left=(crop[1], crop[0]), target_size=(pl.bucket[1], pl.bucket[0]),
                      loss_weight=1.0, is_reg=False)
        return sample

    def __iter__(self) -> Iterator[dict]:
        return self.batches()
