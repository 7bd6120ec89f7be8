"""Faults inside a running script, in this process (issue 11, items 2, 6 and the worker half of 7).

Each test runs a script's main() (command line, error guard and all) on the tiny model, so it sees what a user sees:
the exit code and the last line on stderr. Faults are real: the kernel refuses a write past RLIMIT_FSIZE (EFBIG, as a
full disk refuses with ENOSPC), a data loader worker is SIGKILLed, NaN losses come from SDTK_TEST_NAN_AT
(library/training/faults.py), overflowing weights from a method that writes inf into them.
"""

import copy
import os
import re
import resource
import signal
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from library.fileio import OutputWriteError, atomic_path, recover_interrupted_writes, remove_atomic
from library.training import faults
from library.training.state import list_states, load_state
from tests.tinyrun import (assert_outputs_intact, final_trainable, main_in_process, merge, method_class,
                           train_in_process, write_config)

STEPS = 6


def lora(**tables) -> dict:
    return merge({"train": {"max_train_steps": STEPS}, "save": {"save_every_n_steps": 2, "save_last_n": 0}},
                 copy.deepcopy(tables))


def last_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


class FileSizeLimit:
    """RLIMIT_FSIZE on this process, SIGXFSZ ignored, so a write past `limit` bytes fails with EFBIG; undone on exit."""

    def __init__(self, limit: int):
        self.limit = limit

    def __enter__(self):
        self.old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old_limit[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old_limit)
        signal.signal(signal.SIGXFSZ, self.old_handler)


@pytest.mark.parametrize("writer", ["python", "torch.save", "safetensors"])
def test_atomic_write_past_the_limit_is_one_clear_error_and_keeps_the_old_file(tmp_path, writer):
    from safetensors.torch import save_file

    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    big = torch.zeros(64 * 1024)
    write = {"python": lambda p: p.write_bytes(bytes(300_000)), "torch.save": lambda p: torch.save({"w": big}, p),
             "safetensors": lambda p: save_file({"w": big}, str(p))}[writer]
    with FileSizeLimit(100_000), pytest.raises(OutputWriteError) as err:
        with atomic_path(target) as tmp:
            write(tmp)
    assert str(err.value).startswith(f"cannot write {target}: file too large (EFBIG; raise the limit")
    assert err.value.exit_code == 4
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.bin"]  # the temporary is gone


def test_an_error_that_is_not_the_disk_stays_itself(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("a bug in a writer")
    assert os.listdir(tmp_path) == []


def dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_writer_are_removed_or_restored(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / "state").mkdir()
    (tmp_path / f".run.safetensors.tmp-{dead}").write_bytes(b"half")  # killed while writing a file
    (tmp_path / "state" / f".step-00000004.tmp-{dead}").mkdir()  # ... a folder
    (tmp_path / "state" / f".step-00000004.tmp-{dead}" / "trainable.safetensors").write_bytes(b"x")
    (tmp_path / f".diffusers.old-{dead}").mkdir()  # killed between the two renames of a folder replacement
    (tmp_path / f".diffusers.old-{dead}" / "model_index.json").write_text("{}")
    (tmp_path / f".other.old-{dead}").mkdir()  # ... after the second one: the new folder is in place
    (tmp_path / "other").mkdir()
    (tmp_path / f".mine.tmp-{alive}").write_bytes(b"being written")  # a live writer's: untouched
    (tmp_path / ".hidden-user-file").write_bytes(b"not ours")

    touched = recover_interrupted_writes(tmp_path)
    assert len(touched) == 4
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        [".hidden-user-file", f".mine.tmp-{alive}", "diffusers", "model_index.json", "other", "state"])
    assert (tmp_path / "diffusers" / "model_index.json").read_text() == "{}"
    assert recover_interrupted_writes(tmp_path) == []


def test_remove_atomic_leaves_nothing_under_the_name(tmp_path):
    folder = tmp_path / "step-00000002"
    folder.mkdir()
    (folder / "done").write_text("complete\n")
    remove_atomic(folder)
    assert os.listdir(tmp_path) == []


def test_disk_full_during_a_save_stops_with_one_line_keeps_the_last_state_and_resumes_exactly(tmp_path, capsys,
                                                                                           monkeypatch):
    ref_cfg = write_config(tmp_path / "ref.toml", tmp_path / "ref", "lora", **lora())
    train_in_process("lora", ref_cfg)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", out, "lora", **lora())
    state4 = out / "state" / "step-00000004"
    sizes = {}

    with ExitStack() as stack:
        def fill_disk_at(point: str, step: int) -> None:
            # After the step-4 save: from now on no file may grow past half way between the state's two files, so
            # the step-6 result and trainable.safetensors still fit and training_state.pt (torch.save) does not.
            if (point, step) == ("step", 5):
                small = (state4 / "trainable.safetensors").stat().st_size
                big = (state4 / "training_state.pt").stat().st_size
                sizes.update(before={p.name: p.read_bytes() for p in state4.iterdir()}, limit=(small + big) // 2)
                stack.enter_context(FileSizeLimit(sizes["limit"]))

        monkeypatch.setattr(faults, "kill_point", fill_disk_at)
        code = main_in_process("lora", cfg)
    assert code == 4
    assert (out / "run.safetensors").stat().st_size < sizes["limit"]  # the final result fitted
    state6 = out / "state" / "step-00000006"
    assert re.fullmatch(rf"error: cannot write {re.escape(str(state6))}: file too large \(EFBIG; .*\); nothing "
                        rf"older was replaced; stopped at step 6, the last complete resume state is "
                        rf"{re.escape(str(state4))}: resume from it with train.resume = 'auto' once the cause is "
                        "fixed", last_line(capsys))
    assert [p.name for p in list_states(out)] == ["step-00000002", "step-00000004"]
    assert {p.name: p.read_bytes() for p in state4.iterdir()} == sizes["before"]
    assert_outputs_intact(out)  # no temporary left behind, every file loads

    monkeypatch.undo()
    resumed = train_in_process("lora", cfg, train={"resume": "auto"})
    assert resumed.steps == STEPS
    a, b = final_trainable(tmp_path / "ref"), final_trainable(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_losses_are_skipped_and_counted_then_a_streak_stops_with_the_last_good_state(tmp_path, capsys,
                                                                                        monkeypatch):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", out, "lora", **lora(train={"max_consecutive_nan_steps": 3}))
    # Batch 3 alone is NaN (skipped, training goes on); batches 7, 8, 9 are three in a row (stop).
    monkeypatch.setenv(faults.NAN_AT, "3,7,8,9")
    assert main_in_process("lora", cfg) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "step 3: non-finite loss, step skipped (1 in a row, 1 in total)" in err
    assert "step 6: non-finite loss, step skipped (3 in a row, 4 in total)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: 3 non-finite steps in a row at step 6; stopped, and the last good state is saved "
                           f"under {out / 'state'} (resume with train.resume = 'auto'). Usual fixes: a lower "
                           "optimizer.learning_rate, train.mixed_precision = 'bf16' instead of 'fp16', "
                           "optimizer.max_grad_norm = 1.0"), last
    assert "check_dataset.py" in last
    # The stop saved step 5 (the last good weights), counting the 4 skipped steps and the 9 batches consumed.
    assert [p.name for p in list_states(out)] == ["step-00000002", "step-00000004", "step-00000005"]
    counters, trainable, saved = load_state(out / "state" / "step-00000005")
    assert (counters.step, counters.nan_steps) == (5, 4)
    assert saved["data"]["epoch"] * saved["data"]["steps_per_epoch"] + saved["data"]["position"] == 9
    assert all(torch.isfinite(v).all() for v in trainable.values())
    assert_outputs_intact(out)

    monkeypatch.delenv(faults.NAN_AT)
    resumed = train_in_process("lora", cfg, train={"resume": "auto"})
    assert resumed.steps == STEPS and resumed.nan_steps == 4
    assert load_state(list_states(out)[-1])[0].nan_steps == 4


class Overflows:
    """A method whose update after optimizer step `at` overflows its weights (inf), as a far too high lr does."""

    def __new__(cls, at: int):
        base = method_class("lora")

        class Exploding(base):
            def after_optimizer_step(self, model, step):
                if step + 1 == at:
                    with torch.no_grad():
                        next(iter(self.network.parameters())).fill_(float("inf"))
                return super().after_optimizer_step(model, step)

        return Exploding


@pytest.mark.parametrize("at, why", [
    (3, "2 non-finite steps in a row at step 4; stopped: the trained weights are no longer finite at step 3"),
    (4, "the trained weights are no longer finite at step 4"),
])
def test_overflowing_weights_are_never_saved(tmp_path, at, why):
    """Weights that overflowed stop the run at the next save or NaN streak, and are never written anywhere."""
    from library.training.loop import TrainingStopped

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", out, "lora", **lora(train={"max_consecutive_nan_steps": 2}))
    with pytest.raises(TrainingStopped) as err:
        train_in_process("lora", cfg, method_cls=Overflows(at))
    msg = str(err.value)
    assert why in msg and f"the last good state is {out / 'state' / 'step-00000002'}" in msg, msg
    assert [p.name for p in list_states(out)] == ["step-00000002"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["run-step00000002.safetensors"]
    assert_outputs_intact(out)


def kill_worker_after(marker: Path, how: str):
    """SampleDataset.__getitem__ that, in a worker process once `marker` exists, dies (SIGKILL) or raises DataError."""
    from library.data.loader import SampleDataset
    from library.errors import DataError

    original = SampleDataset.__getitem__

    def getitem(self, key):
        if torch.utils.data.get_worker_info() is not None and marker.exists():
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise DataError("/data/cat.png: the file changed since it was indexed")
        return original(self, key)

    return getitem


@pytest.mark.parametrize("how", ["killed", "raises"])
def test_a_dataloader_worker_that_dies_or_fails_stops_with_one_line_and_the_last_state_intact(tmp_path, capsys,
                                                                                            monkeypatch, how):
    from library.data.loader import SampleDataset

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.toml", out, "lora", data={"num_workers": 2},
                       train={"max_train_steps": 12}, save={"save_every_n_steps": 2})
    monkeypatch.setattr(SampleDataset, "__getitem__", kill_worker_after(out / "state" / "step-00000002" / "done", how))
    assert main_in_process("lora", cfg) == 2
    line = last_line(capsys)
    if how == "killed":
        assert re.fullmatch(r"error: a data loader worker process died \(DataLoader worker \(pid.*\). A killed worker "
                            r"is most often out of memory: lower data.num_workers .* The last complete resume state "
                            rf"under {re.escape(str(out / 'state'))} is intact \(resume with train.resume = 'auto'\)",
                            line), line
    else:
        assert line == "error: /data/cat.png: the file changed since it was indexed"
    states = list_states(out)
    assert states and states[-1].name < "step-00000012"
    assert_outputs_intact(out)


@pytest.mark.parametrize("max_grad_norm, stepped", [(1.0, False), (0.0, True)])
def test_overflowing_gradients_with_a_finite_loss_skip_the_step_when_clipping(max_grad_norm, stepped):
    """With clipping on, the gradient norm it computes anyway drops a step whose gradients overflowed; without it,
    such weights are caught at the next save (test_overflowing_weights_are_never_saved)."""
    from accelerate import Accelerator

    from library.training.setup import ManualSteps

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    steps = ManualSteps(Accelerator(cpu=True), optimizer, None, [weight], 1, max_grad_norm)
    weight.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert steps.step(all_finite=True) is stepped
    assert weight.grad is None
    assert torch.equal(weight.detach(), torch.ones(3)) is not stepped
