"""Image files: header-only size reads for indexing, cheap truncation checks, decoding with EXIF orientation,
resize-to-cover + crop + flip into a tensor, and the alpha channel as a loss mask at latent resolution."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from library.data.buckets import Size

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
EXIF_ORIENTATION = 0x0112
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class BadImage(Exception):
    """An image file that cannot be used; the message is the reason shown in the skipped-files list."""


@dataclass(frozen=True)
class ImageHeader:
    size: Size  # (width, height) as displayed, i.e. after the EXIF rotation
    mtime_ns: int
    file_size: int
    has_alpha: bool


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_header(path: Path) -> ImageHeader:
    """Size, EXIF orientation and alpha from the file header only (no pixel decode), plus a tail check that catches
    truncated PNG / JPEG / WebP files cheaply. Raises BadImage with the reason."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadImage(f"cannot read ({e.strerror})") from None
    with f:  # one open for the header and the tail check (100k-image folders: syscalls add up)
        st = os.fstat(f.fileno())
        return _header_of(f, st.st_size, st.st_mtime_ns, lambda: load_image(path))


def read_header_bytes(data: bytes) -> ImageHeader:
    """`read_header` for an image held in memory (a row of a Hugging Face dataset): mtime 0, size len(data)."""
    return _header_of(io.BytesIO(data), len(data), 0, lambda: load_image(data))


def _header_of(f, size: int, mtime_ns: int, full_decode) -> ImageHeader:
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(f) as img:
            w, h = img.size
            fmt = img.format
            # PIL's PNG getexif() decodes the whole image when the eXIf chunk is not before the pixels; only
            # look when the header already carried it (JPEG APP1 / WebP EXIF chunks are header data).
            has_exif = fmt in ("JPEG", "WEBP", "MPO") or (fmt == "PNG" and "exif" in img.info)
            orientation = img.getexif().get(EXIF_ORIENTATION, 1) if has_exif else 1
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image ({type(e).__name__})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt ({e})") from None
    if w < 1 or h < 1:
        raise BadImage(f"invalid size {w}x{h}")
    _check_tail(f, fmt, size, full_decode)
    if orientation in _ROTATED:
        w, h = h, w
    return ImageHeader((w, h), mtime_ns, size, has_alpha)


def _check_tail(f, fmt: str | None, size: int, full_decode) -> None:
    if fmt == "WEBP":
        f.seek(0)
        head = f.read(8)
        riff = int.from_bytes(head[4:8], "little") + 8
        if size < riff:
            raise BadImage(f"truncated (RIFF says {riff} bytes, file has {size})")
        return
    f.seek(max(0, size - 4096))
    tail = f.read()
    missing = ("PNG end chunk" if fmt == "PNG" and b"IEND" not in tail[-32:]
               else "JPEG end marker" if fmt == "JPEG" and b"\xff\xd9" not in tail else "")
    if missing:
        # Usually a cut-off file; but some valid files carry trailing data (phone "motion photos" append a video
        # after the JPEG), so only a full decode decides. This is the rare path, the common one reads no pixels.
        try:
            full_decode()
        except BadImage as e:
            raise BadImage(f"truncated (no {missing}; {e})") from None


def load_image(path: Path | bytes, fit: Size | None = None) -> Image.Image:
    """Decode fully, apply the EXIF orientation; RGBA when the image has alpha, else RGB. Raises BadImage.

    `path` may also be the encoded bytes of an image (a row of a Hugging Face dataset).

    `fit` (width, height as displayed): the size the caller resizes to. A JPEG much larger than that is decoded at a
    reduced DCT scale (1/2, 1/4 or 1/8) that still leaves at least twice `fit` for the Lanczos resize, the
    `reducing_gap = 2` rule of Pillow's `Image.thumbnail`; a 12000 px photo then never exists at full size in memory.
    Other formats decode at full size (PIL's decompression-bomb limit refuses more than 2 x 89.5 MP); no extra
    full-size copies are made (no transpose without an EXIF rotation, no convert to the mode it already has).
    """
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            orientation = img.getexif().get(EXIF_ORIENTATION, 1) if img.format in ("JPEG", "MPO", "WEBP", "PNG") and (
                img.format != "PNG" or "exif" in img.info) else 1
            if fit is not None and img.format in ("JPEG", "MPO"):
                w, h = fit if orientation not in _ROTATED else (fit[1], fit[0])  # draft works in stored orientation
                img.draft(img.mode if img.mode in ("RGB", "L") else None, (2 * w, 2 * h))
            img.load()
            if orientation != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float greyscale -> 8 bits
                arr = np.asarray(img, dtype=np.float32)  # exact for 16-bit values
                if img.mode == "F":
                    scale = 255.0 if arr.max() <= 1.0 else 1.0  # float images are usually in [0, 1]
                else:
                    scale = 1 / 257 if arr.max() > 255 else 1.0  # 16-bit range 0..65535 -> 0..255
                img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            mode = "RGBA" if has_alpha else "RGB"
            if img.mode != mode:
                return img.convert(mode)
            if getattr(img, "fp", None) is not None:  # still the opened file's image: detach from the file that `with` closes
                img = img.copy()
            return img
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise BadImage(f"not a readable image ({type(e).__name__})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode ({e})") from None


def prepare_image(img: Image.Image, resized: Size, bucket: Size, crop: tuple[int, int], flip: bool,
                  want_mask: bool, vae_scale: int = 8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize to cover the bucket (Lanczos, which PIL antialiases when shrinking), crop the bucket at `crop`
    (left, top), mirror if `flip` (after the crop, so the flipped crop's left is resized_w - bucket_w - left).

    Returns pixels [3, H, W] in [-1, 1] and, if `want_mask`, the alpha channel as a mask [1, H/8, W/8] in [0, 1]
    (area-averaged to latent size; all ones without alpha). Transparent pixels keep their RGB values, as sd-scripts
    does; the mask is what removes them from the loss.
    """
    if img.size != resized:
        img = img.resize(resized, Image.Resampling.LANCZOS)
    left, top = crop
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.uint8)
    pixels = torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    mask = None
    if want_mask:
        if arr.shape[-1] == 4:
            alpha = torch.from_numpy(arr[..., 3].copy()).float().div_(255.0)[None, None]
        else:
            alpha = torch.ones(1, 1, bucket[1], bucket[0])
        mask = F.interpolate(alpha, size=(bucket[1] // vae_scale, bucket[0] // vae_scale), mode="area")[0]
    return pixels, mask
