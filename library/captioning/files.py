"""Which images need which caption files: the folder listing, the sidecar names, and the skip-if-present rule.

A caption sits beside its image, named as the training loader reads it (library/data/dataset.py `_scan_folder`):
`foo.png` -> `foo` + caption extension. Mode `levels` writes `foo.tags.txt`, `foo.short.txt`, `foo.detailed.txt`
(the layout library/data reads for multi-level captions). An existing caption file is never replaced unless
`overwrite` is set, which is also what makes a stopped run resumable: a rerun plans only what is still missing.
Each file is written atomically (library/fileio.py), so a killed run leaves whole captions or none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from library.config.caption import LEVELS
from library.data.images import IMAGE_EXTENSIONS
from library.errors import DataError
from library.fileio import atomic_path
from library.training.faults import kill_point



@dataclass
class Plan:
    """What a run will write: per level, the images still without that caption file (in listing order)."""

    todo: dict[str, list[Path]]  # level ("caption" for modes text / tags, else tags / short / detailed) -> images
    images: int = 0  # images found
    existing: int = 0  # caption files already there and kept
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # images not captioned, with the reason

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.todo.values())


def caption_path(image: Path, extension: str, level: str = "caption") -> Path:
    """`foo.png` -> `foo.txt`; level `tags` -> `foo.tags.txt` (extension `.txt`)."""
    middle = "" if level == "caption" else f".{level}"
    return image.with_name(image.stem + middle + extension)


def levels_of(mode: str) -> tuple[str, ...]:
    match mode:
        case "text" | "tags":
            return ("caption",)
        case "levels":
            return LEVELS
        case _:
            raise ValueError(f"unknown caption mode {mode!r}")


def _scan(root: Path, recursive: bool) -> tuple[list[Path], dict[Path, set[str]]]:
    """Image files under `root` sorted by path (hidden files and folders left out), and the names of the files in
    each folder read: caption files are looked up in these listings, not one stat per image and level."""
    found: list[Path] = []
    names: dict[Path, set[str]] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        here = names.setdefault(folder, set())
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    if recursive:
                        stack.append(Path(e.path))
                elif e.is_file():
                    here.add(e.name)
                    if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:  # the training loader's types
                        found.append(Path(e.path))
    found.sort()
    return found, names


def list_images(root: Path, recursive: bool) -> tuple[list[Path], dict[Path, set[str]]]:
    """`_scan`, with one clear error when there is nothing to caption (and a hint when sub-folders have images)."""
    if root.is_file():
        raise DataError(f"{root} is a file: a dataset goes in caption.dataset_path (with caption.output_dataset), "
                        "a folder of images in caption.image_dir")
    if not root.is_dir():
        raise DataError(f"image folder {root} not found (caption.image_dir)")
    found, names = _scan(root, recursive)
    if not found:
        sub = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        with_images = [p for p in sub if _scan(p, True)[0]] if not recursive else []
        if with_images:
            raise DataError(f"no images directly in {root}, but its sub-folders have some (e.g. "
                            f"{with_images[0].name}/): set caption.recursive = true (--recursive) to caption them")
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {root}")
    return found, names


def plan(root: Path, *, mode: str, extension: str, recursive: bool, overwrite: bool) -> Plan:
    """The caption files to write. Two images with the same name but another extension (foo.png, foo.jpg) would
    share one caption file: the first in sorted order is captioned, the other listed as skipped."""
    images, names = list_images(root, recursive)
    result = Plan(todo={level: [] for level in levels_of(mode)}, images=len(images))
    owner: dict[Path, Path] = {}
    for image in images:
        first = caption_path(image, extension)
        if first in owner:
            result.skipped.append((image, f"shares its caption file {first.name} with {owner[first].name}"))
            continue
        owner[first] = image
        present = names[image.parent]
        for level, todo in result.todo.items():
            if not overwrite and caption_path(image, extension, level).name in present:
                result.existing += 1
            else:
                todo.append(image)
    return result


def write_caption(path: Path, text: str, number: int = 0) -> None:
    """One caption file, atomically (a temporary beside it, then a rename), ending in a newline as sd-scripts'.

    `number` counts the files this run wrote (1-based): the fault tests kill the process at `caption:<number>`,
    between the temporary and the rename (library/training/faults.py).
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text.strip() + "\n", encoding="utf-8")
        kill_point("caption", number)
