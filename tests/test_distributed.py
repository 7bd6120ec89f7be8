"""Data parallel: 2 CPU processes (gloo) match 1 process with the same global batch.

Launched with torchrun (`python -m torch.distributed.run`), which sets RANK / WORLD_SIZE; accelerate then runs
MULTI_CPU. (`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate treats --cpu as single-device.)

Two processes with batch B run global batches {rank 0's batch, rank 1's batch}; one process with batch B and 2
accumulation steps runs the same two batches in one optimizer step. Batch noise is seeded by the global batch number
(library/training/loop.py), so both see identical data and noise and differ only by float summation order.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.training.state import list_states

REPO = Path(__file__).resolve().parent.parent


def config(out: Path) -> str:
    return f"""
[model]
pretrained_model_name_or_path = "tiny:sd15"
[data]
train_data_dir = "demo:shapes"
resolution = 64
batch_size = 2
min_bucket_reso = 64
max_bucket_reso = 128
num_workers = 0
cache_latents = true
[train]
max_train_steps = 3
seed = 5
[optimizer]
learning_rate = 1e-3
[save]
output_dir = "{out}"
output_name = "run"
save_precision = "fp32"
[log]
log_with = "none"
progress_bar = false
"""


def run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(config(tmp_path / "out"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    run([*launch, "train_lora.py", "--config", str(cfg), "--output_dir", str(tmp_path / "two")])
    run([sys.executable, "train_lora.py", "--config", str(cfg), "--output_dir", str(tmp_path / "one"),
         "--train.gradient_accumulation_steps=2"])
    two = load_file(str(list_states(tmp_path / "two")[-1] / "trainable.safetensors"))
    one = load_file(str(list_states(tmp_path / "one")[-1] / "trainable.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    # LoRA up matrices start at zero: non-zero ones show training moved the weights, so the match is not vacuous
    assert list_states(tmp_path / "one")[-1].name == "step-00000003"
    assert any(k.endswith("lora_B") and one[k].abs().max() > 1e-4 for k in one)
