"""The demo dataset: captioned images of simple coloured shapes, drawn by code (no downloads).

Quickstarts, tests and benchmarks train on it, so it is small (60 images of 96-128 px), deterministic (same seed ->
identical bytes) and easy to learn: one large shape (circle, square, triangle, diamond, star) in one colour (red,
green, blue, yellow) on a plain neutral background (white, black or a gray), in three aspect ratios (96x96, 128x96,
96x128). The shape covers 17-54% of the picture and the background adds equally to every channel, so the shape colour
dominates the image's mean colour and prompts that differ only by colour ("a red circle" vs "a blue circle") are
separable.

Layout (sd-scripts style): `<name>.png` + `<name>.txt` side by side in one folder, e.g. `red_circle_white.png` with
the caption "a red circle on a white background".

Variants:
- `shapes`: all 60 images, captions name colour, shape and background.
- `red`, `green`, `blue`, `yellow`: the 15 images of that colour (the same pixels as in `shapes`), captions WITHOUT
  the colour word ("a circle on a white background"). They are concept sets for DreamBooth / textual inversion: the
  colour is what the trained token or model has to learn, because the caption never names it.

Backgrounds are chosen per colour so that the shape always differs from the background in brightness (yellow is
never drawn on white, where it would be nearly invisible in grayscale): this keeps the dataset clean under
`check_dataset.py` (sharp edges, no near-duplicates, normal exposure).

Command: `python -m library.data.demo --out DIR [--variant shapes] [--seed 0]`.
In configs, `data.dir = "demo:shapes"` (or "demo:red", ...) is resolved by `resolve_dataset_ref`, which builds the
dataset once into `<cache>/datasets/<variant>` (see `library.paths.cache_dir`) and reuses it afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from library.errors import DataError
from library.fileio import atomic_path
from library.paths import cache_dir

# Bump when the drawing code changes, so cached copies are rebuilt instead of silently reused.
GENERATOR_VERSION = 1
DEMO_PREFIX = "demo:"
MARKER = ".sdtk-demo.json"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (250, 215, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    # Not pure 255 / 0: a clipped background would read as over- or under-exposed to the dataset report.
    "white": (240, 240, 240),
    "black": (24, 24, 24),
    "light gray": (200, 200, 200),
    "gray": (128, 128, 128),
    "dark gray": (70, 70, 70),
}
# Per colour, three backgrounds whose luma differs from the shape's by at least ~65 (of 255).
BACKGROUNDS_FOR: dict[str, tuple[str, str, str]] = {
    "red": ("white", "black", "light gray"),
    "green": ("white", "black", "light gray"),
    "blue": ("white", "black", "light gray"),
    "yellow": ("black", "gray", "dark gray"),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ((96, 96), (128, 96), (96, 128))  # square, landscape, portrait (width, height)
VARIANTS = ("shapes", *COLOURS)
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges


def make_demo_dataset(out_dir: str | Path, variant: str = "shapes", seed: int = 0) -> Path:
    """Write the demo images and captions of `variant` into `out_dir` (created if needed); returns `out_dir`."""
    if variant not in VARIANTS:
        raise DataError(f"unknown demo dataset variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for item in demo_items(variant):
        img = draw_item(item, seed)
        # No metadata chunks: the PNG bytes depend only on the pixels (and Pillow's zlib), so reruns are identical.
        img.save(out / f"{item['name']}.png", format="PNG", optimize=False)
        (out / f"{item['name']}.txt").write_text(item["caption"] + "\n", encoding="utf-8")
    marker = {"variant": variant, "seed": seed, "version": GENERATOR_VERSION, "images": len(demo_items(variant))}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return out


def demo_items(variant: str = "shapes") -> list[dict]:
    """The images of a variant: name, shape, colour, background, size and caption (no pixels)."""
    items = []
    for ci, colour in enumerate(COLOURS):
        if variant != "shapes" and colour != variant:
            continue
        for si, shape in enumerate(SHAPES):
            for bi, bg in enumerate(BACKGROUNDS_FOR[colour]):
                # Rotate the aspect ratio through the grid so every shape, colour and background gets all three.
                size = SIZES[(ci + si + bi) % len(SIZES)]
                words = f"{shape} on a {bg} background"
                caption = f"a {colour} {words}" if variant == "shapes" else f"a {words}"
                name = f"{colour}_{shape}_{bg.replace(' ', '')}"
                items.append({"name": name, "shape": shape, "colour": colour, "background": bg,
                              "size": size, "caption": caption})
    return items


def draw_item(item: dict, seed: int) -> Image.Image:
    """Draw one demo image. Its random placement depends only on (seed, name), so variants share pixels."""
    rng = random.Random(f"sdtk-demo-{seed}-{item['name']}")  # str seeds are hashed deterministically (sha512)
    w, h = item["size"]
    s = SUPERSAMPLE
    img = Image.new("RGB", (w * s, h * s), BACKGROUNDS[item["background"]])
    draw = ImageDraw.Draw(img)
    # c is the circumradius of every shape (so any rotation fits); 80-94% of the short side across.
    c = min(w, h) * s * rng.uniform(0.40, 0.47)
    cx = rng.uniform(c + 2 * s, w * s - c - 2 * s)
    cy = rng.uniform(c + 2 * s, h * s - c - 2 * s)
    angle = rng.uniform(-0.35, 0.35)  # radians, about +-20 degrees
    fill = COLOURS[item["colour"]]
    match item["shape"]:
        case "circle":
            r = c * 0.9
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        case "square":
            draw.polygon(_regular(cx, cy, c, 4, angle + math.pi / 4), fill=fill)
        case "triangle":
            draw.polygon(_regular(cx, cy, c, 3, angle - math.pi / 2), fill=fill)
        case "diamond":
            # A square on its corner, squeezed sideways (before rotating) to 80% width.
            pts = [(c * 0.8 * math.cos(a), c * math.sin(a)) for a in (0, math.pi / 2, math.pi, 3 * math.pi / 2)]
            draw.polygon([(cx + x * math.cos(angle) - y * math.sin(angle),
                           cy + x * math.sin(angle) + y * math.cos(angle)) for x, y in pts], fill=fill)
        case "star":
            outer = _regular(cx, cy, c, 5, angle - math.pi / 2)
            inner = _regular(cx, cy, c * 0.55, 5, angle - math.pi / 2 + math.pi / 5)
            draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
        case other:
            raise ValueError(f"unknown demo shape {other!r}")
    return img.resize((w, h), Image.Resampling.LANCZOS)


def _regular(cx: float, cy: float, r: float, n: int, start: float) -> list[tuple[float, float]]:
    """Vertices of a regular n-gon of circumradius r, the first at angle `start` (radians, y down)."""
    return [(cx + r * math.cos(start + 2 * math.pi * k / n), cy + r * math.sin(start + 2 * math.pi * k / n))
            for k in range(n)]


def resolve_dataset_ref(ref: str) -> Path:
    """`"demo:<variant>"` -> the built demo folder (built on first use); anything else -> `Path(ref)` unchanged."""
    if not ref.startswith(DEMO_PREFIX):
        return Path(ref)
    variant = ref[len(DEMO_PREFIX):] or "shapes"
    if variant not in VARIANTS:
        raise DataError(f"unknown demo dataset {ref!r}: choose one of "
                        + ", ".join(DEMO_PREFIX + v for v in VARIANTS))
    target = cache_dir() / "datasets" / variant
    if _is_current(target, variant):
        return target
    try:
        with atomic_path(target) as tmp:
            make_demo_dataset(tmp, variant, seed=0)
    except OSError:
        # Another process (e.g. a parallel test worker) finished the same build first: use its copy.
        if not _is_current(target, variant):
            raise
    return target


def _is_current(folder: Path, variant: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("variant") == variant and marker.get("version") == GENERATOR_VERSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo dataset (coloured shapes with captions).")
    parser.add_argument("--out", required=True, help="output folder (created; existing demo files are overwritten)")
    parser.add_argument("--variant", default="shapes", choices=VARIANTS,
                        help="'shapes' = all images with colour in the caption; a colour = that colour only, "
                             "captions without the colour word")
    parser.add_argument("--seed", type=int, default=0, help="placement seed (same seed -> identical files)")
    args = parser.parse_args(argv)
    out = make_demo_dataset(args.out, args.variant, args.seed)
    print(f"wrote {len(demo_items(args.variant))} images with captions to {out}")
    return 0


if __name__ == "__main__":
    from library.cli import main_guard

    raise SystemExit(main_guard(main)())
