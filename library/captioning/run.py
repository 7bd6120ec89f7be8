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


def batches(keys: list, size: int, fit: tuple[int, int], source: Callable[[list], list] | None = None,
            decode: Callable = load_rgb) -> Iterator[tuple[list, list, list]]:
    """(keys, images, [(key, reason)] of undecodable ones) per batch; the next batch decodes in threads while this
    one runs. `source(chunk)` turns a chunk of keys into what `decode(item, fit)` reads (default: the keys, paths);
    it runs in this thread, the decoding in the pool."""
    chunks = [keys[i:i + size] for i in range(0, len(keys), size)]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        def submit(k: int) -> list:
            items = source(chunks[k]) if source else chunks[k]
            return [pool.submit(decode, item, fit) for item in items]

        pending = submit(0) if chunks else []
        for k, chunk in enumerate(chunks):
            current, pending = pending, (submit(k + 1) if k + 1 < len(chunks) else [])
            loaded = [f.result() for f in current]
            good = [(key, im) for key, im in zip(chunk, loaded) if isinstance(im, Image.Image)]
            bad = [(key, f"cannot be read: {im}") for key, im in zip(chunk, loaded) if isinstance(im, str)]
            yield [key for key, _ in good], [im for _, im in good], bad


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
    """Caption `cfg.image_dir` (or `cfg.dataset_path`: library/captioning/hfrows.py); returns the plan with every
    skipped image and its reason added."""
    if cfg.dataset_path:
        from library.captioning.hfrows import caption_dataset

        return caption_dataset(cfg, progress=progress, dry_run=dry_run, out=out)
    p = make_plan(cfg, clean=not dry_run)
    out(describe(p, cfg))
    if dry_run or p.total == 0:
        _report_skipped(p, out)
        return p
    captioners, fits, tagger = load_captioners(cfg, [level for level, todo in p.todo.items() if todo], progress)
    from tqdm import tqdm

    written = 0
    bad: dict[Path, str] = {}
    with tqdm(total=p.total, unit="caption", disable=not progress, file=sys.stderr, dynamic_ncols=True,
              desc="captioning") as bar:
        for level, images in p.todo.items():
            if not images:
                continue
            bar.set_description(level if cfg.mode == "levels" else "captioning")
            for paths, imgs, unreadable in batches(images, cfg.batch_size, fits[level]):
                bad.update((path, why) for path, why in unreadable if path not in bad)
                captions = captioners[level](imgs) if imgs else []
                for path, caption in zip(paths, captions):
                    if not caption.strip():
                        p.skipped.append((path, empty_reason(level, captioners[level] is tagger)))
                        continue
                    written += 1
                    write_caption(caption_path(path, cfg.caption_extension, level), caption, written)
                bar.update(len(paths) + len(unreadable))
    p.skipped.extend(bad.items())
    out(f"wrote {written} caption files" + (f"; {len(p.skipped)} skipped (listed below)" if p.skipped else ""))
    _report_skipped(p, out)
    return p


def load_captioners(cfg: CaptionConfig, levels: list[str], progress: bool):
    """The models the given levels need (each loaded once): {level: captioner}, {level: decode size}, the tagger."""
    device = resolve_device(cfg.device)
    captioners: dict[str, Callable[[list[Image.Image]], list[str]]] = {}
    fits: dict[str, tuple[int, int]] = {}
    tagger = None
    tag_level = "caption" if cfg.mode == "tags" else "tags"
    if tag_level in levels:
        from library.captioning.tagger import Tagger

        tagger = Tagger(cfg.tagger, device)
        captioners[tag_level], fits[tag_level] = tagger, (tagger.side, tagger.side)
    gens = {"caption": cfg.text, "short": cfg.short, "detailed": cfg.detailed}
    text_levels = [lv for lv in levels if lv not in captioners]
    if text_levels:
        from library.captioning.text import TextCaptioner

        text = TextCaptioner(cfg.model, dtype=cfg.dtype, device=device, keep_prompt=cfg.keep_prompt,
                             progress=progress)
        for level in text_levels:
            captioners[level] = lambda imgs, gen=gens[level]: text(imgs, gen)
            fits[level] = TEXT_FIT
    return captioners, fits, tagger


def empty_reason(level: str, is_tagger: bool) -> str:
    what = ("no tag reached the thresholds" if is_tagger else
            "the model gave an empty " + ("caption" if level == "caption" else f"{level} caption"))
    return f"{what}; nothing written (a rerun tries again)"


def _report_skipped(p: Plan, out: Callable[[str], None]) -> None:
    for path, why in p.skipped:
        out(f"  skipped {path}: {why}")
