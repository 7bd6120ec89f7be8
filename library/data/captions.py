"""Caption transforms: pure functions of (caption, options, random.Random). No I/O, no global state.

`transform_caption` applies, in this order (each step is documented where it is implemented):
 1. whole-caption dropout (every N-th epoch, then with probability `caption_dropout_rate`) -> "" (sd-scripts also drops
    the prefix / suffix then);
 2. caption_prefix / caption_suffix joined with a space (sd-scripts: they are added before shuffling and take part
    in it);
 3. split into tags on `caption_separator` (stripped, empty ones removed); `keep_tokens_separator` splits a fixed head,
    a flexible middle and an optional fixed tail (sd-scripts semantics), else the first `keep_tokens` tags are fixed;
    `tag_order` reorders the tags before that split (the flexible middle when a separator is used);
 4. the quality tag (from the score percentile) is put first, fixed;
 5. tag dropout on the flexible tags that are not protected: Illustrious multi-level dropout, then per-tag
    `caption_tag_dropout_rate` on the rest;
 6. shuffle of the flexible tags;
 7. synonym substitution (each tag with synonyms is replaced with probability `synonym_probability`);
 8. `secondary_separator` inside a tag becomes `caption_separator`; tags joined with it and a space.
The random draws happen in a fixed order, so the same (caption, options, seed) always gives the same result.
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from library.config.caption_keys import CaptionKeys


@dataclass(kw_only=True)
class CaptionOptions(CaptionKeys):
    """The options of one subset's captions: its caption keys (library/config/caption_keys.py, the sd-scripts names
    a subset sets) and the run-wide techniques of `[data]` below (same names; lists as tuples). Not modified after
    it is made: variants are `dataclasses.replace` copies."""

    multilevel_tag_dropout: bool = False
    protected_tags: tuple[str, ...] = ()
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    synonym_probability: float = 0.0
    tag_order: tuple[str, ...] = ()
    caption_levels: tuple[tuple[str, float], ...] = ()  # caption level -> weight (choose_caption); () = off


# The caption levels of the Z-Image report (tags / short / detailed captions of each image). Files: `foo.tags.txt`,
# `foo.short.txt`, `foo.detailed.txt` beside `foo.png` (level name, then the caption extension); `datasets` columns
# and metadata keys of those names (sd-scripts metadata `tags` -> tags, `caption` -> short).
CAPTION_LEVELS = ("tags", "short", "detailed")
PROSE_LEVELS = frozenset({"short", "detailed"})


def split_tags(text: str, separator: str) -> list[str]:
    """Tags of a caption: split on `separator`, stripped, empties removed."""
    return [t.strip() for t in text.split(separator) if t.strip()]


def is_protected(tag: str, patterns: tuple[str, ...]) -> bool:
    """A tag matching one of the shell-style patterns (exact names, 'artist:*', ...) is never dropped."""
    return any(fnmatch.fnmatchcase(tag, p) for p in patterns)


def order_tags(tags: list[str], patterns: tuple[str, ...]) -> list[str]:
    """Fixed tag order: tags matching pattern 0 first, then pattern 1, ...; the rest keep their order after them."""
    if not patterns:
        return list(tags)

    def rank(tag: str) -> int:
        return next((i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(tag, p)), len(patterns))

    return sorted(tags, key=rank)  # sorted() is stable


# Illustrious (Park et al., "Illustrious: an open advanced illustration model", arXiv 2409.19946, its tag dropout
# paragraph): (probability, tags KEPT as a function of the caption's tag count n), one level drawn per caption.
MULTILEVEL_LEVELS: tuple[tuple[float, Callable[[int], int]], ...] = (
    (0.30, lambda n: max(int(0.3 * n), 10)),
    (0.20, lambda n: max(int(0.4 * n), 15)),
    (0.10, lambda n: min(n, 6)),
    (0.04, lambda n: min(n, 4)),
)


def multilevel_keep_count(n: int, rng: random.Random) -> int:
    """How many of a caption's n tags Illustrious multi-level dropout keeps (one uniform draw picks the level).

    Reading of the report: the four counts are the tags KEPT, not the tags dropped. With 30% keep max(0.3 n, 10),
    with 20% max(0.4 n, 15), with 10% min(n, 6), with 4% min(n, 4), otherwise (36%) all n; never more than n, and
    fractional counts round down. Why kept: `min(n, 6)` and `min(n, 4)` only make sense as "at most 6 / 4 tags
    remain" (as counts dropped they would empty every caption of up to 6 tags), and `max(0.3 n, 10)` as "keep at
    least 10 of a long list" trims a 100-tag Danbooru caption to 30 while leaving short captions whole. The earlier
    dropped reading emptied an 8-tag caption in 50% of draws (and a 20-tag one kept 10 or fewer in 50%). (The copy of
    the report we could read, arXiv 2409.19946v1, showed its opening only, not the dropout paragraph's wording: the
    reading rests on the four formulas as DESIGN.md quotes them.)
    The caller never drops protected or fixed (keep_tokens) tags, so they always stay, even past the count.

    Measured over seeds 0..9999 (`transform_caption(caption, CaptionOptions(multilevel_tag_dropout=True),
    random.Random(seed))`, no protected tags; pinned in tests/test_data_captions.py):
      n = 8:  empty captions 0.00%, mean tags kept 7.6364, captions that lose a tag 13.93%;
      n = 20: empty captions 0.00%, mean tags kept 13.9168, captions that lose a tag 64.86%;
      n = 50: empty captions 0.00%, mean tags kept 27.0053 (expected 0.3*15 + 0.2*20 + 0.1*6 + 0.04*4 + 0.36*50
              = 27.26).
    """
    u = rng.random()
    for p, count in MULTILEVEL_LEVELS:
        if u < p:
            return min(n, count(n))
        u -= p
    return n


def quality_tags_for_scores(scores: list[float | None], percentiles: list[float], names: list[str]) -> list[str | None]:
    """Quality tag per score by its percentile rank in the dataset (DESIGN.md: worst ~8%, bad ~20%, average ~60%,
    good ~82%, best ~92%, masterpiece ~100%).

    The rank of s is 100 * (#scores <= s) / (#scores), so the top score is at 100%; tag i is the first with
    rank <= percentiles[i]. Images without a score get None (no tag).
    """
    known = sorted(s for s in scores if s is not None)
    out: list[str | None] = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        pct = 100.0 * bisect.bisect_right(known, s) / len(known)
        out.append(names[next((i for i, b in enumerate(percentiles) if pct <= b), len(names) - 1)])
    return out


def pick_caption_line(lines: list[str], rng: random.Random) -> str:
    """A caption file with several lines holds alternatives: one is chosen per (epoch, sample)."""
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else lines[rng.randrange(len(lines))]


def choose_caption(captions: list[str], levels: dict[str, list[str]], opts: CaptionOptions,
                   rng: random.Random) -> tuple[str, CaptionOptions]:
    """The caption text of one (epoch, sample) and the transforms that apply to it.

    Without `opts.caption_levels`: a line of `captions` (pick_caption_line), with `opts` unchanged; no extra draw.
    With them: one level is drawn among those the image has, by weight (an image without any of the weighted levels
    uses `captions`), then a line of it. Shuffle, tag dropout, multi-level dropout, synonyms and tag order apply to
    the `tags` level only: `short` and `detailed` are prose, whose word order is meaning (prefix / suffix, the
    quality tag and whole-caption dropout still apply to them).
    """
    if not opts.caption_levels:
        return pick_caption_line(captions, rng), opts
    have = [(name, w) for name, w in opts.caption_levels if w > 0 and levels.get(name)]
    u = rng.random() * sum(w for _, w in have)  # one draw, also when the image has no level (fixed draw order)
    if not have:
        return pick_caption_line(captions, rng), opts
    name = have[-1][0]
    for n, w in have:
        if u < w:
            name = n
            break
        u -= w
    text = pick_caption_line(levels[name], rng)
    if name in PROSE_LEVELS:
        return text, prose_options(opts)
    return text, opts


def prose_options(opts: CaptionOptions) -> CaptionOptions:
    """`opts` without the tag-list transforms (for a prose caption level)."""
    return dataclasses.replace(opts, shuffle_caption=False, caption_tag_dropout_rate=0.0,
                               multilevel_tag_dropout=False, synonym_probability=0.0, tag_order=())


def caption_dropped(opts: CaptionOptions, epoch: int, rng: random.Random) -> bool:
    """Whole-caption dropout. `epoch` counts from 0; like sd-scripts (whose epochs count from 1) every N-th epoch
    means epochs N, 2N, ... counted from 1, i.e. epoch + 1 divisible by N. One draw is always consumed."""
    u = rng.random()
    if opts.caption_dropout_every_n_epochs > 0 and (epoch + 1) % opts.caption_dropout_every_n_epochs == 0:
        return True
    return u < opts.caption_dropout_rate


def transform_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int = 0,
                      quality_tag: str | None = None) -> str:
    """The training caption for one sample (steps listed in the module docstring)."""
    if caption_dropped(opts, epoch, rng):
        return ""
    text = " ".join(t for t in (opts.caption_prefix, caption, opts.caption_suffix) if t)
    sep = opts.caption_separator
    if opts.keep_tokens_separator and opts.keep_tokens_separator in text:
        parts = text.split(opts.keep_tokens_separator)
        head = split_tags(parts[0], sep)
        flex = order_tags(split_tags(parts[1], sep), opts.tag_order)
        tail = split_tags(parts[2], sep) if len(parts) > 2 else []
    else:
        tags = order_tags(split_tags(text, sep), opts.tag_order)
        head, flex, tail = tags[:opts.keep_tokens], tags[opts.keep_tokens:], []
    n_tags = len(head) + len(flex) + len(tail)
    if quality_tag:
        head = [quality_tag] + head
    flex = _drop_tags(flex, n_tags, opts, rng)
    if opts.shuffle_caption:
        rng.shuffle(flex)
    tags = [_synonym(t, opts, rng) for t in head + flex + tail]
    if opts.secondary_separator:
        tags = [t.replace(opts.secondary_separator, sep) for t in tags]
    return f"{sep} ".join(tags)


def _drop_tags(flex: list[str], n_tags: int, opts: CaptionOptions, rng: random.Random) -> list[str]:
    droppable = [i for i, t in enumerate(flex) if not is_protected(t, opts.protected_tags)]
    dropped: set[int] = set()
    if opts.multilevel_tag_dropout:
        # Keep `multilevel_keep_count` of all n tags: the fixed and protected ones always stay, so at most
        # len(droppable) go.
        k = min(len(droppable), n_tags - multilevel_keep_count(n_tags, rng))
        dropped.update(rng.sample(droppable, k))
    if opts.caption_tag_dropout_rate > 0:
        # sd-scripts `caption_tag_dropout_rate`: each tag independently.
        dropped.update(i for i in droppable if i not in dropped and rng.random() < opts.caption_tag_dropout_rate)
    return [t for i, t in enumerate(flex) if i not in dropped]


def _synonym(tag: str, opts: CaptionOptions, rng: random.Random) -> str:
    alts = opts.synonyms.get(tag)
    if not alts or opts.synonym_probability <= 0 or rng.random() >= opts.synonym_probability:
        return tag
    return alts[rng.randrange(len(alts))]


def tag_frequency(captions: list[str], separator: str) -> dict[str, int]:
    """Images per tag (each tag counted once per caption), as kohya's `ss_tag_frequency` counts them."""
    counts: Counter[str] = Counter()
    for c in captions:
        counts.update(set(split_tags(c, separator)))
    return dict(counts)
