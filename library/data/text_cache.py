"""Text-encoder output cache on disk (`data.cache_text_encoder_outputs_to_disk`), the sibling of the latent cache.

With `data.cache_text_encoder_outputs` every (fixed) caption is encoded once before training; this keeps those outputs
in `cache_dir` so the next run reads them instead of running the text encoder(s) again, as sd-scripts'
`--cache_text_encoder_outputs_to_disk` does (it writes one `_te_outputs.npz` beside each image; here one safetensors
file per distinct caption, so captions shared by many images are stored once).

On disk: `<sha256 of the caption>.safetensors` holding `hidden` [77, C] (and `pooled` [P] for SDXL), and
`manifest.json` recording, per caption, what its outputs were made from (`text_cache_record`: family, a hash of every
text encoder's config and weights, the tokenizers, max length, clip_skip, mixed precision) and the shapes written. A
record that differs re-encodes that caption and says how many and why; an unreadable or wrong-shaped file is named and
re-encoded; every file and the manifest are written atomically (library/fileio.py), so nothing stale or half-written is
ever reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from library.data.cache import read_manifest, why_stale
from library.fileio import atomic_path, write_text_atomic

MANIFEST = "manifest.json"
FORMAT = 1
# Captions encoded per text-encoder call, and how many calls between manifest writes (so an interrupted first run
# keeps most of its work: files without a manifest entry are simply encoded again).
ENCODE_BATCH = 64
MANIFEST_EVERY = 16

Outputs = tuple[torch.Tensor, "torch.Tensor | None"]
EncodeFn = Callable[[list[str]], Outputs]  # captions -> (hidden [B, 77, C], pooled [B, P] or None)


def _hash_module(h, module: torch.nn.Module) -> None:
    h.update(json.dumps(module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config),
                        sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _tokenizer_identity(tokenizer) -> str:
    """Hash of what decides the token ids: the full tokenizer definition (vocabulary, merges, normaliser, special
    tokens) where a fast tokenizer has one, else the vocabulary; plus max length and pad token."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the padding / truncation state, which the tokenizer sets on its backend at each call.
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"|{tokenizer.model_max_length}|{tokenizer.pad_token}".encode())
    return h.hexdigest()[:32]


def text_cache_record(model, clip_skip: int, precision: str) -> dict:
    """What a caption's text-encoder outputs depend on, for `load_or_encode(record=...)`.

    `model` is an SDModel (family, text_encoders, tokenizers); `precision` the run's mixed precision ("no", "fp16",
    "bf16"), under which the outputs are computed. Hashing the weights (as `cache.vae_identity` does for the VAE)
    catches a fine-tuned or swapped text encoder that keeps its name.
    """
    h = hashlib.sha256()
    for te in model.text_encoders:
        _hash_module(h, te)
    return {"family": model.family, "text_encoders": h.hexdigest()[:32],
            "tokenizers": [_tokenizer_identity(t) for t in model.tokenizers],
            "max_length": [int(t.model_max_length) for t in model.tokenizers], "clip_skip": int(clip_skip),
            "precision": precision}


def caption_file(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32] + ".safetensors"


def load_or_encode(captions: list[str], encode_fn: EncodeFn, cache_dir: Path, record: dict, *,
                   device: torch.device | str | None = None) -> dict[str, Outputs]:
    """{caption: (hidden [77, C], pooled [P] or None)} for every caption, read from `cache_dir` where its manifest
    record equals `record`, encoded with `encode_fn` (and written) otherwise. Tensors are moved to `device`."""
    cache_dir = Path(cache_dir)
    wanted = list(dict.fromkeys(captions))
    manifest = read_manifest(cache_dir, FORMAT, "text-encoder cache manifest {path} is unreadable; encoding every "
                             "caption again")
    out: dict[str, Outputs] = {}
    todo: list[str] = []
    stale: Counter = Counter()
    for caption in wanted:
        entry = manifest.get(caption)
        if entry is None:
            todo.append(caption)
            continue
        if entry.get("record") != record:
            stale[why_stale(entry.get("record") or {}, record, _REASONS)] += 1
            todo.append(caption)
            continue
        loaded = _load_entry(cache_dir / entry["file"], entry, caption)
        if loaded is None:
            stale["file unreadable"] += 1
            todo.append(caption)
            continue
        out[caption] = loaded
    if wanted:
        why = ", ".join(f"{n} {reason}" for reason, n in stale.items())
        print(f"text-encoder cache {cache_dir}: {len(wanted) - len(todo)} reused, {len(todo)} to encode"
              + (f" (stale, rebuilt: {why})" if why else ""), file=sys.stderr)
    for n, start in enumerate(range(0, len(todo), ENCODE_BATCH)):
        chunk = todo[start:start + ENCODE_BATCH]
        with torch.no_grad():
            hidden, pooled = encode_fn(chunk)
        for i, caption in enumerate(chunk):
            tensors = {"hidden": hidden[i].detach().cpu().contiguous()}
            if pooled is not None:
                tensors["pooled"] = pooled[i].detach().cpu().contiguous()
            name = caption_file(caption)
            with atomic_path(cache_dir / name) as tmp:
                save_file(tensors, str(tmp))
            manifest[caption] = {"file": name, "record": record,
                                 "shapes": {k: list(v.shape) for k, v in tensors.items()},
                                 "dtype": str(tensors["hidden"].dtype)}
            out[caption] = (tensors["hidden"], tensors.get("pooled"))
        if (n + 1) % MANIFEST_EVERY == 0:
            _write_manifest(cache_dir, manifest)
    if todo:
        _write_manifest(cache_dir, manifest)
    if device is not None:
        out = {c: (h.to(device), None if p is None else p.to(device)) for c, (h, p) in out.items()}
    return out


def _load_entry(path: Path, entry: dict, caption: str) -> Outputs | None:
    """The cached outputs of one caption, or None (with the reason on stderr) when the file is missing, unreadable,
    or holds other tensors than the manifest says it wrote."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        print(f"warning: text-encoder cache file {path} (caption {caption[:60]!r}) is unreadable ({e}); "
              "encoding it again", file=sys.stderr)
        return None
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    dtype = str(tensors["hidden"].dtype) if "hidden" in tensors else None
    if shapes != entry.get("shapes") or dtype != entry.get("dtype"):
        print(f"warning: text-encoder cache file {path} (caption {caption[:60]!r}) holds {shapes}, not what its "
              f"manifest says ({entry.get('shapes')}, {entry.get('dtype')}); encoding it again", file=sys.stderr)
        return None
    return tensors["hidden"], tensors.get("pooled")


_REASONS = {"text_encoders": "text encoder changed", "tokenizers": "tokenizer changed",
            "clip_skip": "clip_skip changed", "max_length": "max length changed", "family": "family changed",
            "precision": "precision changed"}


def _write_manifest(cache_dir: Path, entries: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache_dir / MANIFEST, json.dumps({"format": FORMAT, "entries": entries}, indent=1))
