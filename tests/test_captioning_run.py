"""caption_images.py end to end on a tiny random BLIP and a tiny ONNX tagger built here: one caption per image,
existing captions kept, the three levels side by side, unreadable images listed, a killed run resumed, the errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import caption_images
from caption_models import (COLOURS, make_images, make_tiny_blip, make_tiny_blip2, make_tiny_florence2,
                            make_tiny_git, make_tiny_tagger)
from library.captioning.text import TextCaptioner
from library.config.caption import GenerateConfig

REPO = Path(__file__).resolve().parent.parent
SIX = {name: name for name in COLOURS}  # red.png, green.png, ... one per colour


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger") / "tiny-wd14")


def run(*args) -> int:
    return caption_images.main([str(a) for a in args] + ["--no-progress"])


def captions(folder: Path, suffix: str = ".txt") -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*" + suffix))}


def test_tags_mode_writes_sd_scripts_style_tags_and_keeps_existing(tmp_path, tagger, capsys):
    make_images(tmp_path, {"r": "red", "g": "green", "b": "blue", "w": "white"})
    (tmp_path / "w.txt").write_text("my own caption\n", encoding="utf-8")
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger, "--remove_underscore",
               "--undesired_tags", "looking at viewer,^_^", "--character_tags_first",
               "--caption.tagger.rating", "last", "--batch_size", "3") == 0
    assert captions(tmp_path) == {
        "b.txt": "blue sky, general\n",
        "g.txt": "hatsune miku (vocaloid), green eyes, general\n",
        "r.txt": "hakurei reimu, red hair, sensitive\n",
        "w.txt": "my own caption\n",  # kept
    }
    out = capsys.readouterr().out
    assert "4 images in" in out and "3 caption files to write, 1 already there and kept" in out
    assert "wrote 3 caption files" in out
    # a second run has nothing to do; --overwrite replaces, with the thresholds and the separator asked for
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger) == 0
    assert "0 caption files to write, 4 already there and kept" in capsys.readouterr().out
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger, "--overwrite", "--general_threshold", "0.9",
               "--character_threshold", "0.999", "--caption_separator", "|", "--always_first_tags", "^_^") == 0
    # white: every colour tag scores 0.9975 (characters too: under 0.999), white_background 0.88 (under 0.9)
    assert captions(tmp_path)["w.txt"] == "^_^|red_hair|green_eyes|blue_sky\n"
    assert captions(tmp_path)["g.txt"] == "^_^|green_eyes\n"


def test_text_mode_one_caption_per_image_same_in_any_batch_size(tmp_path, blip, capsys):
    one, four = tmp_path / "one", tmp_path / "four"
    make_images(one, SIX)
    make_images(four, SIX)
    assert run(one, "--model", blip, "--batch_size", "1", "--num_beams", "1") == 0
    assert run(four, "--caption.model", blip, "--caption.batch_size", "4", "--caption.text.num_beams", "1") == 0
    got = captions(one)
    assert sorted(got) == sorted(f"{c}.txt" for c in COLOURS)
    assert got == captions(four)
    assert all(v.endswith("\n") and v.strip() and "\n" not in v.strip() for v in got.values())
    assert len(set(got.values())) >= 4  # the captions follow the images (the tiny model tells colours apart)
    # what the captioner gives for each image alone, exactly
    direct = TextCaptioner(str(blip), dtype="fp32", device="cpu", keep_prompt=False)
    for name in ("red", "blue"):
        image = Image.open(one / f"{name}.png").convert("RGB")
        assert got[f"{name}.txt"] == direct([image], GenerateConfig(num_beams=1))[0] + "\n"
    assert "wrote 6 caption files" in capsys.readouterr().out


def test_prompt_is_cut_unless_kept_and_generation_lengths(tmp_path, blip):
    make_images(tmp_path, {"a": "red", "b": "yellow"})
    common = ["--model", blip, "--caption.text.prompt", "a photo of", "--caption.text.max_new_tokens", "3",
              "--caption.text.min_new_tokens", "2", "--caption.caption_extension"]
    assert run(tmp_path, *common, ".cut") == 0
    assert run(tmp_path, *common, ".kept", "--caption.keep_prompt") == 0
    for stem in ("a", "b"):
        cut = (tmp_path / f"{stem}.cut").read_text(encoding="utf-8").strip()
        kept = (tmp_path / f"{stem}.kept").read_text(encoding="utf-8").strip()
        assert kept == f"a photo of {cut}" and 1 <= len(cut.split()) <= 3  # one token per word in this vocabulary


def test_levels_side_by_side_and_only_missing_levels_rerun(tmp_path, blip, tagger, capsys):
    make_images(tmp_path, {"r": "red", "b": "blue"})
    args = [tmp_path, "--mode", "levels", "--model", blip, "--repo_id", tagger,
            "--caption.short.max_new_tokens", "3", "--caption.short.num_beams", "1",
            "--caption.detailed.max_new_tokens", "12", "--caption.detailed.min_new_tokens", "8",
            "--caption.detailed.num_beams", "2"]
    assert run(*args) == 0
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".png"))
    assert names == ["b.detailed.txt", "b.short.txt", "b.tags.txt", "r.detailed.txt", "r.short.txt", "r.tags.txt"]
    assert (tmp_path / "r.tags.txt").read_text() == "red_hair, ^_^, looking_at_viewer, hakurei_reimu\n"
    direct = TextCaptioner(str(blip), dtype="fp32", device="cpu", keep_prompt=False)
    image = Image.open(tmp_path / "b.png").convert("RGB")
    assert (tmp_path / "b.short.txt").read_text().strip() == direct([image], GenerateConfig(max_new_tokens=3,
                                                                                            num_beams=1))[0]
    assert (tmp_path / "b.detailed.txt").read_text().strip() == direct(
        [image], GenerateConfig(max_new_tokens=12, min_new_tokens=8, num_beams=2))[0]
    assert len((tmp_path / "b.short.txt").read_text().split()) <= 3
    assert "6 caption files to write (2 tags, 2 short, 2 detailed)" in capsys.readouterr().out
    (tmp_path / "b.tags.txt").unlink()
    before = (tmp_path / "r.short.txt").stat().st_mtime_ns
    assert run(*args) == 0
    assert "1 caption files to write (1 tags, 0 short, 0 detailed), 5 already there" in capsys.readouterr().out
    assert (tmp_path / "b.tags.txt").read_text() == "blue_sky, ^_^, looking_at_viewer\n"
    assert (tmp_path / "r.short.txt").stat().st_mtime_ns == before


def test_unreadable_images_are_listed_and_the_rest_captioned(tmp_path, tagger, capsys):
    make_images(tmp_path, {"good": "green"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger, "--recursive") == 0
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["good.txt"]
    out = capsys.readouterr().out
    assert "wrote 1 caption files; 2 skipped (listed below)" in out
    assert f"skipped {tmp_path / 'broken.png'}: cannot be read" in out
    assert f"skipped {tmp_path / 'empty.jpg'}: cannot be read" in out


def test_dry_run_plans_without_loading_or_writing(tmp_path, capsys):
    make_images(tmp_path / "10_cat", {"a": "red", "b": "blue"})
    (tmp_path / "10_cat" / "a.caption").write_text("kept\n")
    assert run(tmp_path, "--recursive", "--dry-run", "--model", tmp_path / "no-such-model",
               "--caption_extension", ".caption", "--caption.device", "cpu", "--caption.dtype", "bf16") == 0
    assert "2 images in" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "10_cat").iterdir()) == ["a.caption", "a.png", "b.png"]


def test_bf16_on_cpu_and_the_progress_bar(tmp_path, blip, capsys):
    make_images(tmp_path, {"a": "red", "b": "green"})
    assert caption_images.main([str(tmp_path), "--model", str(blip), "--caption.dtype", "bf16",
                                "--caption.device", "cpu", "--caption.text.max_new_tokens", "4"]) == 0
    assert len(captions(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "captioning: 100%" in err and "2/2" in err


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, blip):
    make_images(tmp_path, {"a": "red"})
    cases = [
        ([tmp_path / "missing", "--model", blip], "image folder"),
        ([tmp_path], "caption.mode = 'text' needs caption.model"),
        ([tmp_path, "--model", tmp_path / "no-model"], "cannot be loaded as an image captioner"),
        ([tmp_path, "--mode", "tags", "--repo_id", tmp_path], "has no model.onnx and no selected_tags.csv"),
        ([tmp_path, "--caption.tagger.treshold", "0.3"], "Did you mean"),
        ([tmp_path, "--model", blip, "--caption.device", "cuda"], "torch finds no CUDA GPU"),
    ]
    for args, message in cases:
        assert run(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (args, err)
    assert not list(tmp_path.glob("*.txt"))


def test_a_killed_run_continues_where_it_stopped(tmp_path, blip, tagger, capsys):
    """SIGKILL in the middle of the 5th caption file (its temporary written, not yet renamed), then a rerun: the
    files are those of one uninterrupted run, nothing half-written was ever visible, the temporary is cleaned up."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    for folder in (killed, whole):
        make_images(folder, {"a": "red", "b": "green", "c": "blue"})
    args = ["--mode", "levels", "--model", str(blip), "--repo_id", str(tagger), "--batch_size", "2",
            "--caption.short.max_new_tokens", "4", "--caption.detailed.max_new_tokens", "6",
            "--caption.detailed.min_new_tokens", "2", "--no-progress"]
    env = {**os.environ, "SDTK_TEST_KILL_AT": "caption:5", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "caption_images.py"), str(killed), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    done = sorted(p.name for p in killed.glob("*.txt"))
    assert done == ["a.short.txt", "a.tags.txt", "b.tags.txt", "c.tags.txt"]  # tags level first, then short
    assert [p.name.split(".tmp-")[0] for p in killed.glob(".*")] == [".b.short.txt"]  # the 5th, unrenamed
    assert caption_images.main([str(killed), *args]) == 0
    assert "5 caption files to write (0 tags, 2 short, 3 detailed), 4 already there" in capsys.readouterr().out
    assert caption_images.main([str(whole), *args]) == 0
    assert captions(killed) == captions(whole) and len(captions(whole)) == 9
    assert not list(killed.glob(".*"))


def test_an_empty_caption_is_listed_not_written_and_retried(tmp_path, blip, capsys, monkeypatch):
    make_images(tmp_path, {"a": "red", "b": "green", "c": "blue"})
    real = TextCaptioner.__call__

    def blank_green(self, images, gen):
        out = real(self, images, gen)
        return ["" if im.getpixel((0, 0)) == COLOURS["green"] else c for im, c in zip(images, out)]

    monkeypatch.setattr(TextCaptioner, "__call__", blank_green)
    assert run(tmp_path, "--model", blip, "--batch_size", "2") == 0
    assert sorted(captions(tmp_path)) == ["a.txt", "c.txt"]
    out = capsys.readouterr().out
    assert (f"skipped {tmp_path / 'b.png'}: the model gave an empty caption; nothing written (a rerun tries again)"
            in out)
    monkeypatch.setattr(TextCaptioner, "__call__", real)
    assert run(tmp_path, "--model", blip) == 0
    assert "1 caption files to write, 2 already there" in capsys.readouterr().out
    assert sorted(captions(tmp_path)) == ["a.txt", "b.txt", "c.txt"]


def test_config_file_and_command_line(tmp_path, tagger, capsys):
    make_images(tmp_path / "imgs", {"a": "red"})
    cfg = tmp_path / "caption.toml"
    cfg.write_text(f'[caption]\nimage_dir = "{tmp_path / "imgs"}"\nmode = "tags"\n'
                   f'[caption.tagger]\nmodel = "{tagger}"\nrating = "first"\n', encoding="utf-8")
    assert run("--config", cfg, "--caption.tagger.remove_underscore") == 0
    assert captions(tmp_path / "imgs") == {"a.txt": "sensitive, red hair, ^_^, looking at viewer, hakurei reimu\n"}
    assert "captioning" not in capsys.readouterr().err  # --no-progress: no bar


@pytest.mark.parametrize("arch", ["blip2", "git"])
def test_decoder_only_captioners_get_their_prompt_cut(tmp_path, arch):
    """BLIP-2 (OPT decoder) and GIT continue their prompt; GIT's processor also returns token_type_ids."""
    model = (make_tiny_blip2 if arch == "blip2" else make_tiny_git)(tmp_path / f"tiny-{arch}")
    make_images(tmp_path / "imgs", {"a": "red", "b": "green", "c": "blue"})
    prompt = "question : what is a photo answer :" if arch == "blip2" else "a photo of"
    common = [tmp_path / "imgs", "--model", model, "--num_beams", "1", "--caption.text.max_new_tokens", "5",
              "--caption.text.prompt", prompt, "--batch_size", "2", "--caption_extension"]
    assert run(*common, ".cut") == 0
    assert run(*common, ".kept", "--caption.keep_prompt") == 0
    for stem in "abc":
        cut = (tmp_path / "imgs" / f"{stem}.cut").read_text().strip()
        kept = (tmp_path / "imgs" / f"{stem}.kept").read_text().strip()
        assert kept == f"{prompt} {cut}" and cut
    assert run(tmp_path / "imgs", "--model", model, "--num_beams", "2", "--caption.text.max_new_tokens", "4") == 0
    assert all(1 <= len(v.split()) <= 4 for v in captions(tmp_path / "imgs").values())


def test_florence2_task_prompts_for_the_levels(tmp_path, tagger):
    """An encoder-decoder captioner driven by task tokens: the short and detailed levels are exactly what it gives
    for '<CAPTION>' and '<MORE_DETAILED_CAPTION>' (its output does not repeat the prompt, so nothing is cut)."""
    florence = make_tiny_florence2(tmp_path / "tiny-florence2")
    make_images(tmp_path / "imgs", {"a": "red", "b": "blue"})
    short = GenerateConfig(prompt="<CAPTION>", max_new_tokens=4, num_beams=1)
    detailed = GenerateConfig(prompt="<MORE_DETAILED_CAPTION>", max_new_tokens=8, min_new_tokens=3, num_beams=2)
    assert run(tmp_path / "imgs", "--mode", "levels", "--model", florence, "--repo_id", tagger,
               "--caption.short.prompt", short.prompt, "--caption.short.max_new_tokens", "4",
               "--caption.short.num_beams", "1", "--caption.detailed.prompt", detailed.prompt,
               "--caption.detailed.max_new_tokens", "8", "--caption.detailed.min_new_tokens", "3",
               "--caption.detailed.num_beams", "2") == 0
    direct = TextCaptioner(str(florence), dtype="fp32", device="cpu", keep_prompt=False)
    for stem in "ab":
        image = Image.open(tmp_path / "imgs" / f"{stem}.png").convert("RGB")
        for level, gen in (("short", short), ("detailed", detailed)):
            text = (tmp_path / "imgs" / f"{stem}.{level}.txt").read_text().strip()
            assert text and text == direct([image], gen)[0], (stem, level)
    assert (tmp_path / "imgs" / "a.tags.txt").read_text() == "red_hair, ^_^, looking_at_viewer, hakurei_reimu\n"


def test_a_model_that_refuses_the_inputs_is_one_error_line(tmp_path, blip, capsys, monkeypatch):
    """A model whose generate refuses what its processor made (e.g. a chat model given a plain prompt) stops the
    run with one line naming caption.model and the prompt."""
    from transformers import BlipForConditionalGeneration

    make_images(tmp_path, {"a": "red"})

    def refuse(self, **kwargs):
        raise ValueError("Image features and image tokens do not match: tokens: 0, features 4\nmore detail")

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", refuse)
    assert run(tmp_path, "--model", blip, "--caption.text.prompt", "describe") == 2
    err = capsys.readouterr().err
    assert err == (f"error: caption.model = '{blip}' cannot caption with prompt 'describe': Image features and "
                   "image tokens do not match: tokens: 0, features 4\n")


def test_a_model_that_needs_a_missing_package_is_one_error_line(tmp_path, blip, capsys, monkeypatch):
    import transformers

    make_images(tmp_path, {"a": "red"})

    def needs(*args, **kwargs):
        raise ImportError("This modeling file requires the following packages that were not found: timm")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", needs)
    assert run(tmp_path, "--model", blip) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: caption.model = '{blip}' cannot be loaded as an image captioner") and err.endswith(
        "not found: timm\n")


def test_no_tag_above_the_thresholds_is_listed(tmp_path, tagger, capsys):
    make_images(tmp_path, {"a": "black", "b": "red"})
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger, "--general_threshold", "0.99",
               "--character_threshold", "1.0") == 0
    assert captions(tmp_path) == {"b.txt": "red_hair\n"}  # black scores no tag >= 0.99
    out = capsys.readouterr().out
    assert f"skipped {tmp_path / 'a.png'}: no tag reached the thresholds; nothing written (a rerun tries again)" in out


def test_dry_run_leaves_a_killed_runs_temporary_for_the_real_run(tmp_path, tagger):
    make_images(tmp_path, {"a": "red"})
    leftover = tmp_path / ".a.txt.tmp-999999999"  # no such process: a killed run's temporary
    leftover.write_text("half")
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger, "--dry-run") == 0
    assert leftover.exists() and not (tmp_path / "a.txt").exists()
    assert run(tmp_path, "--mode", "tags", "--repo_id", tagger) == 0
    assert not leftover.exists()
    assert (tmp_path / "a.txt").read_text() == "red_hair, ^_^, looking_at_viewer, hakurei_reimu\n"
