"""The captioning run: plan the missing caption files, load the models the plan needs, caption batch by batch
(the next batch's images decode in threads meanwhile), write each caption atomically, list what was skipped."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from library.captioning.files import Plan, caption_path, plan, write_caption
from library.captioning.images import load_rgb
from library.config.caption import CaptionConfig
from library.errors import ConfigError
from library.fileio import recover_interrupted_writes

TEXT_FIT = (768, 768)  # decode size hint for the captioner: processors resize to 384-768 px (BLIP, Florence-2)


def _batches(paths: list[Path], size: int, fit: tuple[int, int]) -> Iterator[tuple[list[Path], list, list]]:
    """(paths, images, [(path, reason)] of undecodable ones) per batch; the next batch decodes while this one runs."""
    chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        pending = [pool.submit(load_rgb, p, fit) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            pending = [pool.submit(load_rgb, p, fit) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            loaded = [f.result() for f in current]
            good = [(p, im) for p, im in zip(chunk, loaded) if isinstance(im, Image.Image)]
            bad = [(p, f"cannot be read: {im}") for p, im in zip(chunk, loaded) if isinstance(im, str)]
            yield [p for p, _ in good], [im for _, im in good], bad


def resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("caption.device = 'cuda' but torch finds no CUDA GPU here; use 'auto' or 'cpu'")
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_plan(cfg: CaptionConfig, *, clean: bool = True) -> Plan:
    root = Path(cfg.image_dir).expanduser()
    if clean and root.is_dir():
        recover_interrupted_writes(root)  # temporaries a killed run left beside the images (hidden files)
    return plan(root, mode=cfg.mode, extension=cfg.caption_extension, recursive=cfg.recursive,
                overwrite=cfg.overwrite)


def describe(p: Plan, cfg: CaptionConfig) -> str:
    per_level = ", ".join(f"{len(v)} {k}" for k, v in p.todo.items()) if cfg.mode == "levels" else ""
    return (f"{p.images} images in {cfg.image_dir}: {p.total} caption files to write"
            + (f" ({per_level})" if per_level else "")
            + f", {p.existing} already there and kept" + ("" if cfg.overwrite or not p.existing else
                                                          " (caption.overwrite = true replaces them)"))


def run_captioning(cfg: CaptionConfig, *, progress: bool, dry_run: bool = False,
                   out: Callable[[str], None] = print) -> Plan:
    """Caption `cfg.image_dir`; returns the plan with every skipped image and its reason added."""
    p = make_plan(cfg, clean=not dry_run)
    out(describe(p, cfg))
    if dry_run or p.total == 0:
        _report_skipped(p, out)
        return p
    device = resolve_device(cfg.device)
    captioners: dict[str, Callable[[list[Image.Image]], list[str]]] = {}
    fits: dict[str, tuple[int, int]] = {}
    tagger_fn = None
    if cfg.mode == "tags" or p.todo.get("tags"):
        from library.captioning.tagger import Tagger

        tagger_fn = Tagger(cfg.tagger, device)
        level = "caption" if cfg.mode == "tags" else "tags"
        captioners[level], fits[level] = tagger_fn, (tagger_fn.side, tagger_fn.side)
    if cfg.mode == "text" or p.todo.get("short") or p.todo.get("detailed"):
        from library.captioning.text import TextCaptioner

        text = TextCaptioner(cfg.model, dtype=cfg.dtype, device=device, keep_prompt=cfg.keep_prompt,
                             progress=progress)
        for level, gen in (("caption", cfg.text), ("short", cfg.short), ("detailed", cfg.detailed)):
            if level != "caption" or cfg.mode == "text":
                captioners[level] = lambda imgs, gen=gen: text(imgs, gen)
                fits[level] = TEXT_FIT
    from tqdm import tqdm

    written = 0
    bad: dict[Path, str] = {}
    with tqdm(total=p.total, unit="caption", disable=not progress, file=sys.stderr, dynamic_ncols=True,
              desc="captioning") as bar:
        for level, images in p.todo.items():
            if not images:
                continue
            bar.set_description(level if cfg.mode == "levels" else "captioning")
            for paths, imgs, unreadable in _batches(images, cfg.batch_size, fits[level]):
                bad.update((path, why) for path, why in unreadable if path not in bad)
                captions = captioners[level](imgs) if imgs else []
                for path, caption in zip(paths, captions):
                    if not caption.strip():
                        what = ("no tag reached the thresholds" if captioners[level] is tagger_fn else
                                "the model gave an empty " + ("caption" if level == "caption" else f"{level} caption"))
                        p.skipped.append((path, f"{what}; nothing written (a rerun tries again)"))
                        continue
                    written += 1
                    write_caption(caption_path(path, cfg.caption_extension, level), caption, written)
                bar.update(len(paths) + len(unreadable))
    p.skipped.extend(bad.items())
    out(f"wrote {written} caption files" + (f"; {len(p.skipped)} skipped (listed below)" if p.skipped else ""))
    _report_skipped(p, out)
    return p


def _report_skipped(p: Plan, out: Callable[[str], None]) -> None:
    for path, why in p.skipped:
        out(f"  skipped {path}: {why}")
