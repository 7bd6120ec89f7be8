"""Images as the captioners take them: decoded by the training loader's reader (EXIF orientation, 16-bit, large
JPEGs at a reduced scale), then RGB with transparency composited on white."""

from __future__ import annotations

from pathlib import Path

from PIL import Image


def on_white(img: Image.Image) -> Image.Image:
    """RGB, transparent pixels composited on white, as the WD14 reference preprocessing (SmilingWolf's wd-tagger
    space, `prepare_image`) does; BLIP's processor would otherwise drop alpha and show the hidden colours."""
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        img = canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: Path, fit: tuple[int, int]) -> Image.Image | str:
    """The image, or the reason it cannot be read (listed as skipped by the caller)."""
    from library.data.images import BadImage, load_image

    try:
        return on_white(load_image(path, fit=fit))
    except BadImage as e:
        return str(e)
