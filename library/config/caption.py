"""`caption_images.py`'s config: `[caption]` what to caption and where the captions go, `[caption.tagger]` the
WD14-style tagger, `[caption.text]` / `[caption.short]` / `[caption.detailed]` how the natural-language captioner
generates.

Modes: `text` writes one natural-language caption per image (`foo.txt`); `tags` one tag list (`foo.txt`); `levels`
the three caption levels of the Z-Image report side by side: `foo.tags.txt` (tagger), `foo.short.txt` and
`foo.detailed.txt` (captioner with the [caption.short] / [caption.detailed] settings). The caption extension
replaces `.txt` in every name. A Hugging Face dataset (`dataset_path`) gets columns instead, in a captioned copy
(`output_dataset`). No torch here: config modules stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from library.config.fields import opt
from library.errors import ConfigError

CaptionMode = Literal["text", "tags", "levels"]
LEVELS = ("tags", "short", "detailed")  # the sidecar names of mode "levels", agreed with library/data's reader


@dataclass
class GenerateConfig:
    """How the natural-language captioner generates one caption (transformers `generate` arguments)."""

    prompt: str = opt("", "text given with the image: BLIP a caption start ('a picture of'), BLIP-2 a question, "
                          "Florence-2 a task token ('<CAPTION>', '<DETAILED_CAPTION>', '<MORE_DETAILED_CAPTION>')")
    max_new_tokens: int = opt(40, "longest caption, in tokens")
    min_new_tokens: int = opt(0, "shortest caption, in tokens (the end token is held back until then)")
    num_beams: int = opt(3, "beam search width; 1 = greedy decoding")


@dataclass
class TaggerConfig:
    """`[caption.tagger]`: a WD14-style tagger (model.onnx + selected_tags.csv) run with onnxruntime."""

    model: str = opt("", "folder with model.onnx and selected_tags.csv, or a Hugging Face repo id "
                         "(e.g. SmilingWolf/wd-v1-4-convnext-tagger-v2) when the hub is reachable")
    general_threshold: float = opt(0.35, "a general tag is written when its probability is at least this")
    character_threshold: float = opt(0.35, "a character tag is written when its probability is at least this")
    undesired_tags: list[str] | str = opt([], "tags never written: a list, or one comma-separated string as "
                                              "sd-scripts takes it (either spelling: 'long_hair' or 'long hair')")
    remove_underscore: bool = opt(False, "write 'long hair' for 'long_hair' (tags of 3 characters or fewer, such "
                                         "as the emoticon '^_^', keep theirs, as in sd-scripts)")
    character_tags_first: bool = opt(False, "character tags before the general tags (default: general first)")
    rating: Literal["none", "first", "last"] = opt("none", "add the most likely rating tag (general, sensitive, "
                                                           "questionable, explicit) first, last, or not at all")
    always_first_tags: list[str] | str = opt([], "tags moved to the front when present (e.g. ['1girl', '1boy'])")
    caption_separator: str = opt(", ", "written between tags")

    def validate(self) -> None:
        for key in ("general_threshold", "character_threshold"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"caption.tagger.{key} = {getattr(self, key)} must be in [0, 1], e.g. 0.35")
        if not self.caption_separator.strip():
            raise ConfigError("caption.tagger.caption_separator must contain a character other than spaces, e.g. ', '")


@dataclass
class CaptionConfig:
    """`[caption]`: the images, the captions written beside them, and the captioner."""

    image_dir: str = opt("", "folder of images to caption (the first argument of caption_images.py)")
    dataset_path: str = opt("", "a Hugging Face dataset to caption instead: a .parquet file or folder, a "
                                "save_to_disk folder, or an imagefolder (images + metadata.jsonl / .csv)")
    dataset_split: str = opt("train", "split of dataset_path to caption")
    image_column: str = opt("image", "dataset_path: the column holding the images")
    caption_column: str = opt("text", "dataset_path: the column the captions go to (modes text and tags); mode "
                                      "levels writes columns tags, short and detailed, the names [data] reads")
    output_dataset: str = opt("", "dataset_path: the folder the captioned dataset is written to (save_to_disk); "
                                  "train on it with data.dataset_path")
    mode: CaptionMode = opt("text", "text: a natural-language caption (caption.model) | tags: WD14 tags "
                                    "(caption.tagger.model) | levels: tags + short + detailed side by side")
    caption_extension: str = opt(".txt", "caption file extension: foo.png -> foo.txt; levels foo.tags.txt, ...")
    recursive: bool = opt(False, "also caption the images in sub-folders (e.g. sd-scripts' 10_name folders)")
    overwrite: bool = opt(False, "replace existing caption files (default: keep them, so a stopped run resumes)")
    batch_size: int = opt(8, "images per model call")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the models run: auto picks CUDA when available")
    model: str = opt("", "natural-language captioner: a transformers model id or folder that "
                         "AutoModelForImageTextToText loads (BLIP, BLIP-2, GIT, Florence-2, ...)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = opt("auto", "captioner precision: auto = fp16 on CUDA, "
                                                                 "fp32 on CPU")
    keep_prompt: bool = opt(False, "keep the prompt at the start of the caption when the model repeats it "
                                   "(BLIP: 'a picture of a dog' rather than 'a dog')")
    tagger: TaggerConfig = opt(TaggerConfig(), "the WD14-style tagger (modes tags and levels)")
    text: GenerateConfig = opt(GenerateConfig(), "generation settings of mode text")
    short: GenerateConfig = opt(GenerateConfig(max_new_tokens=20), "generation settings of the short level")
    detailed: GenerateConfig = opt(GenerateConfig(max_new_tokens=120, min_new_tokens=30),
                                   "generation settings of the detailed level")

    def validate(self) -> None:
        if bool(self.image_dir.strip()) == bool(self.dataset_path.strip()):
            both = ", not both" if self.image_dir else ""
            raise ConfigError("set one of caption.image_dir (a folder, e.g. caption_images.py my_images/) and "
                              f"caption.dataset_path (a Hugging Face dataset){both}")
        if self.dataset_path and not self.output_dataset.strip():
            raise ConfigError("caption.dataset_path needs caption.output_dataset: the folder the captioned dataset "
                              "is written to")
        if self.dataset_path and Path(self.output_dataset).expanduser().resolve() == Path(
                self.dataset_path).expanduser().resolve():
            raise ConfigError("caption.output_dataset must be another folder than caption.dataset_path (the dataset "
                              "is read while the captioned copy is written)")
        ext = self.caption_extension
        if not ext.startswith(".") or len(ext) < 2 or "/" in ext or "\\" in ext:
            raise ConfigError(f"caption.caption_extension = {self.caption_extension!r} must be an extension such as "
                              "'.txt' or '.caption'")
        if self.batch_size < 1:
            raise ConfigError(f"caption.batch_size = {self.batch_size} must be >= 1")
        for name in ("text", "short", "detailed"):  # checked here, where the table's name is known
            gen: GenerateConfig = getattr(self, name)
            for key, low in (("max_new_tokens", 1), ("num_beams", 1), ("min_new_tokens", 0)):
                if getattr(gen, key) < low:
                    raise ConfigError(f"caption.{name}.{key} = {getattr(gen, key)} must be >= {low}")
            if gen.min_new_tokens > gen.max_new_tokens:
                raise ConfigError(f"caption.{name}.min_new_tokens = {gen.min_new_tokens} is above "
                                  f"caption.{name}.max_new_tokens = {gen.max_new_tokens}")
        if self.mode in ("text", "levels") and not self.model.strip():
            raise ConfigError(f"caption.mode = '{self.mode}' needs caption.model (a transformers model id or folder, "
                              "e.g. Salesforce/blip-image-captioning-large)")
        if self.mode in ("tags", "levels") and not self.tagger.model.strip():
            raise ConfigError(f"caption.mode = '{self.mode}' needs caption.tagger.model (a folder with model.onnx "
                              "and selected_tags.csv, or a repo id such as SmilingWolf/wd-v1-4-convnext-tagger-v2)")


@dataclass
class CaptionRun:
    """The root config of caption_images.py."""

    caption: CaptionConfig = opt(CaptionConfig(), "what to caption and how")


def tag_list(value: list[str] | str) -> list[str]:
    """A tag option as a list: a TOML list as it is, a comma-separated string split (sd-scripts' form)."""
    items = value.split(",") if isinstance(value, str) else value
    return [t.strip() for t in items if t.strip()]
