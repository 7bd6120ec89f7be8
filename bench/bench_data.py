"""Data pipeline benchmark: images/s for decode + resize + bucket assignment, and latent-cache-hit batches/s.

    python bench/bench_data.py [--quick] [--images 1000] [--resolution 512] [--batch-size 4] [--workers 0 1 2]

Generates N JPEGs whose long side is 1024 px (five aspect ratios, textured so they decode like photos, not like flat
drawings) once into `<cache>/bench/jpegs-<N>` (reused by later runs), then times one epoch of:
- `pil+buckets`: the bare pipeline: sizes from headers (library.data.images.read_header), the sd-scripts bucket
  ladder and nearest-aspect bucket (library.data.buckets), same-bucket batches (library.data.sampler), full decode +
  Lanczos resize + crop to a tensor (library.data.images) in a torch DataLoader with 0, 1, 2 workers;
- `loader`: the real training data path, `library.data.loader.build_train_data` (indexing, captions included);
- `cache-hit`: the loader with `cache_latents` on disk (a tiny /8 VAE; the first `--cache-images` images, 100 by
  default, since encoding on a CPU is slow): the cache is filled first (`cache-fill`, timed but not a throughput
  figure), then the loader is rebuilt from the manifest and one epoch, which never decodes an image, is timed.
Each timing covers a whole epoch including worker start-up, as a training run sees it. Prints a table and writes
bench/results/data.json (`--quick`: 100 images, results/data-quick.json). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.fileio import atomic_path, write_text_atomic  # noqa: E402
from library.paths import cache_dir  # noqa: E402

ASPECTS = ((1024, 1024), (1024, 768), (768, 1024), (1024, 576), (576, 1024))
RESULTS = Path(__file__).resolve().parent / "results"


def make_jpegs(n: int, seed: int = 0) -> Path:
    """N textured JPEGs (long side 1024) with one-line captions, built once into the cache and reused."""
    folder = cache_dir() / "bench" / f"jpegs-{n}-s{seed}"
    if (folder / ".done").is_file():
        return folder
    t0 = time.perf_counter()
    # One noise field, cropped at a different place per image: per-pixel detail at a fraction of the cost.
    noise = np.random.default_rng(seed).integers(-12, 13, (1280, 1280, 3), dtype=np.int16)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        for i in range(n):
            rng = random.Random(f"bench-data-{seed}-{i}")
            size = ASPECTS[i % len(ASPECTS)]
            _textured(size, rng, noise).save(tmp / f"{i:05d}.jpg", quality=90)
            (tmp / f"{i:05d}.txt").write_text(f"image {i}, bench, aspect {size[0]}x{size[1]}", encoding="utf-8")
        (tmp / ".done").write_text("ok\n")
    print(f"generated {n} JPEGs in {time.perf_counter() - t0:.1f} s into {folder}", file=sys.stderr)
    return folder


def _textured(size: tuple[int, int], rng: random.Random, noise: np.ndarray) -> Image.Image:
    """Shapes over a colour gradient plus noise: JPEG size and decode cost closer to a photo's than flat art."""
    w, h = size
    img = Image.merge("RGB", [Image.linear_gradient("L").resize((w, h)),
                              Image.linear_gradient("L").rotate(90).resize((w, h)),
                              Image.new("L", (w, h), rng.randint(0, 255))])
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = rng.randint(0, w), rng.randint(0, h), rng.randint(40, 300)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    ox, oy = rng.randint(0, noise.shape[1] - w), rng.randint(0, noise.shape[0] - h)
    pixels = np.asarray(img, dtype=np.int16) + noise[oy:oy + h, ox:ox + w]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class _BucketedImages:
    """torch Dataset: batch of keys -> stacked pixels of one bucket (decode + resize + crop, centre crop)."""

    def __init__(self, paths: list[Path], placements: list):
        self.paths, self.placements = paths, placements

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from library.data.buckets import crop_offset
        from library.data.images import load_image, prepare_image

        pl = self.placements[i]
        pixels, _ = prepare_image(load_image(self.paths[i]), pl.resized, pl.bucket,
                                  crop_offset(pl.resized, pl.bucket, None), False, False)
        return pixels


def bench_pil_buckets(folder: Path, resolution: int, batch_size: int, workers: int) -> dict:
    """The bare pipeline (no captions, no config): headers -> buckets -> same-bucket batches -> decode + resize."""
    import torch

    from library.data.buckets import make_bucket_resolutions, select_bucket
    from library.data.images import read_header
    from library.data.sampler import BucketBatchSampler

    t0 = time.perf_counter()
    paths = sorted(folder.glob("*.jpg"))
    ladder = make_bucket_resolutions((resolution, resolution), 256, 2 * resolution, 64)
    placements = [select_bucket(read_header(p).size, ladder) for p in paths]
    buckets = sorted({pl.bucket for pl in placements})
    groups = [[i for i, pl in enumerate(placements) if pl.bucket == b] for b in buckets]
    sampler = BucketBatchSampler(groups, [batch_size] * len(groups), seed=0)
    t_index = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(_BucketedImages(paths, placements), batch_sampler=sampler,
                                         num_workers=workers, collate_fn=torch.stack)
    n = batches = 0
    t1 = time.perf_counter()
    for batch in loader:
        n += batch.shape[0]
        batches += 1
    dt = time.perf_counter() - t1
    return {"pipeline": "pil+buckets", "workers": workers, "images": n, "batches": batches, "seconds": dt,
            "images_per_s": n / dt, "batches_per_s": batches / dt, "index_seconds": t_index}


def _loader_available() -> bool:
    try:
        import library.data.loader  # noqa: F401
    except ImportError:
        return False
    return True


def _data_config(folder: Path, resolution: int, batch_size: int, workers: int, **extra):
    from library.config.data import DataConfig

    cfg = DataConfig(train_data_dir=str(folder), resolution=resolution, batch_size=batch_size, num_workers=workers,
                     **extra)
    cfg.validate()
    return cfg


def _time_epoch(td, pipeline: str, workers: int, index_seconds: float) -> dict:
    n = batches = 0
    t0 = time.perf_counter()
    for batch in td:
        n += len(batch["captions"])
        batches += 1
    dt = time.perf_counter() - t0
    return {"pipeline": pipeline, "workers": workers, "images": n, "batches": batches, "seconds": dt,
            "images_per_s": n / dt, "batches_per_s": batches / dt, "index_seconds": index_seconds}


def bench_loader(folder: Path, resolution: int, batch_size: int, workers: int) -> dict:
    """The training data path: build_train_data (index, captions, buckets, sampler) and one epoch of batches."""
    from library.data.loader import build_train_data

    t0 = time.perf_counter()
    td = build_train_data(_data_config(folder, resolution, batch_size, workers), default_resolution=resolution,
                          seed=0)
    return _time_epoch(td, "loader", workers, time.perf_counter() - t0)


def tiny_vae():
    """A /8 VAE with 16-32 channels (the test models' size): encoding is cheap, latents have the real shape."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                         latent_channels=4).eval()


def bench_cache_hits(folder: Path, resolution: int, batch_size: int, workers: list[int], n_images: int) -> list[dict]:
    """Batches/s when every latent comes from the cache, on the first `n_images` images (VAE encoding on a CPU is
    slow, and a cache hit costs the same whatever the count): the on-disk cache is filled once (`cache-fill`), then
    rebuilt from its manifest and iterated (`cache-hit`, one row per worker count)."""
    from library.data.loader import build_train_data

    vae = tiny_vae()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdtk-bench-cache-") as tmp:
        subset = Path(tmp) / "images"
        subset.mkdir()
        for src in sorted(folder.glob("*.jpg"))[:n_images]:
            for f in (src, src.with_suffix(".txt")):
                (subset / f.name).symlink_to(f)
        extra = {"cache_latents": True, "cache_latents_to_disk": True, "cache_dir": str(Path(tmp) / "latents")}
        t0 = time.perf_counter()
        build_train_data(_data_config(subset, resolution, batch_size, max(workers), **extra),
                         default_resolution=resolution, seed=0, vae=vae)
        fill = time.perf_counter() - t0
        n = len(list(subset.glob("*.jpg")))
        rows.append({"pipeline": "cache-fill", "workers": max(workers), "images": n, "batches": 0, "seconds": fill,
                     "images_per_s": n / fill, "batches_per_s": 0.0, "index_seconds": 0.0})
        for w in workers:
            t0 = time.perf_counter()
            td = build_train_data(_data_config(subset, resolution, batch_size, w, **extra),
                                  default_resolution=resolution, seed=0, vae=vae)
            rows.append(_time_epoch(td, "cache-hit", w, time.perf_counter() - t0))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="100 images (a smoke run)")
    p.add_argument("--images", type=int, default=None, help="number of JPEGs (default 1000, --quick 100)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (bucket area = resolution^2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts to time")
    p.add_argument("--no-cache", action="store_true", help="skip the latent-cache-hit measurement")
    p.add_argument("--cache-images", type=int, default=100,
                   help="images encoded for the cache-hit measurement (the VAE is slow on a CPU)")
    p.add_argument("--out", default=None, help="JSON output (default bench/results/data.json or data-quick.json)")
    args = p.parse_args(argv)
    n = args.images or (100 if args.quick else 1000)
    folder = make_jpegs(n)
    rows = [bench_pil_buckets(folder, args.resolution, args.batch_size, w) for w in args.workers]
    notes = []
    if _loader_available():
        rows += [bench_loader(folder, args.resolution, args.batch_size, w) for w in args.workers]
        if not args.no_cache:
            rows += bench_cache_hits(folder, args.resolution, args.batch_size, args.workers,
                                     min(n, args.cache_images))
    else:
        notes.append("library.data.loader is not available yet: only the bare pil+buckets pipeline was timed")
    print(format_table(rows, n, args))
    for note in notes:
        print(f"note: {note}")
    result = {"benchmark": "data", "images": n, "cache_images": min(n, args.cache_images),
              "resolution": args.resolution, "batch_size": args.batch_size,
              "image_long_side": 1024, "rows": rows, "notes": notes,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                          "torch": _torch_version()}}
    out = Path(args.out) if args.out else RESULTS / ("data-quick.json" if args.quick else "data.json")
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"results written to {out}")
    return 0


def format_table(rows: list[dict], n: int, args) -> str:
    lines = [f"data pipeline, {n} JPEGs (long side 1024) -> buckets of {args.resolution}^2 area, "
             f"batch {args.batch_size}, {os.cpu_count()} CPUs",
             f"  {'pipeline':<12} {'workers':>7} {'images':>7} {'seconds':>8} {'images/s':>9} {'batches/s':>10}"]
    for r in rows:
        lines.append(f"  {r['pipeline']:<12} {r['workers']:>7} {r['images']:>7} {r['seconds']:>8.2f} "
                     f"{r['images_per_s']:>9.1f} {r['batches_per_s']:>10.1f}")
    base = next((r for r in rows if r["pipeline"] == "pil+buckets" and r["workers"] == 0), None)
    if base:
        lines.append("  ratios to pil+buckets with 0 workers: " + ", ".join(
            f"{r['pipeline']}/{r['workers']}w {r['images_per_s'] / base['images_per_s']:.2f}x" for r in rows
            if r is not base and r["pipeline"] != "cache-fill"))
    return "\n".join(lines)


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
