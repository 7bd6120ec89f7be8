"""Kill at any moment, then resume (issue 11, item 1): a script run SIGKILLed during an optimizer step, during a
checkpoint save or during sampling resumes from its last complete state, leaves no truncated or half-written file in
its output folder, and ends bit-identical (CPU) to an uninterrupted run.

The kill is exact: the run SIGKILLs itself at the point named by SDTK_TEST_KILL_AT (library/training/faults.py), with
no chance to clean up, as a power cut or the kernel's OOM killer. The killed run is the script's main() in a forked
copy of this process (the save kill: a subprocess, as users start it). The uninterrupted reference is computed once per
method (in this process) and shared by that method's kill points: every method is killed during a step; LoRA (which
prunes old results and states as it goes) during a save; the hypernetwork (whose dropout draws from the global RNG
that sampling must leave alone) during sampling.
"""

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.training import faults
from library.training.state import list_states
from tests.tinyrun import (assert_outputs_intact, final_trainable, main_in_fork, run_script, script_env,
                           train_in_process, write_config)

STEPS = 6
COMMON = {"train": {"max_train_steps": STEPS, "gradient_accumulation_steps": 2, "ema": True},
          "save": {"save_every_n_steps": 2}}
TABLES = {
    "native": {},
    "lora": {"save": {"save_last_n": 2}},
    "ti": {},
    "hn": {"hypernetwork": {"use_dropout": True, "dropout_structure": [0, 0.3, 0]},
           "sample": {"prompts": ["a circle --s 2 --d 1"], "sample_every_n_steps": 4, "steps": 2}},
}


def tables(method: str) -> dict:
    out = {k: dict(v) for k, v in COMMON.items()}
    for k, v in TABLES[method].items():
        out[k] = {**out.get(k, {}), **v}
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of a method, once per method: (output folder, TrainResult)."""
    runs = {}

    def get(method: str):
        if method not in runs:
            tmp = tmp_path_factory.mktemp(f"ref-{method}")
            cfg = write_config(tmp / "run.toml", tmp / "out", method, **tables(method))
            runs[method] = (tmp / "out", train_in_process(method, cfg))
        return runs[method]

    return get


def killed_run(tmp_path: Path, method: str, kill_at: str, subprocess: bool = False) -> tuple[Path, Path]:
    """The method's script, SIGKILLed by itself at `kill_at`; (config, output folder).

    It runs in a forked copy of this process (no second import of torch and diffusers) or, as users run it, in a
    subprocess.
    """
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", out, method, **tables(method))
    if subprocess:
        proc = run_script(method, cfg, env=script_env(**{faults.KILL_AT: kill_at}))
        code, err = proc.returncode, proc.stderr[-3000:]
    else:
        code, err = main_in_fork(method, cfg, env={faults.KILL_AT: kill_at}), "(stderr above)"
    assert code == -signal.SIGKILL, f"not killed at {kill_at} (exit code {code}): {err}"
    return cfg, out


def result_tensors(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    raw = torch.load(path, weights_only=True)  # an A1111 hypernetwork: {width: [k state dict, v state dict]}
    return {f"{w}.{i}.{k}": v for w in raw if isinstance(w, int) for i, sd in enumerate(raw[w]) for k, v in sd.items()}


def resume_and_compare(reference, method: str, cfg: Path, out: Path):
    resumed = train_in_process(method, cfg, train={"resume": "auto"})
    assert_outputs_intact(out)  # every file loads; what the kill left half-written was cleaned up on restart
    ref_out, ref = reference(method)
    assert resumed.steps == ref.steps == STEPS
    a, b = final_trainable(ref_out), final_trainable(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    ra, rb = (result_tensors(r.result_path) for r in (ref, resumed))  # the results users load (EMA weights)
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra), "the saved results differ"
    return resumed


@pytest.mark.slow
@pytest.mark.parametrize("method", ["native", "lora", "ti", "hn"])
def test_sigkill_during_a_step_then_resume_is_bit_identical(tmp_path, reference, method):
    cfg, out = killed_run(tmp_path, method, "step:5")  # gradients of step 5 computed, weights not yet changed
    assert [p.name for p in list_states(out)][-1] == "step-00000004"
    assert_outputs_intact(out)
    resume_and_compare(reference, method, cfg, out)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_then_resume_is_bit_identical(tmp_path, reference):
    cfg, out = killed_run(tmp_path, "lora", "save:4", subprocess=True)  # one run exactly as users start it
    # The step-4 result is complete (written first, atomically); the step-4 state is half written under its
    # temporary name, so the step-2 state is the newest complete one.
    assert [p.name for p in list_states(out)] == ["step-00000002"]
    assert [p for p in (out / "state").iterdir() if p.name.startswith(".step-00000004.tmp-")]
    load_file(str(out / "run-step00000004.safetensors"))
    resume_and_compare(reference, "lora", cfg, out)
    assert [p.name for p in list_states(out)] == ["step-00000004", "step-00000006"]  # save.save_last_n = 2
    assert sorted(p.name for p in out.glob("run*.safetensors")) == [
        "run-step00000002.safetensors", "run-step00000004.safetensors", "run.safetensors"]


@pytest.mark.slow
def test_sigkill_during_sampling_then_resume_is_bit_identical(tmp_path, reference):
    cfg, out = killed_run(tmp_path, "hn", "sample:4")
    # Step 4 was saved before its sampling began; the images were generated but never written.
    assert list_states(out)[-1].name == "step-00000004" and not list(out.glob("sample/step00000004*"))
    resume_and_compare(reference, "hn", cfg, out)
    assert (out / "sample" / f"final_step{STEPS:08d}_00.png").is_file()
