"""The `[data]` table: where the images are, how they are bucketed, how captions are transformed, what is cached.

Keys shared with sd-scripts keep sd-scripts' names and meanings (its `--train_data_dir`, `--reg_data_dir`,
`--dataset_config`, `--in_json` (here `metadata_file`) and the `[general]` keys of its dataset TOML). When
`dataset_config` names an sd-scripts dataset TOML, that file defines the datasets and the keys below are the last
fallback for keys it leaves unset (subset > dataset > general > `[data]`), as sd-scripts falls back to its command
line. The keys after "ours" are sdtk additions (Illustrious / Z-Image techniques, see DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.caption_keys import CaptionKeys, varying_caption_keys
from library.config.fields import opt
from library.errors import ConfigError

BucketMode = Literal["sd-scripts", "sequence_length"]

# DESIGN.md "Techniques": percentile thresholds (upper bound, in %) for the quality tags, worst first.
DEFAULT_QUALITY_PERCENTILES = [8.0, 20.0, 60.0, 82.0, 92.0, 100.0]
DEFAULT_QUALITY_TAGS = ["worst quality", "bad quality", "average quality", "good quality", "best quality", "masterpiece"]


@dataclass
class _DataHead:
    """The `[data]` keys listed before the caption keys (a base class only so that --help and --print-config keep
    this order: a dataclass lists its bases' fields first)."""

    # --- where the data is ---
    train_data_dir: str = opt("", "Image folder (images + caption files, or sd-scripts '<repeats>_<class>' sub-folders), or 'demo:shapes'.")
    reg_data_dir: str = opt("", "Regularization image folder (same layout); balanced against the training images as sd-scripts does.")
    dataset_config: str = opt("", "sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]); when set it defines the datasets.")
    metadata_file: str = opt("", "JSON / JSONL metadata (path, caption, tags, optional score; short / detailed caption levels) for images in train_data_dir.")
    class_tokens: str = opt("", "Caption for images without a caption file when train_data_dir holds the images directly.")
    # --- ours: Hugging Face `datasets` datasets (key names of diffusers' train_text_to_image.py) ---
    dataset_path: str = opt("", "Local Hugging Face `datasets` dataset instead of train_data_dir: a parquet file or folder, a save_to_disk folder, or an imagefolder with metadata.jsonl / metadata.csv.")
    dataset_name: str = opt("", "Hugging Face dataset id (needs the hub, or its local cache), loaded with datasets.load_dataset.")
    dataset_split: str = opt("train", "Split of dataset_path / dataset_name to train on.")
    image_column: str = opt("image", "dataset_path / dataset_name: column holding the images (an Image column, bytes, or file paths).")
    caption_column: str = opt("text", "dataset_path / dataset_name: column holding the captions; '' = none (class_tokens or caption levels only).")
    # --- sd-scripts dataset keys ---
    resolution: int | list[int] = opt(0, "Training resolution: a side, or [width, height]; 0 = the model family's native size.")
    batch_size: int = opt(1, "Images per batch per device (sd-scripts --train_batch_size).")
    enable_bucket: bool = opt(True, "Aspect-ratio bucketing (sd-scripts default is false; most sd-scripts configs turn it on).")
    min_bucket_reso: int = opt(256, "Smallest bucket side in pixels.")
    max_bucket_reso: int = opt(0, "Largest bucket side in pixels; 0 = twice the larger resolution side.")
    bucket_reso_steps: int = opt(64, "Bucket side step in pixels: 64, or 32 for SDXL only.")
    bucket_no_upscale: bool = opt(False, "Give each image its own bucket no larger than the image (never upscale).")
    skip_image_resolution: int | list[int] = opt(0, "Leave out images whose area is at most this size (side or [w, h]); 0 = off.")
    num_repeats: int = opt(1, "Times each image is seen per epoch (sd-scripts '<repeats>_' folder prefix overrides it).")


@dataclass
class DataConfig(CaptionKeys, _DataHead):
    """`[data]`: the keys of _DataHead, then the caption keys (CaptionKeys, library/config/caption_keys.py: also
    every level of a dataset TOML), then these."""

    # --- sd-scripts subset keys ---
    flip_aug: bool = opt(False, "Randomly mirror images left-right.")
    random_crop: bool = opt(False, "Crop at a random position instead of the centre (not with cache_latents).")
    alpha_mask: bool = opt(False, "Use the image alpha channel as a loss mask (transparent = not trained).")
    prior_loss_weight: float = opt(1.0, "Loss weight of regularization images (sd-scripts --prior_loss_weight).")
    validation_split: float = opt(0.0, "Fraction of each training subset's images held out for the validation loss (sd-scripts; 0 = none, regularization images never).")
    validation_seed: int = opt(-1, "Seed of the validation split and of the validation noise; -1 = train.seed (sd-scripts).")
    # --- ours: caption techniques ---
    multilevel_tag_dropout: bool = opt(False, "Illustrious multi-level tag dropout: of n tags keep max(0.3n, 10) / max(0.4n, 15) / at most 6 / at most 4 with 30% / 20% / 10% / 4%, else all; protected and kept tags always stay (see captions.py).")
    protected_tags: list[str] = opt([], "Tags never dropped (character, artist, rating); shell-style patterns like 'artist:*' allowed.")
    synonyms: dict[str, list[str]] = opt({}, "Tag -> alternatives, e.g. {\"1girl\" = [\"one girl\"]}.")
    synonyms_file: str = opt("", "TOML or JSON file with more tag -> alternatives entries.")
    synonym_probability: float = opt(0.0, "Probability of replacing a tag that has synonyms by one of them.")
    quality_tags: bool = opt(False, "Prepend a quality tag chosen by the percentile of the image's metadata score.")
    quality_percentiles: list[float] = opt(DEFAULT_QUALITY_PERCENTILES, "Upper percentile bound of each quality tag, worst first; last must be 100.")
    quality_tag_names: list[str] = opt(DEFAULT_QUALITY_TAGS, "Quality tags, worst first (one per percentile bound).")
    tag_order: list[str] = opt([], "Fixed tag order: tags matching these patterns move to the front, in this order.")
    caption_levels: dict[str, float] = opt({}, "Z-Image caption levels: weight per level (tags, short, detailed), e.g. {tags = 2, short = 1, detailed = 1}; one level is drawn per image per epoch. Empty = off.")
    tags_column: str = opt("tags", "dataset_path / dataset_name: column of the 'tags' caption level.")
    short_column: str = opt("short", "dataset_path / dataset_name: column of the 'short' caption level.")
    detailed_column: str = opt("detailed", "dataset_path / dataset_name: column of the 'detailed' caption level.")
    # --- ours: batching ---
    bucket_mode: BucketMode = opt("sd-scripts", "'sd-scripts': fixed batch_size; 'sequence_length': batch size per bucket from tokens_per_batch.")
    tokens_per_batch: int = opt(0, "sequence_length mode: latent tokens ((H/8)*(W/8)) per batch; 0 = batch_size at resolution.")
    # --- caching and loading ---
    cache_latents: bool = opt(False, "Encode every image with the VAE once before training (no random_crop).")
    cache_latents_to_disk: bool = opt(False, "Keep the latent cache on disk (reused by later runs) instead of memory.")
    cache_text_encoder_outputs: bool = opt(False, "Encode every caption once before training, then move the text encoders off the GPU (captions must be fixed: no shuffle / dropout / synonyms).")
    cache_text_encoder_outputs_to_disk: bool = opt(False, "Keep the text-encoder output cache on disk (reused by later runs; rebuilt where the encoders, tokenizers, clip_skip or precision changed); needs cache_text_encoder_outputs.")
    cache_dir: str = opt("", "Folder of the on-disk caches (latents; text-encoder outputs in its text_encoder_outputs/ sub-folder); empty = the sdtk cache folder.")
    vae_batch_size: int = opt(1, "Images per VAE call while caching.")
    num_workers: int = opt(2, "DataLoader worker processes (0 = load in the training process).")

    def validate(self) -> None:
        res = self.resolution
        if isinstance(res, list):
            if len(res) != 2 or min(res) < 64:
                raise ConfigError(f"data.resolution must be a side or [width, height] of at least 64 px (got {res})")
        elif res != 0 and res < 64:
            raise ConfigError(f"data.resolution must be 0 (family default) or at least 64 px (got {res})")
        for key in ("batch_size", "num_repeats", "vae_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key} must be at least 1 (got {getattr(self, key)})")
        if self.bucket_reso_steps != 32 and (self.bucket_reso_steps < 64 or self.bucket_reso_steps % 64):
            raise ConfigError(f"data.bucket_reso_steps must be a multiple of 64, or 32 for SDXL (got {self.bucket_reso_steps})")
        for key in ("min_bucket_reso", "max_bucket_reso") if self.enable_bucket else ():  # unused without buckets
            if getattr(self, key) % self.bucket_reso_steps:
                raise ConfigError(f"data.{key} = {getattr(self, key)} must be divisible by data.bucket_reso_steps = {self.bucket_reso_steps}")
        self.check_caption_keys("data.")
        if not 0.0 <= self.synonym_probability <= 1.0:
            raise ConfigError(f"data.synonym_probability must be between 0 and 1 (got {self.synonym_probability})")
        if min(self.num_workers, self.tokens_per_batch) < 0:
            raise ConfigError("data.num_workers and data.tokens_per_batch must not be negative")
        check_quality(self.quality_percentiles, self.quality_tag_names, "data")
        if self.cache_latents and self.random_crop:
            raise ConfigError("data.random_crop = true cannot be used with data.cache_latents = true "
                              "(a cached latent has one fixed crop); turn one of them off")
        check_caption_levels(self.caption_levels, "data.caption_levels")
        sources = [k for k in ("train_data_dir", "dataset_path", "dataset_name") if getattr(self, k)]
        if len(sources) > 1:
            raise ConfigError(f"data.{' and data.'.join(sources)} are both set: give the training images one way")
        if self.metadata_file and (self.dataset_path or self.dataset_name):
            raise ConfigError("data.metadata_file is for image folders; a dataset_path / dataset_name brings its "
                              "captions in data.caption_column: remove data.metadata_file")
        if self.cache_text_encoder_outputs:
            live = varying_caption_keys(self)
            if live:
                raise ConfigError("data.cache_text_encoder_outputs = true needs fixed captions, but "
                                  + ", ".join(f"data.{k}" for k in live) + " change them while training: turn "
                                  "those off or turn data.cache_text_encoder_outputs off")
        if self.cache_latents_to_disk and not self.cache_latents:
            raise ConfigError("data.cache_latents_to_disk = true needs data.cache_latents = true")
        if self.cache_text_encoder_outputs_to_disk and not self.cache_text_encoder_outputs:
            raise ConfigError("data.cache_text_encoder_outputs_to_disk = true needs data.cache_text_encoder_outputs = true")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"data.validation_split must be at least 0 and below 1 (got {self.validation_split})")
        if self.prior_loss_weight < 0:
            raise ConfigError(f"data.prior_loss_weight must not be negative (got {self.prior_loss_weight})")


def check_caption_levels(levels: dict[str, float], where: str) -> None:
    """Known level names (captions.CAPTION_LEVELS), weights >= 0 and not all 0."""
    from library.data.captions import CAPTION_LEVELS

    unknown = sorted(set(levels) - set(CAPTION_LEVELS))
    if unknown:
        raise ConfigError(f"{where}: unknown caption level(s) {', '.join(unknown)}; the levels are "
                          f"{', '.join(CAPTION_LEVELS)}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in levels.values()) or (levels and not sum(levels.values())):
        raise ConfigError(f"{where}: weights must be numbers >= 0, not all 0 (got {levels})")


def check_quality(percentiles: list[float], names: list[str], table: str) -> None:
    """The quality percentile bounds must rise to 100 and pair one-to-one with the tag names."""
    if len(percentiles) != len(names) or not names:
        raise ConfigError(f"{table}.quality_percentiles ({len(percentiles)}) and {table}.quality_tag_names "
                          f"({len(names)}) must have the same, non-zero length")
    if any(b <= a for a, b in zip(percentiles, percentiles[1:])) or percentiles[-1] != 100 or percentiles[0] <= 0:
        raise ConfigError(f"{table}.quality_percentiles must rise strictly from above 0 to exactly 100 (got {percentiles})")
