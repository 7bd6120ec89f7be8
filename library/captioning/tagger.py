"""WD14-style tagger: `model.onnx` + `selected_tags.csv` (SmilingWolf's wd-v1-4 / wd-v3 taggers) run with onnxruntime.

Preprocessing as the model author's reference app (SmilingWolf's `wd-tagger` Hugging Face space, `app.py`
`prepare_image`) and sd-scripts' `finetune/tag_images_by_wd14_tagger.py`: transparent pixels composited on white, the
image padded to a square with white (centred), resized to the model's input side (read from the ONNX input,
`[batch, side, side, 3]`, NHWC), RGB -> BGR, float32 in 0..255 (no normalisation; the network has its own).
Output conventions as sd-scripts: probability >= threshold (general and character thresholds), general tags in the
CSV's order, character tags after them unless `character_tags_first`, the rating (category 9) by argmax and only on
request, `undesired_tags` left out, `remove_underscore` for tags longer than 3 characters (so '^_^' stays), joined
with `caption_separator`. Rows of other categories are not written. Two deliberate departures: character tags
first keep their CSV order (sd-scripts inserts each at the front, reversing them), and `always_first_tags` come in
the order given (sd-scripts' front-insertion reverses them too).
onnxruntime is imported only here, when a tagger is built (an optional extra: `pip install onnxruntime`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from library.captioning.images import on_white
from library.config.caption import TaggerConfig, tag_list
from library.errors import ConfigError, ModelFileError, UserError

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9  # selected_tags.csv categories (Danbooru's general / character; 9 = rating)


@dataclass(frozen=True)
class TagTable:
    """selected_tags.csv: one row per model output, in output order."""

    names: list[str]
    categories: np.ndarray  # int, one per name


def read_tag_table(path: Path) -> TagTable:
    """Read selected_tags.csv (columns tag_id,name,category,count; only name and category are used)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFileError(f"cannot read the tag list {path}: {e}") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise ModelFileError(f"{path} is not a WD14 tag list: its first line must name the columns "
                             f"tag_id,name,category,count (got {','.join(rows[0]) if rows else 'an empty file'})")
    name_col, cat_col = rows[0].index("name"), rows[0].index("category")
    names, cats = [], []
    for n, row in enumerate(rows[1:], start=2):
        try:
            names.append(row[name_col])
            cats.append(int(row[cat_col]))
        except (IndexError, ValueError):
            raise ModelFileError(f"{path} line {n}: expected a name and an integer category, got {row}") from None
    return TagTable(names, np.asarray(cats, dtype=np.int64))


def prepare_image(img: Image.Image, side: int) -> np.ndarray:
    """[side, side, 3] float32 BGR in 0..255: alpha on white, padded to a centred white square, bicubic resize."""
    img = on_white(img)
    w, h = img.size
    square = max(w, h)
    if (w, h) != (square, square):
        padded = Image.new("RGB", (square, square), (255, 255, 255))
        padded.paste(img, ((square - w) // 2, (square - h) // 2))
        img = padded
    if square != side:
        img = img.resize((side, side), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.float32)[:, :, ::-1])


def format_tags(probs: np.ndarray, table: TagTable, *, general_threshold: float, character_threshold: float,
                undesired: list[str], remove_underscore: bool, character_first: bool, rating: str,
                always_first: list[str], separator: str) -> str:
    """One image's caption from its tag probabilities (see the module doc for the conventions)."""

    def shown(tag: str) -> str:
        return tag.replace("_", " ") if remove_underscore and len(tag) > 3 else tag

    unwanted = set(undesired) | {shown(t) for t in undesired}
    cats = table.categories
    general = [table.names[i] for i in np.flatnonzero((cats == GENERAL) & (probs >= general_threshold))]
    characters = [table.names[i] for i in np.flatnonzero((cats == CHARACTER) & (probs >= character_threshold))]
    ratings = np.flatnonzero(cats == RATING)
    rated = [table.names[ratings[int(np.argmax(probs[ratings]))]]] if rating != "none" and len(ratings) else []
    match rating:
        case "none" | "first" | "last":
            pass
        case _:
            raise ValueError(f"unknown rating placement {rating!r}")
    tags = ((rated if rating == "first" else []) + (characters if character_first else []) + general
            + ([] if character_first else characters) + (rated if rating == "last" else []))
    tags = [shown(t) for t in tags if t not in unwanted and shown(t) not in unwanted]
    wanted_first = [shown(t) for t in always_first]
    front = [t for t in dict.fromkeys(wanted_first) if t in tags]
    return separator.join(front + [t for t in tags if t not in front])


def tagger_files(ref: str) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) from a local folder, or downloaded from the Hugging Face hub repo `ref`."""
    folder = Path(ref).expanduser()
    if folder.exists():
        missing = [n for n in (MODEL_FILE, TAGS_FILE) if not (folder / n).is_file()]
        if missing:
            raise ConfigError(f"caption.tagger.model = {ref!r} has no {' and no '.join(missing)}: a WD14 tagger "
                              f"folder holds {MODEL_FILE} and {TAGS_FILE}")
        return folder / MODEL_FILE, folder / TAGS_FILE
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref, MODEL_FILE)), Path(hf_hub_download(ref, TAGS_FILE))
    except Exception as e:  # offline, unknown repo, invalid id: all mean "cannot get it from here"
        raise ConfigError(f"caption.tagger.model = {ref!r} is not a folder, and the Hugging Face hub did not give "
                          f"{MODEL_FILE} + {TAGS_FILE} for it ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                          ) from None


class Tagger:
    """Tags images with a WD14-style ONNX model; `cfg` is the `[caption.tagger]` table."""

    def __init__(self, cfg: TaggerConfig, device: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the tagger needs onnxruntime: pip install onnxruntime (onnxruntime-gpu for CUDA)"
                            ) from None
        model_path, tags_path = tagger_files(cfg.model)
        self.table = read_tag_table(tags_path)
        use_cuda = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
            raise ModelFileError(f"cannot load the tagger {model_path}: {str(e).splitlines()[0][:300]}") from None
        inp = self.session.get_inputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ModelFileError(f"{model_path} takes input {shape}; a WD14 tagger takes [batch, side, side, 3] "
                                 "(NHWC, square)")
        self.input_name, self.side = inp.name, shape[1]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.path = model_path
        self.options = dict(general_threshold=cfg.general_threshold, character_threshold=cfg.character_threshold,
                            undesired=tag_list(cfg.undesired_tags), remove_underscore=cfg.remove_underscore,
                            character_first=cfg.character_tags_first, rating=cfg.rating,
                            always_first=tag_list(cfg.always_first_tags), separator=cfg.caption_separator)

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        """[n, tags] probabilities; a model with a fixed batch size gets chunks of it (the last padded)."""
        batch = np.stack([prepare_image(img, self.side) for img in images])
        step = self.fixed_batch or len(batch)
        out = []
        for i in range(0, len(batch), step):
            chunk = batch[i:i + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            out.append(self.session.run(None, {self.input_name: chunk})[0][:len(batch) - i])
        probs = np.concatenate(out)
        if probs.ndim != 2 or probs.shape[1] != len(self.table.names):
            raise ModelFileError(f"{self.path} gives scores of shape {list(probs.shape[1:])} per image but its "
                                 f"{TAGS_FILE} lists {len(self.table.names)} tags")
        return probs

    def __call__(self, images: list[Image.Image]) -> list[str]:
        return [format_tags(p, self.table, **self.options) for p in self.probabilities(images)]
