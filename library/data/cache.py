"""VAE latent cache, in memory or on disk, with a manifest so a stale entry is detected and re-encoded.

Latents are `(z - shift_factor) * scaling_factor` with z a sample of the VAE's posterior, as diffusers' training
scripts and sd-scripts cache them (`latent_dist.sample()`). We draw that sample ourselves, z = mean + std * noise,
with the noise from a generator seeded by the image's cache key, which is what `DiagonalGaussianDistribution
.sample(generator)` computes, but makes each image's latent independent of how images are batched.

On disk: one safetensors file per image (`latents`, and `latents_flipped` / `mask` / `mask_flipped` when used) in
`cache_dir`, and `manifest.json` recording, per image and bucket, what the latent was made from: the VAE identity
(hash of its config and weights), dtype, bucket, resize, crop, flip, mask, and the image's mtime and size. Any
difference re-encodes that image (and says how many and why); nothing stale is reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from library.data.buckets import Size
from library.data.images import BadImage, load_image, prepare_image
from library.fileio import atomic_path, write_text_atomic

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True)
class CacheRequest:
    """One image to have in the cache."""

    item: int  # index of the image in the data index
    path: Path
    resized: Size
    bucket: Size
    crop: tuple[int, int]
    flip: bool  # also cache the mirrored image
    mask: bool  # also cache the alpha mask
    mtime_ns: int
    file_size: int
    source: object = None  # hfdata.RowImages: the image is `row` of a dataset (keyed by its fingerprint)
    row: int = -1

    @property
    def key(self) -> str:
        where = self.source.cache_key(self.row) if self.source is not None else self.path.resolve()
        return f"{where}|{self.bucket[0]}x{self.bucket[1]}|{self.resized[0]}x{self.resized[1]}"

    def record(self, vae_id: str, dtype: torch.dtype) -> dict:
        """What the cached latent depends on (compared field by field with the manifest)."""
        return {"vae": vae_id, "dtype": str(dtype), "bucket": list(self.bucket), "resized": list(self.resized),
                "crop": list(self.crop), "flip": self.flip, "mask": self.mask, "mtime_ns": self.mtime_ns,
                "size": self.file_size}


def vae_identity(vae) -> str:
    """Hash of the VAE's config and every weight: a different VAE (or a fine-tuned one) gets a different id."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in vae.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class LatentStore:
    """Cached latents by image index: held in memory, or loaded from their safetensors file when asked."""

    def __init__(self) -> None:
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.files: dict[int, str] = {}

    def __contains__(self, item: int) -> bool:
        return item in self.memory or item in self.files

    def get(self, item: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        entry = self.memory[item] if item in self.memory else load_file(self.files[item])
        suffix = "_flipped" if flipped else ""
        if flipped and "latents_flipped" not in entry:
            raise RuntimeError("flip requested but the cache holds no flipped latent")  # a bug, not a user error
        return entry["latents" + suffix], entry.get("mask" + suffix)


class _EncodeInputs(torch.utils.data.Dataset):
    """Decoded, resized, cropped pixels of each request (in DataLoader workers); a bad file becomes its reason."""

    def __init__(self, requests: list[CacheRequest]):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> dict:
        r = self.requests[i]
        try:
            img = r.source.load(r.row, r.resized) if r.source is not None else load_image(r.path, r.resized)
            pixels, mask = prepare_image(img, r.resized, r.bucket, r.crop, False, r.mask)
        except BadImage as e:
            return {"i": i, "error": str(e)}
        return {"i": i, "pixels": pixels, "mask": mask}


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """Scaled latents of a batch [B, 3, H, W] in [-1, 1]: (mean + std * noise(key) - shift) * scale."""
    p = next(vae.parameters())
    dist = vae.encode(pixels.to(p.device, p.dtype)).latent_dist
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(_key_seed(k)))
                         for k in keys]).to(dist.mean.device, dist.mean.dtype)
    z = dist.mean + dist.std * noise
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def build_latent_store(requests: list[CacheRequest], vae, *, cache_dir: Path | None, dtype: torch.dtype,
                       batch_size: int, num_workers: int) -> tuple[LatentStore, list[tuple[Path, str]]]:
    """Encode what is not validly cached yet; return the store and the images that could not be decoded.

    `cache_dir` None keeps everything in memory (encoded every run); otherwise entries whose manifest record matches
    are reused without calling the VAE.
    """
    from tqdm import tqdm

    store, skipped = LatentStore(), []
    vae_id = vae_identity(vae)
    manifest = read_manifest(cache_dir, FORMAT, "latent cache manifest {path} is unreadable; rebuilding the cache") \
        if cache_dir else {}
    todo, stale = [], Counter()
    for r in requests:
        old = manifest.get(r.key)
        file = cache_dir / old["file"] if cache_dir and old else None
        if old is not None and old["record"] == r.record(vae_id, dtype) and file.is_file():
            store.files[r.item] = str(file)
            continue
        if old is not None:
            stale[why_stale(old["record"], r.record(vae_id, dtype), _LATENT_REASONS) if file.is_file() else "file missing"] += 1
        todo.append(r)
    if cache_dir and (stale or requests):
        reused = len(requests) - len(todo)
        why = ", ".join(f"{n} {reason}" for reason, n in stale.items())
        print(f"latent cache {cache_dir}: {reused} reused, {len(todo)} to encode"
              + (f" (stale, rebuilt: {why})" if why else ""), file=sys.stderr)
    if todo:
        todo.sort(key=lambda r: r.bucket)  # a VAE batch needs one shape
        groups: list[list[int]] = []
        for i, r in enumerate(todo):
            if groups and len(groups[-1]) < batch_size and todo[groups[-1][0]].bucket == r.bucket:
                groups[-1].append(i)
            else:
                groups.append([i])
        loader = torch.utils.data.DataLoader(_EncodeInputs(todo), batch_sampler=groups, num_workers=num_workers,
                                             collate_fn=list)
        for batch in tqdm(loader, desc="caching latents", total=len(groups), file=sys.stderr, dynamic_ncols=True):
            good = [b for b in batch if "error" not in b]
            skipped.extend((todo[b["i"]].path, b["error"]) for b in batch if "error" in b)
            if not good:
                continue
            reqs = [todo[b["i"]] for b in good]
            pixels = torch.stack([b["pixels"] for b in good])
            lat = encode_latents(vae, pixels, [r.key for r in reqs])
            lat_f = encode_latents(vae, pixels.flip(-1), [r.key + "|flip" for r in reqs]) if reqs[0].flip else None
            for j, (r, b) in enumerate(zip(reqs, good)):
                entry = {"latents": lat[j].to(dtype).contiguous()}
                if lat_f is not None:
                    entry["latents_flipped"] = lat_f[j].to(dtype).contiguous()
                if b["mask"] is not None:
                    entry["mask"] = b["mask"].contiguous()
                    if r.flip:
                        entry["mask_flipped"] = b["mask"].flip(-1).contiguous()
                if cache_dir is None:
                    store.memory[r.item] = entry
                    continue
                name = hashlib.sha256(r.key.encode()).hexdigest()[:24] + ".safetensors"
                with atomic_path(cache_dir / name) as tmp:
                    save_file(entry, str(tmp))
                manifest[r.key] = {"file": name, "record": r.record(vae_id, dtype)}
                store.files[r.item] = str(cache_dir / name)
        if cache_dir is not None:
            _write_manifest(cache_dir, manifest)
    return store, skipped


_LATENT_REASONS = {"vae": "VAE changed", "dtype": "dtype changed", "mtime_ns": "image changed",
                   "size": "image changed"}


def why_stale(old: dict, new: dict, reasons: dict[str, str]) -> str:
    """Why a cache entry recorded as `old` no longer fits `new`: the first differing key's reason (shared by the
    latent and text-encoder caches)."""
    for k in new:
        if old.get(k) != new[k]:
            return reasons.get(k, f"{k} changed")
    return "format changed"


def read_manifest(cache_dir: Path, fmt: int, unreadable: str) -> dict:
    """The entries of `cache_dir`'s manifest written in format `fmt`; {} when there is none, another format, or an
    unreadable one (then `unreadable` is printed as a warning naming the file)."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print(f"warning: {unreadable.format(path=path)}", file=sys.stderr)
        return {}
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_manifest(cache_dir: Path, entries: dict) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache_dir / MANIFEST, json.dumps({"format": FORMAT, "entries": entries}, indent=1))
