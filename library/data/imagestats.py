"""Pure image statistics for the dataset report (library.data.doctor): sharpness, exposure, saturation, borders, hashes.

Every function takes an already downscaled RGB uint8 array (H, W, 3) or a PIL image, so the numbers are comparable
across image sizes and cheap to compute. No torch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from library.lean import unblock

unblock("scipy")  # imagehash's pHash needs scipy, which scripts block at start-up until used (library/lean.py)
import imagehash  # noqa: E402

# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


@dataclasses.dataclass(frozen=True)
class ImageStats:
    """Statistics of one (downscaled) image. Luma values are 0-255."""

    sharpness: float  # variance of the Laplacian of contrast-stretched luma (see `stretch`)
    luma_p05: float  # 5th percentile of luma: high -> nothing in the image is dark
    luma_p95: float  # 95th percentile of luma: low -> nothing in the image is bright
    luma_mean: float
    saturated_fraction: float  # share of pixels with HSV saturation >= 0.95 and value >= 0.2 (a clipped channel)
    border_std: float  # largest per-channel standard deviation of the border ring (low -> solid background)
    border_colour: tuple[int, int, int]  # mean colour of the border ring
    mean_colour: tuple[float, float, float]
    phash: str  # imagehash.phash, 64 bits as hex
    dhash: str  # imagehash.dhash, 64 bits as hex


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float64 luma, 0-255."""
    return rgb.astype(np.float64) @ LUMA_WEIGHTS


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels: the classic focus / blur measure
    (Pech-Pacheco et al., "Diatom autofocusing in brightfield microscopy", ICPR 2000). Sharp edges and texture give
    large values; a blurred image has little high-frequency energy left and scores low."""
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    g = gray.astype(np.float64)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def stretch(gray: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0, min_range: float = 8.0) -> np.ndarray:
    """Map the [low_pct, high_pct] percentile range of luma onto 0-255 (a range narrower than `min_range` is
    widened to it). The Laplacian variance grows with the square of contrast, so without this a dark or washed-out
    but sharp image would read as blurry: exposure is reported by its own check."""
    lo, hi = np.percentile(gray, [low_pct, high_pct])
    return (gray - lo) * (255.0 / max(hi - lo, min_range))


def saturated_fraction(rgb: np.ndarray, min_saturation: float = 0.95, min_value: float = 0.2) -> float:
    """Share of pixels whose HSV saturation (max - min) / max is at least `min_saturation` and whose value max/255
    is at least `min_value` (very dark pixels have unstable hue and saturation, so they do not count)."""
    x = rgb.astype(np.float64)
    mx, mn = x.max(axis=2), x.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0)
    return float(((sat >= min_saturation) & (mx >= min_value * 255.0)).mean())


def border_ring(rgb: np.ndarray, frac: float = 0.04) -> np.ndarray:
    """The pixels of the outer ring, `frac` of the short side thick (at least 1 px), as an (N, 3) array."""
    h, w = rgb.shape[:2]
    t = max(1, int(round(min(h, w) * frac)))
    if 2 * t >= min(h, w):
        return rgb.reshape(-1, 3)
    parts = [rgb[:t].reshape(-1, 3), rgb[-t:].reshape(-1, 3), rgb[t:-t, :t].reshape(-1, 3), rgb[t:-t, -t:].reshape(-1, 3)]
    return np.concatenate(parts)


def image_stats(img: Image.Image) -> ImageStats:
    """All statistics of one RGB image (already downscaled by the caller)."""
    rgb = np.asarray(img.convert("RGB"))
    y = luma(rgb)
    ring = border_ring(rgb).astype(np.float64)
    p05, p95 = np.percentile(y, [5, 95])
    return ImageStats(
        sharpness=laplacian_variance(stretch(y)),
        luma_p05=float(p05),
        luma_p95=float(p95),
        luma_mean=float(y.mean()),
        saturated_fraction=saturated_fraction(rgb),
        border_std=float(ring.std(axis=0).max()),
        border_colour=tuple(int(round(v)) for v in ring.mean(axis=0)),
        mean_colour=tuple(float(v) for v in rgb.reshape(-1, 3).mean(axis=0)),
        phash=str(imagehash.phash(img)),
        dhash=str(imagehash.dhash(img)),
    )


def close_pairs(hashes_hex: list[str], max_bits: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every i < j whose 64-bit hex hashes differ in at most `max_bits` bits.

    One vectorised row at a time (XOR, then a byte popcount table), so memory stays O(N); time is O(N^2) byte
    operations, about a minute for 50,000 images."""
    if not hashes_hex:
        return []
    as_bytes = np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in hashes_hex])  # (N, 8)
    popcount = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    out = []
    for i in range(len(hashes_hex) - 1):
        d = popcount[np.bitwise_xor(as_bytes[i], as_bytes[i + 1:])].sum(axis=1, dtype=np.int64)
        out.extend((i, i + 1 + int(k), int(d[k])) for k in np.flatnonzero(d <= max_bits))
    return out
