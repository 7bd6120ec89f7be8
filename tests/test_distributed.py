"""Data parallel: 2 CPU processes (gloo) match 1 process with the same global batch.

Launched with torchrun (`python -m torch.distributed.run`), which sets RANK / WORLD_SIZE; accelerate then runs
MULTI_CPU. (`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate treats --cpu as single-device.)

Two processes with batch B run global batches {rank 0's batch, rank 1's batch}; one process with batch B and 2
accumulation steps runs the same two batches in one optimizer step. Batch noise is seeded by the global batch number
(library/training/loop.py), so both see identical data and noise and differ only by float summation order.
"""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from library.training.state import list_states
from tests.tinyrun import REPO, script_env, write_config


def run(args: list[str]) -> None:
    proc = subprocess.run(args, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", data={"cache_latents": True})
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
