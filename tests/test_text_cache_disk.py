"""The on-disk text-encoder output cache (library/data/text_cache.py, issue 21 item 9); test_text_cache.py checks which
captions are cached."""

from __future__ import annotations

import json

import pytest
import torch

from library.data import text_cache as T
from library.models.text import encode_text, tokenize
from library.models.tiny import build_tiny

CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a red square"]


@pytest.fixture
def sd1(tiny_sd1):
    return tiny_sd1  # the session's shared model (tests/conftest.py); only read here


class Encoder:
    """encode_fn over `model` with `clip_skip`, recording the captions of every call."""

    def __init__(self, model, clip_skip: int = 1):
        self.model, self.clip_skip, self.calls = model, clip_skip, []

    def __call__(self, captions: list[str]):
        self.calls.append(list(captions))
        c = encode_text(self.model, tokenize(self.model, captions), clip_skip=self.clip_skip)
        return c.hidden, c.pooled


def direct(model, caption: str, clip_skip: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return encode_text(model, tokenize(model, [caption]), clip_skip=clip_skip).hidden[0]


def test_reused_on_the_second_run_without_calling_the_encoder(sd1, tmp_path, capsys):
    record = T.text_cache_record(sd1, 1, "no")
    enc = Encoder(sd1)
    first = T.load_or_encode(CAPTIONS, enc, tmp_path, record)
    assert enc.calls == [["a red square", "a blue circle", "a green triangle"]]  # each distinct caption once
    assert set(first) == set(CAPTIONS)
    for c in CAPTIONS:
        assert torch.equal(first[c][0], direct(sd1, c)) and first[c][1] is None
    assert f"text-encoder cache {tmp_path}: 0 reused, 3 to encode" in capsys.readouterr().err

    def never(captions):
        raise AssertionError(f"the encoder was called for {captions}")

    second = T.load_or_encode(CAPTIONS, never, tmp_path, T.text_cache_record(sd1, 1, "no"))
    assert all(torch.equal(second[c][0], first[c][0]) for c in CAPTIONS)
    assert f"text-encoder cache {tmp_path}: 3 reused, 0 to encode\n" in capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([T.MANIFEST] + [T.caption_file(c) for c in set(CAPTIONS)])  # no temporaries left


def test_rebuilt_when_clip_skip_or_the_encoder_changes(sd1, tmp_path, capsys):
    T.load_or_encode(CAPTIONS, Encoder(sd1), tmp_path, T.text_cache_record(sd1, 1, "no"))
    enc2 = Encoder(sd1, clip_skip=2)
    out = T.load_or_encode(CAPTIONS, enc2, tmp_path, T.text_cache_record(sd1, 2, "no"))
    assert enc2.calls == [["a red square", "a blue circle", "a green triangle"]]
    assert torch.equal(out["a blue circle"][0], direct(sd1, "a blue circle", clip_skip=2))
    assert not torch.equal(out["a blue circle"][0], direct(sd1, "a blue circle"))
    assert "0 reused, 3 to encode (stale, rebuilt: 3 clip_skip changed)" in capsys.readouterr().err
    # Same architecture and name, other weights (a fine-tune): the weight hash tells them apart.
    other = build_tiny("sd1", seed=1)
    assert T.text_cache_record(other, 2, "no")["text_encoders"] != T.text_cache_record(sd1, 2, "no")["text_encoders"]
    enc3 = Encoder(other, clip_skip=2)
    out = T.load_or_encode(CAPTIONS[:2], enc3, tmp_path, T.text_cache_record(other, 2, "no"))
    assert enc3.calls == [["a red square", "a blue circle"]]
    assert torch.equal(out["a red square"][0], direct(other, "a red square", clip_skip=2))
    assert "0 reused, 2 to encode (stale, rebuilt: 2 text encoder changed)" in capsys.readouterr().err
    # Precision and max length are part of the record too.
    assert T.text_cache_record(sd1, 1, "bf16") != T.text_cache_record(sd1, 1, "no")


def test_truncated_file_and_unreadable_manifest_are_rebuilt_with_a_message(sd1, tmp_path, capsys):
    record = T.text_cache_record(sd1, 1, "no")
    T.load_or_encode(CAPTIONS, Encoder(sd1), tmp_path, record)
    capsys.readouterr()
    broken = tmp_path / T.caption_file("a blue circle")
    broken.write_bytes(broken.read_bytes()[:200])
    enc = Encoder(sd1)
    out = T.load_or_encode(CAPTIONS, enc, tmp_path, record)
    err = capsys.readouterr().err
    assert enc.calls == [["a blue circle"]]  # only the damaged one
    assert f"warning: text-encoder cache file {broken} (caption 'a blue circle') is unreadable" in err
    assert "2 reused, 1 to encode (stale, rebuilt: 1 file unreadable)" in err
    assert torch.equal(out["a blue circle"][0], direct(sd1, "a blue circle"))
    # A file that reads but is not what the manifest says (replaced by hand) is not trusted either.
    from safetensors.torch import save_file

    save_file({"hidden": torch.zeros(3, 4)}, str(tmp_path / T.caption_file("a red square")))
    enc = Encoder(sd1)
    T.load_or_encode(CAPTIONS, enc, tmp_path, record)
    assert enc.calls == [["a red square"]] and "holds {'hidden': [3, 4]}" in capsys.readouterr().err
    (tmp_path / T.MANIFEST).write_text('{"format": 1, "entr')
    enc = Encoder(sd1)
    T.load_or_encode(CAPTIONS, enc, tmp_path, record)
    err = capsys.readouterr().err
    assert f"warning: text-encoder cache manifest {tmp_path / T.MANIFEST} is unreadable" in err
    assert enc.calls == [["a red square", "a blue circle", "a green triangle"]]
    assert json.loads((tmp_path / T.MANIFEST).read_text())["format"] == T.FORMAT


def test_a_failed_encode_keeps_the_cache_as_it_was(sd1, tmp_path, monkeypatch):
    record = T.text_cache_record(sd1, 1, "no")
    T.load_or_encode(CAPTIONS[:2], Encoder(sd1), tmp_path, record)
    before = (tmp_path / T.MANIFEST).read_text()
    monkeypatch.setattr(T, "ENCODE_BATCH", 1)
    calls = []

    def fails_second(captions):
        calls.append(captions)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return Encoder(sd1)(captions)

    with pytest.raises(RuntimeError, match="out of memory"):
        T.load_or_encode(["a", "b", "c"], fails_second, tmp_path, record)
    assert (tmp_path / T.MANIFEST).read_text() == before  # written only when the batch is done
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    def never(captions):
        raise AssertionError(captions)

    assert set(T.load_or_encode(CAPTIONS[:2], never, tmp_path, record)) == set(CAPTIONS[:2])


def test_sdxl_pooled_outputs_round_trip(tmp_path):
    model = build_tiny("sdxl")
    record = T.text_cache_record(model, 1, "no")
    enc = Encoder(model)
    first = T.load_or_encode(["a cat"], enc, tmp_path, record)
    again = T.load_or_encode(["a cat"], lambda c: pytest.fail("encoder called"), tmp_path, record)
    with torch.no_grad():
        c = encode_text(model, tokenize(model, ["a cat"]))
    assert torch.equal(again["a cat"][0], c.hidden[0]) and torch.equal(again["a cat"][1], c.pooled[0])
    assert first["a cat"][1].shape == c.pooled[0].shape and len(record["tokenizers"]) == 2


def test_option_needs_the_cache_and_names_the_folder(tmp_path):
    from library.config.data import DataConfig
    from library.data.loader import build_train_data
    from library.errors import ConfigError

    base = dict(train_data_dir="demo:shapes", resolution=64, min_bucket_reso=64, max_bucket_reso=128, num_workers=0)
    with pytest.raises(ConfigError, match=r"^data\.cache_text_encoder_outputs_to_disk = true needs "
                                          r"data\.cache_text_encoder_outputs = true$"):
        DataConfig(**base, cache_text_encoder_outputs_to_disk=True).validate()
    on = DataConfig(**base, cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True,
                    cache_dir=str(tmp_path / "c"))
    on.validate()
    assert build_train_data(on, default_resolution=64, seed=0).text_cache_dir == tmp_path / "c" / "text_encoder_outputs"
    off = DataConfig(**base, cache_text_encoder_outputs=True)
    assert build_train_data(off, default_resolution=64, seed=0).text_cache_dir is None
    default = DataConfig(**base, cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True)
    folder = build_train_data(default, default_resolution=64, seed=0).text_cache_dir
    assert folder.parent.name == "text_encoder_outputs" and len(folder.name) == 16


def test_second_run_reads_the_text_encoder_outputs_from_disk(tmp_path, capfd):
    from tests.tinyrun import train_in_process, write_config

    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", train={"max_train_steps": 1},
                       network={"train_unet_only": True},
                       data={"cache_text_encoder_outputs": True, "cache_text_encoder_outputs_to_disk": True,
                             "cache_dir": str(tmp_path / "cache")})
    train_in_process("lora", cfg)
    first = capfd.readouterr().err
    train_in_process("lora", cfg)
    second = capfd.readouterr().err
    folder = tmp_path / "cache" / "text_encoder_outputs"
    n = len(json.loads((folder / T.MANIFEST).read_text())["entries"])
    assert n > 0 and f"text-encoder cache {folder}: 0 reused, {n} to encode" in first
    assert f"text-encoder cache {folder}: {n} reused, 0 to encode" in second
