"""Issue 18 acceptance: a parquet file and an imagefolder + metadata.jsonl made here train a LoRA on tiny:sd15, and
give the LoRA the caption-file folder of the same images gives (the same batches, so the same weights)."""

import pytest
import torch

from tests.test_data_hf import make_folder, make_imagefolder, make_parquet
from tests.tinyrun import assert_outputs_intact, main_in_process, write_config

pytest.importorskip("datasets")


@pytest.mark.slow
def test_lora_trains_on_parquet_and_imagefolder_as_on_the_folder(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    sources = {"folder": {"train_data_dir": str(make_folder(tmp_path / "folder"))},
               "parquet": {"train_data_dir": "", "dataset_path": str(make_parquet(tmp_path / "d.parquet"))},
               "imagefolder": {"train_data_dir": "", "dataset_path": str(make_imagefolder(tmp_path / "imf"))}}
    loras = {}
    for name, data in sources.items():
        out = tmp_path / f"out-{name}"
        cfg = write_config(tmp_path / f"{name}.toml", out, "lora",
                           data={**data, "shuffle_caption": True,
                                 "flip_aug": True},
                           train={"max_train_steps": 4}, save={"save_state": False})
        assert main_in_process("lora", cfg) == 0, name
        assert_outputs_intact(out)
        loras[name] = load_file(str(out / "run.safetensors"))
    ref = loras["folder"]
    start = {k: v for k, v in ref.items() if k.endswith("lora_up.weight")}
    assert any(v.abs().max() > 0 for v in start.values())  # the up matrices start at zero: training moved them
    for name in ("parquet", "imagefolder"):
        assert loras[name].keys() == ref.keys()
        assert all(torch.equal(loras[name][k], ref[k]) for k in ref), name


def test_a_missing_caption_column_stops_the_script_with_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    p = make_parquet(tmp_path / "d.parquet", text_col="prompt")
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora",
                       data={"train_data_dir": "", "dataset_path": str(p)})
    assert main_in_process("lora", cfg) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: dataset {str(p)!r} (subset 'd.parquet'): caption_column = 'text' is not one of its "
                   "columns; its columns are: image, prompt (set caption_column)"]
