"""The run plan (library/training/plan.py): every derived fact resolved once and every cross-field check made before
a weight is read, for the real run and `--dry-run` alike; resume states refuse what they were not made with
(issue 16 bugs 1, 3, 5; issue 21 items 1-3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.config.core import load_config
from library.errors import ConfigError
from library.methods import dreambooth, lora, native
from library.training.plan import make_plan
from tests.tinyrun import BASE, main_in_process, merge, write_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _cfg(module, **tables):
    import copy

    return load_config(module.CONFIG_CLASS, merge(copy.deepcopy(BASE), tables), source="test")


def _dataset_file(tmp_path: Path, resolution) -> Path:
    import tomli_w

    from library.data.demo import resolve_dataset_ref

    path = tmp_path / "dataset.toml"
    path.write_text(tomli_w.dumps({"general": {"resolution": resolution, "batch_size": 3, "enable_bucket": False},
                                   "datasets": [{"subsets": [{"image_dir": str(resolve_dataset_ref("demo:shapes"))}]}]}))
    return path


@pytest.mark.parametrize("resolution, expected", [(96, (96, 96)), ([128, 64], (128, 64))])
def test_dataset_file_general_resolution_reaches_every_fact(tmp_path, resolution, expected):
    """An sd-scripts dataset file's [general] resolution (and batch size) is what the run describes itself with:
    the metadata (RunFacts.resolution), the sample size and DeepSpeed's micro-batch; [w, h] stays [w, h]."""
    cfg = _cfg(lora, data={"train_data_dir": "", "dataset_config": str(_dataset_file(tmp_path, resolution)),
                           "resolution": 0}, sample={"prompts": ["a circle"]})
    plan = make_plan(cfg, lora.make_method(cfg), script="test")
    assert plan.resolution == plan.facts.resolution == expected
    assert (plan.prompts[0].width, plan.prompts[0].height) == expected
    assert plan.batch_size == 3


def test_disabled_buckets_skip_the_bucket_checks():
    cfg = _cfg(lora, data={"enable_bucket": False, "min_bucket_reso": 100, "max_bucket_reso": 30})
    assert make_plan(cfg, lora.make_method(cfg), script="test").resolution == (64, 64)
    with pytest.raises(ConfigError, match="min_bucket_reso"):
        _cfg(lora, data={"enable_bucket": True, "min_bucket_reso": 100})


def test_config_errors_come_before_any_weight_is_read(tmp_path, monkeypatch):
    import library.models.load as load

    def never(*a, **k):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(load, "load_model", never)
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", data={"max_bucket_reso": 32})
    assert main_in_process("lora", cfg) == 2
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", sample={"prompts": ["a cat --ss 3"]})
    assert main_in_process("lora", cfg) == 2


@pytest.mark.parametrize("tables, message", [
    ({"noise": {"zero_terminal_snr": True}}, "noise.zero_terminal_snr = true needs model.prediction_type"),
    ({"sample": {"prompts": ["a circle --ss 3"]}}, "--ss"),
    ({"train": {"attention": "xformers", "device": "cpu"}}, "train.attention = 'xformers' needs a CUDA GPU"),
    ({"train": {"train_text_encoder": True}, "data": {"cache_text_encoder_outputs": True}},
     "data.cache_text_encoder_outputs = true, but this run trains the text encoder"),
])
def test_dry_run_refuses_what_the_run_refuses(tmp_path, capsys, tables, message):
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "native", **tables)
    capsys.readouterr()
    assert main_in_process("native", cfg, "--dry-run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_dreambooth_dry_run_neither_trains_nor_generates(tmp_path, capsys):
    import train_dreambooth

    out = tmp_path / "out"
    rc = train_dreambooth.main(["--config", str(CONFIGS / "quickstart_dreambooth.toml"), "--dry-run",
                                f"--save.output_dir={out}", f"--dreambooth.class_cache_dir={tmp_path / 'cache'}"])
    printed = capsys.readouterr().out
    assert rc == 0 and "config is valid" in printed and "to generate before training" in printed
    assert "peak" in printed.lower()
    assert not out.exists() and not list((tmp_path / "cache").rglob("*.png"))


def test_dreambooth_goes_through_the_shared_entry_path(capsys):
    import inspect

    import train_dreambooth

    assert "run_script(" in inspect.getsource(train_dreambooth.main)
    assert train_dreambooth.main(["--config", str(CONFIGS / "quickstart_dreambooth.toml"), "--print-config"]) == 0
    assert "[dreambooth]" in capsys.readouterr().out
    assert dreambooth.make_method(load_config(dreambooth.CONFIG_CLASS, CONFIGS / "quickstart_dreambooth.toml")
                                  ).estimate_kind()[0] in ("full", "lora")


def test_native_method_reads_only_its_sections():
    cfg = _cfg(native, train={"train_text_encoder": True, "stop_text_encoder_training": 3})
    method = native.make_method(cfg)
    assert not hasattr(method, "cfg") and method.stop_te_at == 3 and method.trains_text_encoder(0)


# ---------------------------------------------------------------------------------------------------------------
# Resume refuses a state made with other settings (issue 21 items 1 and 2): exit 2 and one line naming the key.

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = write_config(tmp / "run.toml", tmp / "out", "lora", train={"max_train_steps": 2},
                       network={"network_dim": 8}, optimizer={"learning_rate": 2e-3})
    assert main_in_process("lora", cfg) == 0
    return cfg


@pytest.mark.parametrize("override, message", [
    ("--optimizer.learning_rate=1e-4", "made with optimizer.learning_rate = 0.002, this run sets 0.0001"),
    ("--network.network_dim=4", "made with other settings of what trains"),
    ("--optimizer.optimizer_type=Lion", "made with optimizer.optimizer_type = 'AdamW'"),
])
def test_resume_refuses_changed_settings(saved_run, capsys, override, message):
    capsys.readouterr()
    rc = main_in_process("lora", saved_run, "--train.resume=auto", "--train.max_train_steps=3", override)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len([ln for ln in err if ln.startswith("error:")]) == 1, err
    assert message in err[-1] and "Traceback" not in "\n".join(err), err


def test_resume_with_the_same_settings_continues(saved_run, capsys):
    assert main_in_process("lora", saved_run, "--train.resume=auto", "--train.max_train_steps=3") == 0
    assert "resumed from" in capsys.readouterr().err
