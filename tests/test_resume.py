"""Exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run (CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.config.core import load_config
from library.training.run import run_training
from library.training.state import list_states

REPO = Path(__file__).resolve().parent.parent

SCRIPTS = {
    "native": ("train_native.py", "train_native", "NativeFineTune"),
    "lora": ("train_lora.py", "train_lora", "LoraTraining"),
}


def write_config(path: Path, out_dir: Path, steps: int) -> Path:
    path.write_text(f"""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[data]
train_data_dir = "demo:shapes"
resolution = 64
batch_size = 2
min_bucket_reso = 64
max_bucket_reso = 128
num_workers = 0
[train]
max_train_steps = {steps}
seed = 5
gradient_accumulation_steps = 2
ema = true
[optimizer]
learning_rate = 1e-3
[save]
output_dir = "{out_dir}"
output_name = "run"
save_every_n_steps = 2
save_last_n = 0
save_precision = "fp32"
[log]
log_with = "none"
progress_bar = false
""")
    return path


def final_trainable(out_dir: Path) -> dict:
    return load_file(str(list_states(out_dir)[-1] / "trainable.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["native", "lora"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, method):
    import importlib

    script, module_name, cls_name = SCRIPTS[method]
    module = importlib.import_module(module_name)
    steps = 10

    # Uninterrupted reference, in this process.
    ref_cfg = load_config(module.CONFIG_CLASS, write_config(tmp_path / "ref.toml", tmp_path / "ref", steps))
    ref = run_training(ref_cfg, getattr(module, cls_name)(ref_cfg), script=script)
    assert ref.steps == steps

    # The same run in a subprocess, killed with SIGKILL once its second state (step 4) is complete.
    out = tmp_path / "killed"
    cfg_path = write_config(tmp_path / "killed.toml", out, steps)
    proc = subprocess.Popen([sys.executable, script, "--config", str(cfg_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (out / "state" / "step-00000004" / "done").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = list_states(out)[-1].name
    assert killed_at != f"step-{steps:08d}", "the run finished before it was killed; the test proves nothing"

    # Resume in this process and finish.
    cfg = load_config(module.CONFIG_CLASS, cfg_path)
    cfg.train.resume = "auto"
    resumed = run_training(cfg, getattr(module, cls_name)(cfg), script=script)
    assert resumed.steps == steps

    a, b = final_trainable(tmp_path / "ref"), final_trainable(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from {killed_at}: weights differ"
    ra, rb = load_file(str(ref.result_path)), load_file(str(resumed.result_path))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)  # the saved results (EMA weights) too
