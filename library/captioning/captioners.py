"""The pieces a captioning run is made of, shared by captioning folders (library/captioning/run.py) and datasets
(library/captioning/hfrows.py): the captioning models a run needs, loaded once, and images decoded batch by batch
(the next batch's images in threads meanwhile)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from PIL import Image

from library.captioning.images import load_rgb
from library.config.caption import CaptionConfig
from library.errors import ConfigError

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
