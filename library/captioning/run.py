"""The captioning run: plan the missing caption files, load the models the plan needs, caption batch by batch
(the next batch's images decode in threads meanwhile), write each caption atomically, list what was skipped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from library.captioning.captioners import batches, empty_reason, load_captioners
from library.captioning.files import Plan, caption_path, plan, write_caption
from library.config.caption import CaptionConfig
from library.fileio import recover_interrupted_writes


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


def _report_skipped(p: Plan, out: Callable[[str], None]) -> None:
    for path, why in p.skipped:
        out(f"  skipped {path}: {why}")
