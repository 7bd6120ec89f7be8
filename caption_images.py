#!/usr/bin/env python
"""Caption a folder of images before training: writes a caption file beside each image that has none.

    python caption_images.py my_images/ --model Salesforce/blip-image-captioning-large
    python caption_images.py my_images/ --mode tags --repo_id SmilingWolf/wd-v1-4-convnext-tagger-v2 \\
        --general_threshold 0.35 --remove_underscore --undesired_tags "simple background,white background"
    python caption_images.py --config configs/caption_levels.toml
    python caption_images.py --caption.dataset_path data.parquet --caption.output_dataset captioned/ --model ...

Modes: text (a natural-language caption from a transformers model: BLIP, BLIP-2, GIT, Florence-2, ...), tags
(a WD14-style ONNX tagger: model.onnx + selected_tags.csv, a local folder or a hub repo; needs onnxruntime) and
levels (tags + a short + a detailed caption written side by side, as foo.tags.txt, foo.short.txt and
foo.detailed.txt). foo.png gets foo.txt (or foo<caption_extension>); existing caption files are kept unless
--overwrite, so a stopped run simply continues where it stopped when run again. Each file is written atomically.
A Hugging Face dataset (parquet, save_to_disk, imagefolder) gets caption columns instead, in a copy written to
caption.output_dataset (train on it with data.dataset_path); its record <output_dataset>.captions.jsonl resumes it.
"""

from __future__ import annotations

import sys

from library.cli import main_guard
from library.config.caption import CaptionRun
from library.config.core import dump_toml, parse_cli

CONFIG_CLASS = CaptionRun

# sd-scripts' names (finetune/tag_images_by_wd14_tagger.py, make_captions.py) and the short names of this script.
ALIASES = {
    "train_data_dir": "caption.image_dir",
    "mode": "caption.mode",
    "model": "caption.model",
    "repo_id": "caption.tagger.model",
    "caption_extension": "caption.caption_extension",
    "batch_size": "caption.batch_size",
    "recursive": "caption.recursive",
    "overwrite": "caption.overwrite",
    "general_threshold": "caption.tagger.general_threshold",
    "character_threshold": "caption.tagger.character_threshold",
    "undesired_tags": "caption.tagger.undesired_tags",
    "remove_underscore": "caption.tagger.remove_underscore",
    "character_tags_first": "caption.tagger.character_tags_first",
    "always_first_tags": "caption.tagger.always_first_tags",
    "caption_separator": "caption.tagger.caption_separator",
    "num_beams": "caption.text.num_beams",
}
EXTRA_FLAGS = {"no_progress": "do not show the progress bar"}


@main_guard
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # the folder may come first, as in sd-scripts
        argv[0] = f"--caption.image_dir={argv[0]}"
    cfg, flags = parse_cli(CONFIG_CLASS, argv, aliases=ALIASES, prog="caption_images.py", description=__doc__,
                           extra_flags=EXTRA_FLAGS)
    if flags.print_config:
        print(dump_toml(cfg), end="")
        return 0
    from library.captioning.run import run_captioning

    run_captioning(cfg.caption, progress=not flags.extra["no_progress"], dry_run=flags.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
