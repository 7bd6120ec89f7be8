"""Caption levels (Z-Image tags / short / detailed; issue 18, issue 21 item 7): read from sidecar files, metadata keys
and dataset columns, one level drawn per sample per epoch, tag transforms on the tags level only."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from library.config.data import DataConfig
from library.data.captions import (CaptionOptions, choose_caption, pick_caption_line, split_tags,
                                   transform_caption)
from library.data.loader import build_train_data
from library.errors import ConfigError

TAGS = "red, round, small, shiny, toy"
SHORT = "a small red ball, on a table"
DETAILED = "a shiny red toy ball, lit from the left, rests on a wooden table"


def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)


def cfg(**kw) -> DataConfig:
    base = dict(resolution=64, batch_size=1, min_bucket_reso=64, max_bucket_reso=128, num_workers=0)
    base.update(kw)
    c = DataConfig(**base)
    c.validate()
    return c


def captions_over_epochs(data, n_epochs: int) -> list[str]:
    out = []
    for e in range(n_epochs):
        data.set_epoch(e)
        out.extend(c for b in data for c in b["captions"])
    return out


def test_without_levels_nothing_changes_and_no_draw_is_added():
    opts = CaptionOptions(shuffle_caption=True)
    a, b = random.Random(5), random.Random(5)
    text, o = choose_caption(["x", "y", "z"], {"tags": ["t"]}, opts, a)
    assert (text, o) == (pick_caption_line(["x", "y", "z"], b), opts)
    assert a.random() == b.random()  # the same number of draws as before levels existed


def test_level_drawn_by_weight_among_the_levels_the_image_has():
    opts = CaptionOptions(caption_levels=(("tags", 3.0), ("short", 1.0), ("detailed", 0.0)))
    levels = {"tags": [TAGS], "short": [SHORT], "detailed": [DETAILED]}
    counts = Counter(choose_caption(["main"], levels, opts, random.Random(s))[0] for s in range(4000))
    assert set(counts) == {TAGS, SHORT}  # weight 0: never
    assert counts[TAGS] / 4000 == pytest.approx(0.75, abs=0.03)
    # only 'short' present: always short; none of the weighted levels: the main caption
    assert {choose_caption(["main"], {"short": [SHORT]}, opts, random.Random(s))[0] for s in range(50)} == {SHORT}
    assert choose_caption(["main"], {"detailed": [DETAILED]}, opts, random.Random(0))[0] == "main"


def test_shuffle_and_tag_dropout_touch_the_tags_level_only():
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.5, multilevel_tag_dropout=True,
                          synonyms={"a small red ball": ("x",)}, synonym_probability=1.0,
                          caption_levels=(("tags", 1.0), ("short", 1.0), ("detailed", 1.0)))
    levels = {"tags": [TAGS], "short": [SHORT], "detailed": [DETAILED]}
    seen = Counter()
    for s in range(300):
        rng = random.Random(s)
        text, o = choose_caption([], levels, opts, rng)
        out = transform_caption(text, o, rng)
        if text == TAGS:
            seen["tags"] += 1
            seen["tags changed"] += out != TAGS
            assert set(split_tags(out, ",")) <= set(TAGS.split(", "))
        else:
            seen["prose"] += 1
            assert out == text  # never shuffled, dropped or substituted
    assert seen["tags changed"] > 0.8 * seen["tags"] and seen["prose"] > 150


@pytest.fixture
def level_folder(tmp_path):
    d = tmp_path / "imgs"
    for i in range(3):
        png(d / f"a{i}.png", i)
        (d / f"a{i}.txt").write_text(f"main {i}", encoding="utf-8")
        (d / f"a{i}.tags.txt").write_text(TAGS, encoding="utf-8")
        (d / f"a{i}.short.txt").write_text(SHORT, encoding="utf-8")
        (d / f"a{i}.detailed.txt").write_text(DETAILED, encoding="utf-8")
    png(d / "b.png", 9)
    (d / "b.short.txt").write_text("only short", encoding="utf-8")  # a level file and no main caption
    return d


def test_folder_level_files_drawn_per_sample_per_epoch_and_resume_exact(level_folder, capsys):
    c = cfg(train_data_dir=str(level_folder), shuffle_caption=True,
            caption_levels={"tags": 1, "short": 1, "detailed": 1})
    data = build_train_data(c, default_resolution=512, seed=1)
    items = {it.path.name: it for it in data.index.items}
    assert items["a0.png"].levels == {"tags": [TAGS], "short": [SHORT], "detailed": [DETAILED]}
    assert items["a0.png"].captions == ["main 0"] and items["b.png"].levels == {"short": ["only short"]}
    assert "have no caption file" not in capsys.readouterr().err  # b.png has a level
    caps = captions_over_epochs(data, 12)
    kinds = Counter("short" if x == SHORT else "detailed" if x == DETAILED else "only" if x == "only short"
                    else "tags" for x in caps)
    assert kinds["only"] == 12 and min(kinds["tags"], kinds["short"], kinds["detailed"]) >= 6
    assert not any(x.startswith("main") for x in caps)
    # the same seed gives the same levels and captions, epoch by epoch (what an exact resume needs)
    assert captions_over_epochs(build_train_data(c, default_resolution=512, seed=1), 12) == caps
    assert captions_over_epochs(build_train_data(c, default_resolution=512, seed=2), 12) != caps
    # levels off: the main caption file, level files ignored
    plain = build_train_data(cfg(train_data_dir=str(level_folder)), default_resolution=512, seed=1)
    assert sorted(captions_over_epochs(plain, 1)) == ["", "main 0", "main 1", "main 2"]


def test_metadata_caption_and_tags_are_chosen_between_not_joined(tmp_path):
    d = tmp_path / "imgs"
    png(d / "x.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"x": {"caption": SHORT, "tags": TAGS}}), encoding="utf-8")
    joined = build_train_data(cfg(train_data_dir=str(d), metadata_file=str(meta)), default_resolution=512, seed=0)
    assert captions_over_epochs(joined, 1) == [f"{SHORT}, {TAGS}"]  # levels off: sd-scripts joins them
    c = cfg(train_data_dir=str(d), metadata_file=str(meta), shuffle_caption=True, caption_levels={"tags": 1, "short": 1})
    caps = captions_over_epochs(build_train_data(c, default_resolution=512, seed=0), 40)
    assert SHORT in caps and all(x == SHORT or sorted(x.split(", ")) == sorted(TAGS.split(", ")) for x in caps)
    assert any(x != TAGS and x != SHORT for x in caps)  # the tags line is shuffled, the prose never


def test_dataset_level_columns(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(buf, "PNG")
    pq.write_table(pa.table({"image": [{"bytes": buf.getvalue(), "path": None}], "text": ["main"],
                             "tags": [TAGS.split(", ")], "long": [DETAILED]}), tmp_path / "d.parquet")
    c = cfg(dataset_path=str(tmp_path / "d.parquet"), detailed_column="long",
            caption_levels={"tags": 1, "detailed": 1})
    data = build_train_data(c, default_resolution=512, seed=0)
    assert data.index.items[0].levels == {"tags": [TAGS], "detailed": [DETAILED]}
    assert set(captions_over_epochs(data, 20)) == {TAGS, DETAILED}


def test_cached_text_encoder_outputs_refuse_several_levels(level_folder):
    c = cfg(train_data_dir=str(level_folder), caption_levels={"short": 1, "detailed": 1})
    with pytest.raises(ConfigError, match=r"data.caption_levels \(several levels for .*a0.png\)"):
        build_train_data(c, default_resolution=512, seed=0).fixed_captions()
    one = build_train_data(cfg(train_data_dir=str(level_folder), caption_levels={"short": 1}),
                           default_resolution=512, seed=0)
    assert one.fixed_captions() == sorted({SHORT, "only short"})


def test_unknown_level_or_bad_weights_are_config_errors():
    with pytest.raises(ConfigError, match="unknown caption level.*long; the levels are tags, short, detailed"):
        DataConfig(caption_levels={"long": 1.0}).validate()
    with pytest.raises(ConfigError, match="weights must be numbers >= 0, not all 0"):
        DataConfig(caption_levels={"tags": 0.0}).validate()


def test_levels_asked_for_but_absent_are_named_in_one_warning(tmp_path, capsys):
    d = tmp_path / "imgs"
    png(d / "x.png")
    (d / "x.txt").write_text("main", encoding="utf-8")
    data = build_train_data(cfg(train_data_dir=str(d), caption_levels={"tags": 1, "detailed": 0}),
                            default_resolution=512, seed=0)
    assert captions_over_epochs(data, 1) == ["main"]
    assert ("warning: data.caption_levels draws tags, but no image of subset 'imgs' has those levels (files "
            "foo.<level>.txt, metadata keys or dataset columns); its captions are used") in capsys.readouterr().err
