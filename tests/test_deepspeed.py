"""DeepSpeed ZeRO from our TOML: the generated DeepSpeed config, the refusals, and (slow) a real ZeRO-2 + CPU optimizer
offload run of train_native.py that saves a checkpoint our loader reads.
"""

import math
import re
import time

import pytest
import torch

from library.config.core import load_config
from library.config.optim import OptimizerConfig
from library.config.run import RunConfig
from library.config.train import DeepSpeedConfig
from library.errors import ConfigError
from library.training.deepspeed import check_optimizer, deepspeed_config
from tests.tinyrun import run_script, write_config


def test_config_maps_our_tables_onto_deepspeed():
    ds = DeepSpeedConfig(zero_stage=2, offload_optimizer="cpu")
    assert deepspeed_config(ds, gradient_accumulation_steps=3, micro_batch_size=4, max_grad_norm=0.5) == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
    }


def test_zero3_config_and_extra_merge_recursively():
    ds = DeepSpeedConfig(zero_stage=3, offload_param="cpu",
                         extra={"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True})
    cfg = deepspeed_config(ds, gradient_accumulation_steps=1, micro_batch_size=1, max_grad_norm=0.0)
    assert cfg["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"},
                                        "stage3_gather_16bit_weights_on_model_save": False, "overlap_comm": True}
    assert cfg["wall_clock_breakdown"] is True and cfg["gradient_clipping"] == 0.0


def load(train: dict, **tables) -> RunConfig:
    return load_config(RunConfig, {"train": train, **tables}, source="test.toml")


@pytest.mark.parametrize("train, key", [
    ({"deepspeed": {"zero_stage": 4}}, "train.deepspeed.zero_stage"),
    ({"deepspeed": {"offload_optimizer": "cpu"}}, "train.deepspeed.zero_stage = 2"),
    ({"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}}, "zero_stage = 3"),
    ({"deepspeed": {"zero_stage": 2, "extra": {"optimizer": {}}}}, "train.deepspeed.extra.optimizer"),
    ({"deepspeed": {"zero_stage": 2}, "train_text_encoder": True}, "train.train_text_encoder"),
    ({"deepspeed": {"zero_stage": 2}, "resume": "auto"}, "train.resume"),
    ({"deepspeed": {"zero_stage": 3}, "ema": True}, "train.ema"),
])
def test_config_refusals_name_the_key(train, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load(train)


def test_cli_override_reaches_the_nested_table():
    from library.config.cli import parse_cli

    cfg, _ = parse_cli(RunConfig, ["--train.deepspeed.zero_stage=2", "--train.deepspeed.offload_optimizer=cpu"],
                       prog="t", description="t")
    assert cfg.train.deepspeed == DeepSpeedConfig(zero_stage=2, offload_optimizer="cpu")


@pytest.mark.parametrize("offload, optimizer_type, ok", [
    ("cpu", "AdamW", True), ("cpu", "Lion", False), ("none", "Lion", True), ("none", "SGD", True),
    ("none", "Adafactor", False), ("none", "Prodigy", False), ("none", "AdamW8bit", False),
])
def test_optimizer_support(offload, optimizer_type, ok):
    ds = DeepSpeedConfig(zero_stage=2, offload_optimizer=offload)
    opt = OptimizerConfig(optimizer_type=optimizer_type)
    if ok:
        check_optimizer(ds, opt)
    else:
        with pytest.raises(ConfigError, match="optimizer.optimizer_type"):
            check_optimizer(ds, opt)


def test_resume_states_are_refused_before_training(tmp_path):
    """save.save_state (on by default) cannot be honoured with DeepSpeed: a clear error, not a state missing later."""
    pytest.importorskip("deepspeed")
    from library.training.loop import _deepspeed_plugin

    cfg = load({"deepspeed": {"zero_stage": 2}})
    with pytest.raises(ConfigError, match="save.save_state = false"):
        _deepspeed_plugin(_settings(cfg))


def _settings(cfg, batch_size: int = 1):
    from library.methods.base import RunFacts
    from library.training.loop import LoopSettings

    facts = RunFacts("test", "sd1", "epsilon", "tiny:sd15", (64, 64), 1, 1, "ds")
    return LoopSettings(train=cfg.train, optimizer=cfg.optimizer, scheduler=cfg.scheduler, save=cfg.save,
                        sample=cfg.sample, log=cfg.log, facts=facts, batch_size=batch_size)


def test_micro_batch_size_is_the_datasets_batch_size(monkeypatch):
    """DeepSpeed is told the planned batch size (it was always 1: the loop read a TrainData attribute that does not
    exist)."""
    pytest.importorskip("deepspeed")
    from library.training import deepspeed as dsp
    from library.training.loop import _deepspeed_plugin

    cfg = load({"deepspeed": {"zero_stage": 2}}, save={"save_state": False})
    seen = {}
    monkeypatch.setattr(dsp, "make_plugin", lambda config: seen.setdefault("config", config))
    monkeypatch.setattr(dsp, "single_process_env", lambda: None)
    _deepspeed_plugin(_settings(cfg, batch_size=4))
    assert seen["config"]["train_micro_batch_size_per_gpu"] == 4


def native_tables() -> dict:
    return {"data": {"cache_latents": True},
            "train": {"gradient_accumulation_steps": 2, "seed": 3,
                      "deepspeed": {"zero_stage": 2, "offload_optimizer": "cpu"}},
            "scheduler": {"scheduler_type": "constant_with_warmup", "warmup_steps": 1},
            "save": {"output_name": "ds", "save_state": False}}


@pytest.mark.slow
def test_zero2_cpu_offload_trains_and_saves_a_loadable_checkpoint(tmp_path):
    """train_native.py launched as users launch it (plain python: the TOML configures DeepSpeed; one process)."""
    pytest.importorskip("deepspeed")
    from library.config.model import ModelConfig
    from library.models.load import load_model
    from library.models.tiny import resolve_model_ref

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "ds.toml", out, "native", **native_tables())
    t0 = time.perf_counter()
    proc = run_script("native", cfg, timeout=1500)
    print(f"DeepSpeed run: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = re.search(r"done: (\d+) steps, loss (\S+) \(first 10\) -> (\S+) \(last 10\)", proc.stderr)
    assert done and done.group(1) == "3", proc.stderr[-2000:]
    assert math.isfinite(float(done.group(2))) and math.isfinite(float(done.group(3)))
    assert "step skipped" not in proc.stderr
    # DeepSpeed's own process group came up (make_accelerator also refuses to run if accelerate did not pick DeepSpeed)
    assert "deepspeed_shm_comm_op" in proc.stdout + proc.stderr
    assert not (out / "state").exists()  # no resume states with DeepSpeed (refused unless save_state = false)

    folder = resolve_model_ref("tiny:sd15")
    trained = load_model(ModelConfig(pretrained_model_name_or_path=str(out / "ds.safetensors"),
                                     config_dir=str(folder)))
    base = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15"))
    new, old = trained.unet.state_dict(), base.unet.state_dict()
    assert new.keys() == old.keys()
    assert all(torch.isfinite(v).all() for v in new.values())
    changed = [k for k in old if not torch.equal(new[k], old[k])]
    assert len(changed) > 0.9 * len(old), f"only {len(changed)} of {len(old)} UNet tensors changed"
    # the text encoder and VAE were frozen: saved as loaded
    for a, b in zip(trained.text_encoders[0].state_dict().values(), base.text_encoders[0].state_dict().values()):
        assert torch.equal(a, b)
