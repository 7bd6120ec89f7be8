"""The caption keys, declared once: sd-scripts' caption options of a subset, with sd-scripts' names and meanings.

Every place that has them takes them from `CaptionKeys`, so a new caption option is one field here:
- `[data]` (library/config/data.py `DataConfig` inherits them: the keys, their --help text and defaults);
- every level of an sd-scripts dataset TOML (library/config/dataset_file.py derives its tables' fields from them,
  each unset by default so that the next level's value applies);
- a resolved subset (`dataset_file.SubsetSpec` inherits them);
- the caption transforms (library/data/captions.py `CaptionOptions` inherits them, beside the run-wide techniques).
`VARYING` names the options that change a caption from one time an image is seen to the next, which is the one rule
for whether captions are fixed (text-encoder output caching, validation captions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from library.config.fields import opt
from library.errors import ConfigError


@dataclass(kw_only=True)
class CaptionKeys:
    caption_extension: str = opt(".txt", "Caption file extension next to each image (sd-scripts' default is .caption).")
    caption_separator: str = opt(",", "Separator between tags in a caption.")
    secondary_separator: str = opt("", "Joins parts that act as one tag (shuffled and dropped together), then becomes caption_separator.")
    keep_tokens: int = opt(0, "Leading tags kept in place: never shuffled, never dropped.")
    keep_tokens_separator: str = opt("", "Marks the fixed head (and optional tail) of a caption, e.g. 'a, b ||| c, d ||| e'.")
    shuffle_caption: bool = opt(False, "Shuffle the tags after the kept ones, every time an image is seen.")
    caption_dropout_rate: float = opt(0.0, "Probability of training on an empty caption.")
    caption_dropout_every_n_epochs: int = opt(0, "Use empty captions for every image in every N-th epoch (0 = off).")
    caption_tag_dropout_rate: float = opt(0.0, "Probability of dropping each (non-kept, non-protected) tag.")
    caption_prefix: str = opt("", "Text put before every caption (before shuffling, as sd-scripts).")
    caption_suffix: str = opt("", "Text put after every caption (before shuffling, as sd-scripts).")

    def check_caption_keys(self, prefix: str) -> None:
        """Rates between 0 and 1, counts not negative; `prefix` goes before each key name in the message
        ("data." for `[data]`, "<file>: ... subset 'x': " for a dataset-file subset)."""
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{prefix}{key} must be between 0 and 1 (got {getattr(self, key)})")
        for key in ("keep_tokens", "caption_dropout_every_n_epochs"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}{key} must not be negative (got {getattr(self, key)})")


CAPTION_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CaptionKeys))


def caption_keys_of(values: Any) -> dict[str, Any]:
    """The caption keys' values of anything that has them (a DataConfig, a SubsetSpec, a dataset-file table)."""
    return {key: getattr(values, key) for key in CAPTION_KEYS}


# The options that make a caption differ between two times an image is seen; each is off at its default (false / 0).
# Both `[data]` (DataConfig) and the transforms' options (captions.CaptionOptions) have them under these names.
# sd-scripts' other varying options (enable_wildcard, token_warmup_min / token_warmup_step) are refused by the
# dataset-file reader at any value but the neutral one (dataset_file.UNSUPPORTED_NEUTRAL), so they never vary.
VARYING: tuple[str, ...] = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                            "caption_tag_dropout_rate", "multilevel_tag_dropout", "synonym_probability")


def varying_caption_keys(values: Any) -> list[str]:
    """The VARYING options that are on in `values`: captions are fixed (their text-encoder outputs can be cached)
    only when this is empty (and each image has one caption line and one caption level)."""
    return [key for key in VARYING if getattr(values, key)]


def without_varying(values: Any) -> Any:
    """A copy of the dataclass `values` with every VARYING option off (the validation pass's fixed captions)."""
    defaults = {f.name: f.default for f in dataclasses.fields(values) if f.name in VARYING}
    return dataclasses.replace(values, **defaults)
