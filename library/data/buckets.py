"""Aspect-ratio bucketing: pure functions over image sizes. Sizes are (width, height) in pixels.

The ladder, the nearest-aspect-ratio choice and the no-upscale rule follow sd-scripts (kohya-ss):
`make_bucket_resolutions` in library/model_util.py and `BucketManager.select_bucket` in library/train_util.py.
The code here is our own. The alternative `sequence_batch_sizes` follows the Z-Image report's idea of keeping the
number of tokens per batch near a target: a UNet batch must share one shape, so each bucket gets its own batch
size instead of packing several resolutions into one sequence.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """The sd-scripts bucket ladder, sorted.

    max area = max_reso[0] * max_reso[1]; one square bucket of side floor(sqrt(area) / step) * step; then for every
    width w = min_size, min_size + step, ..., max_size the tallest height that keeps w * h <= area, snapped down to
    the step and capped at max_size, in both orientations, if that height is at least min_size.
    """
    area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(area) // step) * step
    resos = {(side, side)}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """Where an image goes: its bucket, the size it is resized to (covering the bucket) and the aspect error."""

    bucket: Size
    resized: Size
    ar_error: float  # bucket aspect ratio minus image aspect ratio (sd-scripts' `ar_error`)


def cover_size(image: Size, bucket: Size) -> Size:
    """Smallest size with the image's aspect ratio that covers the bucket (each side rounded half up)."""
    w, h = image
    scale = max(bucket[0] / w, bucket[1] / h)
    return max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5))


def select_bucket(image: Size, buckets: list[Size]) -> Placement:
    """sd-scripts' choice with upscaling allowed: the image's exact size if it is a bucket, else the bucket of nearest
    aspect ratio (the first one in `buckets` order on a tie); the image is then resized to cover it."""
    if image in buckets:
        bucket = image
    else:
        ar = image[0] / image[1]
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - ar))
    return Placement(bucket, cover_size(image, bucket), bucket[0] / bucket[1] - image[0] / image[1])


def _snap(x: float, step: int) -> int:
    """Round half up to an integer, then down to a multiple of `step` (sd-scripts `round_to_steps`)."""
    return int(x + 0.5) // step * step


def select_bucket_no_upscale(image: Size, max_area: int, step: int) -> Placement:
    """sd-scripts' `bucket_no_upscale`: a bucket per image, never larger than the image.

    An image larger than max_area is first shrunk (keeping its aspect ratio) to max_area; of the two ways to put one
    side on the step grid (width first, height first) the one whose snapped aspect ratio is closer is used. The bucket
    is the resized size rounded down to the step, so the image is cropped, never padded.
    """
    w, h = image
    ar = w / h
    if w * h > max_area:
        rw = math.sqrt(max_area * ar)
        rh = max_area / rw
        aw = max(step, _snap(rw, step))
        ar_a = aw / max(step, _snap(aw / ar, step))
        bh = max(step, _snap(rh, step))
        ar_b = max(step, _snap(bh * ar, step)) / bh
        if abs(ar_a - ar) < abs(ar_b - ar):
            resized = (aw, int(aw / ar + 0.5))
        else:
            resized = (int(bh * ar + 0.5), bh)
    else:
        resized = (w, h)
    bucket = (max(step, resized[0] // step * step), max(step, resized[1] // step * step))
    return Placement(bucket, (max(resized[0], bucket[0]), max(resized[1], bucket[1])), bucket[0] / bucket[1] - ar)


def crop_offset(resized: Size, bucket: Size, rng: random.Random | None) -> tuple[int, int]:
    """(left, top) of the bucket-sized crop: centred (rounded down), or uniformly random when `rng` is given."""
    dx, dy = resized[0] - bucket[0], resized[1] - bucket[1]
    if rng is None:
        return dx // 2, dy // 2
    return rng.randint(0, dx), rng.randint(0, dy)


def latent_tokens(bucket: Size, vae_scale: int = 8) -> int:
    """Spatial positions of the latent of a bucket: (W / 8) * (H / 8)."""
    return (bucket[0] // vae_scale) * (bucket[1] // vae_scale)


def sequence_batch_sizes(buckets: list[Size], tokens_per_batch: int, vae_scale: int = 8) -> dict[Size, int]:
    """Batch size per bucket so that batch_size * latent tokens stays at or just under `tokens_per_batch`
    (at least 1): small buckets get large batches, large buckets small ones (Z-Image's dynamic batching)."""
    return {b: max(1, tokens_per_batch // latent_tokens(b, vae_scale)) for b in buckets}


def bucket_report(placements: list[tuple[Size, float]], batch_sizes: dict[Size, int] | None = None) -> str:
    """Text table printed at start: images per bucket (and batch size when it varies) and mean |aspect error|."""
    if not placements:
        return "buckets: no images"
    counts = Counter(b for b, _ in placements)
    lines = [f"buckets: {len(counts)} for {len(placements)} images"]
    for b in sorted(counts):
        extra = f" (batch {batch_sizes[b]})" if batch_sizes else ""
        lines.append(f"  {b[0]}x{b[1]}: {counts[b]}{extra}")
    mean_err = sum(abs(e) for _, e in placements) / len(placements)
    lines.append(f"  mean aspect-ratio error: {mean_err:.4f}")
    return "\n".join(lines)
