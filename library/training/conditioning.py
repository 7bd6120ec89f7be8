"""Text conditioning for training batches: encoded live while a text encoder trains, else cached per caption.

Split from the loop so that the loop reads as steps; a family's own encoding lives in library/models/text.py.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from library.models.model import SDModel
from library.models.text import TextCond, encode_text, tokenize

MAX_CACHED = 50_000  # bounded: shuffled / dropped captions rarely repeat


class TextConditioner:
    """`cond(captions, live)`: the TextCond of a batch; `live` = the text encoders train at this step."""

    def __init__(self, model: SDModel, device: torch.device, clip_skip: int, autocast: Callable = nullcontext):
        self.model, self.device, self.clip_skip, self.autocast = model, device, clip_skip, autocast
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _encode(self, captions: list[str]) -> TextCond:
        tokens = [t.to(self.device) for t in tokenize(self.model, captions)]
        return encode_text(self.model, tokens, clip_skip=self.clip_skip)

    def cond(self, captions: list[str], live: bool) -> TextCond:
        if live:
            with self.autocast():
                return self._encode(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if len(self.cache) + len(missing) > MAX_CACHED:
            with torch.no_grad(), self.autocast():
                return self._encode(captions)
        if missing:
            with torch.no_grad(), self.autocast():
                c = self._encode(missing)
            for i, cap in enumerate(missing):
                self.cache[cap] = (c.hidden[i], None if c.pooled is None else c.pooled[i])
        hidden = torch.stack([self.cache[c][0] for c in captions])
        first = self.cache[captions[0]][1]
        pooled = None if first is None else torch.stack([self.cache[c][1] for c in captions])
        return TextCond(hidden, pooled)

    def cache_all(self, captions: list[str], cache_dir=None, precision: str = "no") -> None:
        """Encode every caption now (or read it from the on-disk cache in `cache_dir`, which
        library/data/text_cache.py keeps current); the text encoders then leave the GPU (back only to sample)."""
        if cache_dir is not None:
            from library.data.text_cache import load_or_encode, text_cache_record

            def encode(caps: list[str]):
                with torch.no_grad(), self.autocast():
                    c = self._encode(caps)
                return c.hidden, c.pooled

            record = text_cache_record(self.model, self.clip_skip, precision)
            self.cache.update(load_or_encode(captions, encode, cache_dir, record, device=self.device))
        else:
            for i in range(0, len(captions), 64):
                self.cond(captions[i:i + 64], live=False)
        if self.device.type != "cpu":
            for enc in self.model.text_encoders:
                enc.to("cpu")
