"""caption_images.py's pure parts: sidecar names and the resume plan, WD14 tag formatting and preprocessing, the
tag list, the tagger's files, prompt stripping, and the config rules. Exact values; the tiny ONNX tagger only."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from caption_models import TAGS, make_tiny_tagger
from library.captioning.files import caption_path, plan, write_caption
from library.captioning.tagger import TagTable, Tagger, format_tags, prepare_image, read_tag_table, tagger_files
from library.captioning.text import strip_prompt
from library.config.caption import CaptionConfig, CaptionRun, TaggerConfig, tag_list
from library.config.core import load_config
from library.errors import ConfigError, DataError, ModelFileError


def touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (4, 4)).save(folder / n)


# ------------------------------------------------------------------------------------------- names and the plan


def test_caption_paths(tmp_path):
    img = tmp_path / "foo.bar.png"
    assert caption_path(img, ".txt") == tmp_path / "foo.bar.txt"
    assert caption_path(img, ".caption") == tmp_path / "foo.bar.caption"
    assert caption_path(img, ".txt", "tags") == tmp_path / "foo.bar.tags.txt"
    assert caption_path(img, ".txt", "short") == tmp_path / "foo.bar.short.txt"
    assert caption_path(img, ".caption", "detailed") == tmp_path / "foo.bar.detailed.caption"


def test_plan_skips_existing_and_overwrite_replans(tmp_path):
    touch_images(tmp_path, ["a.png", "b.jpg", "c.webp"])
    (tmp_path / "b.txt").write_text("mine\n")
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    p = plan(tmp_path, mode="text", extension=".txt", recursive=False, overwrite=False)
    assert p.todo == {"caption": [tmp_path / "a.png", tmp_path / "c.webp"]}
    assert (p.images, p.existing, p.total, p.skipped) == (3, 1, 2, [])
    p = plan(tmp_path, mode="text", extension=".txt", recursive=False, overwrite=True)
    assert p.todo["caption"] == [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.webp"] and p.existing == 0
    p = plan(tmp_path, mode="tags", extension=".caption", recursive=False, overwrite=False)  # b.txt is not b.caption
    assert p.total == 3


def test_plan_levels_each_level_on_its_own(tmp_path):
    touch_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.tags.txt").write_text("x\n")
    (tmp_path / "b.detailed.txt").write_text("y\n")
    (tmp_path / "a.txt").write_text("plain caption: not a level\n")
    p = plan(tmp_path, mode="levels", extension=".txt", recursive=False, overwrite=False)
    assert p.todo == {"tags": [tmp_path / "b.png"], "short": [tmp_path / "a.png", tmp_path / "b.png"],
                      "detailed": [tmp_path / "a.png"]}
    assert (p.total, p.existing) == (4, 2)


def test_plan_same_stem_images_share_a_caption_file_and_one_is_listed(tmp_path):
    touch_images(tmp_path, ["x.jpg", "x.png"])
    p = plan(tmp_path, mode="text", extension=".txt", recursive=False, overwrite=False)
    assert p.todo["caption"] == [tmp_path / "x.jpg"]
    assert p.skipped == [(tmp_path / "x.png", "shares its caption file x.txt with x.jpg")]


def test_plan_recursive_and_the_hint_when_images_sit_in_sub_folders(tmp_path):
    (tmp_path / "0_empty").mkdir()  # a sub-folder without images first: the hint still names one with images
    touch_images(tmp_path / "10_cat", ["a.png"])
    touch_images(tmp_path / "5_dog" / "deeper", ["b.png"])
    touch_images(tmp_path / ".cache", ["c.png"])
    with pytest.raises(DataError, match=r"no images directly in .*\(e.g. 10_cat/\): set caption.recursive = true"):
        plan(tmp_path, mode="text", extension=".txt", recursive=False, overwrite=False)
    p = plan(tmp_path, mode="text", extension=".txt", recursive=True, overwrite=False)
    assert p.todo["caption"] == [tmp_path / "10_cat" / "a.png", tmp_path / "5_dog" / "deeper" / "b.png"]


def test_plan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'nope'} not found"):
        plan(tmp_path / "nope", mode="text", extension=".txt", recursive=False, overwrite=False)
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"no images \(.bmp, .jpeg, .jpg, .png, .webp\) in"):
        plan(tmp_path, mode="text", extension=".txt", recursive=False, overwrite=False)


def test_write_caption_is_one_line_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_caption(path, "  red hair, smile \n")
    assert path.read_text(encoding="utf-8") == "red hair, smile\n"
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


# ------------------------------------------------------------------------------------------------ tag formatting

TABLE = TagTable([t[0] for t in TAGS], np.array([t[1] for t in TAGS]))
#                  gen  sens  ques  expl  red   green blue  white ^_^   look  miku  reimu
PROBS = np.array([0.2, 0.7, 0.05, 0.05, 0.9, 0.36, 0.34, 0.1, 0.95, 0.5, 0.8, 0.6])
BASE = dict(general_threshold=0.35, character_threshold=0.7, undesired=[], remove_underscore=False,
            character_first=False, rating="none", always_first=[], separator=", ")


def tags(**kw):
    return format_tags(PROBS, TABLE, **{**BASE, **kw})


def test_thresholds_per_category_and_csv_order():
    # general >= 0.35 in CSV order (0.36 in, 0.34 out), then characters >= 0.7 (0.6 out); ratings not written
    assert tags() == "red_hair, green_eyes, ^_^, looking_at_viewer, hatsune_miku_(vocaloid)"
    assert tags(general_threshold=0.5, character_threshold=0.5) == (
        "red_hair, ^_^, looking_at_viewer, hatsune_miku_(vocaloid), hakurei_reimu")
    assert tags(general_threshold=0.36) .startswith("red_hair, green_eyes, ")  # equal to the threshold is in


def test_remove_underscore_keeps_short_tags_and_undesired_matches_either_spelling():
    assert tags(remove_underscore=True) == "red hair, green eyes, ^_^, looking at viewer, hatsune miku (vocaloid)"
    assert tags(remove_underscore=True, undesired=["green eyes", "looking_at_viewer"]) == (
        "red hair, ^_^, hatsune miku (vocaloid)")
    assert tags(undesired=["red_hair", "^_^"]) == "green_eyes, looking_at_viewer, hatsune_miku_(vocaloid)"


def test_character_first_rating_always_first_and_separator():
    assert tags(character_first=True, character_threshold=0.5) == (
        "hatsune_miku_(vocaloid), hakurei_reimu, red_hair, green_eyes, ^_^, looking_at_viewer")
    assert tags(rating="first").startswith("sensitive, red_hair, ")  # argmax of the category-9 rows
    assert tags(rating="last").endswith(", hatsune_miku_(vocaloid), sensitive")
    assert tags(always_first=["looking_at_viewer", "absent", "^_^"], separator=",") == (
        "looking_at_viewer,^_^,red_hair,green_eyes,hatsune_miku_(vocaloid)")
    assert tags(always_first=["looking at viewer"], remove_underscore=True).startswith("looking at viewer, red hair")


def test_tag_list_accepts_a_list_or_sd_scripts_comma_string():
    assert tag_list("a, b ,,c") == ["a", "b", "c"]
    assert tag_list(["x y", " z "]) == ["x y", "z"]
    assert tag_list("") == []


# ----------------------------------------------------------------------------------------------- preprocessing


def test_prepare_image_pads_white_centred_and_swaps_to_bgr():
    img = Image.new("RGB", (2, 1), (255, 0, 0))  # one row of red: padded to 2x2, the white row below (pad top 0)
    arr = prepare_image(img, 2)
    assert arr.dtype == np.float32 and arr.shape == (2, 2, 3)
    assert arr[0].tolist() == [[0, 0, 255], [0, 0, 255]]
    assert arr[1].tolist() == [[255, 255, 255], [255, 255, 255]]
    tall = prepare_image(Image.new("RGB", (1, 3), (0, 0, 255)), 3)  # pad left 1, right 1
    assert tall[:, 1].tolist() == [[255, 0, 0]] * 3 and tall[:, 0].tolist() == [[255, 255, 255]] * 3


def test_prepare_image_composites_alpha_on_white_and_resizes():
    rgba = Image.new("RGBA", (4, 4), (0, 255, 0, 0))  # fully transparent green reads as white
    assert prepare_image(rgba, 4).tolist() == np.full((4, 4, 3), 255.0).tolist()
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert prepare_image(half, 4)[0, 0].tolist() == [127, 127, 127]
    assert prepare_image(Image.new("RGB", (10, 10), (10, 20, 30)), 4).tolist() == \
        np.tile([30.0, 20.0, 10.0], (4, 4, 1)).tolist()


# --------------------------------------------------------------------------------------------- the tagger's files


def test_read_tag_table_and_its_errors(tmp_path):
    folder = make_tiny_tagger(tmp_path / "t")
    table = read_tag_table(folder / "selected_tags.csv")
    assert table.names[:2] == ["general", "sensitive"] and table.categories.tolist()[:5] == [9, 9, 9, 9, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,tag\n1,x\n")
    with pytest.raises(ModelFileError, match="bad.csv is not a WD14 tag list.*got id,tag"):
        read_tag_table(bad)
    bad.write_text("tag_id,name,category,count\n1,x,zero,3\n")
    with pytest.raises(ModelFileError, match=r"bad.csv line 2: expected a name and an integer category"):
        read_tag_table(bad)


def test_tagger_files_from_a_folder_or_the_hub_cache(tmp_path, monkeypatch):
    folder = make_tiny_tagger(tmp_path / "t")
    assert tagger_files(str(folder)) == (folder / "model.onnx", folder / "selected_tags.csv")
    (folder / "selected_tags.csv").unlink()
    with pytest.raises(ConfigError, match="has no selected_tags.csv"):
        tagger_files(str(folder))
    # A hub repo id: hf_hub_download (offline in tests, HF_HUB_OFFLINE=1) answers from the cache when it holds it.
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ConfigError, match="'someone/tagger' is not a folder, and the Hugging Face hub did not give"):
        tagger_files("someone/tagger")
    commit = "0" * 40
    snap = cache / "models--someone--tagger" / "snapshots" / commit
    make_tiny_tagger(snap)
    (cache / "models--someone--tagger" / "refs").mkdir()
    (cache / "models--someone--tagger" / "refs" / "main").write_text(commit)
    onnx_file, csv_file = tagger_files("someone/tagger")
    assert onnx_file.read_bytes() == (snap / "model.onnx").read_bytes() and csv_file.name == "selected_tags.csv"


def test_tagger_refuses_models_it_cannot_run(tmp_path):
    folder = make_tiny_tagger(tmp_path / "short", tags=TAGS[:-1])
    (folder / "selected_tags.csv").write_text((make_tiny_tagger(tmp_path / "full") / "selected_tags.csv").read_text())
    tagger = Tagger(TaggerConfig(model=str(folder)), "cpu")
    with pytest.raises(ModelFileError, match=r"gives scores of shape \[11\] per image but its selected_tags.csv "
                                             r"lists 12 tags"):
        tagger([Image.new("RGB", (8, 8))])
    (folder / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelFileError, match="cannot load the tagger .*model.onnx"):
        Tagger(TaggerConfig(model=str(folder)), "cpu")


def test_tagger_with_a_fixed_batch_size_gets_padded_chunks(tmp_path):
    fixed = Tagger(TaggerConfig(model=str(make_tiny_tagger(tmp_path / "f", batch=2))), "cpu")
    free = Tagger(TaggerConfig(model=str(make_tiny_tagger(tmp_path / "d"))), "cpu")
    assert (fixed.fixed_batch, free.fixed_batch, fixed.side) == (2, None, 16)
    imgs = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    np.testing.assert_allclose(fixed.probabilities(imgs), free.probabilities(imgs), rtol=1e-6)
    assert fixed(imgs)[2] == "blue_sky, ^_^, looking_at_viewer"


# --------------------------------------------------------------------------------------------- prompts and config


def test_strip_prompt_rule():
    assert strip_prompt("a picture of a dog", "a picture of") == "a dog"
    assert strip_prompt(" a picture of a dog", "a picture of") == "a dog"  # up to 2 leading characters
    assert strip_prompt("dog, a picture of", "a picture of") == "dog, a picture of"  # not at the start
    assert strip_prompt("  a dog ", "") == "a dog"


@pytest.mark.parametrize("table, message", [
    ({}, r"set one of caption.image_dir \(a folder, e.g. caption_images.py my_images/\) and caption.dataset_path"),
    ({"image_dir": "x", "dataset_path": "d"}, "caption.dataset_path \\(a Hugging Face dataset\\), not both"),
    ({"dataset_path": "d.parquet", "mode": "tags", "tagger": {"model": "t"}}, "needs caption.output_dataset"),
    ({"dataset_path": "d", "output_dataset": "./d", "mode": "tags", "tagger": {"model": "t"}},
     "must be another folder than caption.dataset_path"),
    ({"image_dir": "x", "caption_extension": "txt"}, "must be an extension such as '.txt'"),
    ({"image_dir": "x", "batch_size": 0}, "caption.batch_size = 0 must be >= 1"),
    ({"image_dir": "x", "mode": "text"}, "caption.mode = 'text' needs caption.model"),
    ({"image_dir": "x", "mode": "levels", "model": "m"}, "caption.mode = 'levels' needs caption.tagger.model"),
    ({"image_dir": "x", "mode": "tags", "tagger": {"model": "t", "general_threshold": 1.5}},
     r"caption.tagger.general_threshold = 1.5 must be in \[0, 1\]"),
    ({"image_dir": "x", "mode": "tags", "tagger": {"model": "t", "caption_separator": " "}},
     "caption_separator must contain a character"),
    ({"image_dir": "x", "model": "m", "short": {"min_new_tokens": 30}},
     "caption.short.min_new_tokens = 30 is above caption.short.max_new_tokens = 20"),
    ({"image_dir": "x", "model": "m", "text": {"num_beams": 0}}, "caption.text.num_beams = 0 must be >= 1"),
])
def test_config_rules_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CaptionRun, {"caption": table})


def test_level_defaults_differ_in_length():
    cfg = CaptionConfig()
    assert (cfg.short.max_new_tokens, cfg.detailed.max_new_tokens, cfg.detailed.min_new_tokens) == (20, 120, 30)
