"""Saving during training: the result file and the resume state, written atomically, never with broken weights.

Split from library/training/loop.py (which calls `save`) to keep the loop module about the loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import OutputWriteError, remove_atomic
from library.training import state as st


class TrainingStopped(UserError):
    """Training stopped on purpose (e.g. repeated non-finite losses); the last good state was saved."""

    exit_code = 3


USUAL_FIXES = ("Usual fixes: a lower optimizer.learning_rate, train.mixed_precision = 'bf16' instead of 'fp16', "
               "optimizer.max_grad_norm = 1.0, a VAE that does not overflow in fp16, and a look at the data "
               "(check_dataset.py).")


def save(s, method, model, data, optimizer, lr_scheduler, ema, counters, accelerator, steps, *,
         with_result: bool, final: bool = False) -> Path | None:
    accelerator.wait_for_everyone()
    with steps.full_weights():  # ZeRO-3: every rank takes part in gathering the partitioned weights
        path = None
        if accelerator.is_main_process:
            try:
                path = save_main(s, method, model, data, optimizer, lr_scheduler, ema, counters, steps,
                                 with_result=with_result, final=final)
            except OutputWriteError as e:
                last = st.list_states(s.save.output_dir)
                where = (f"the last complete resume state is {last[-1]}: resume from it with train.resume = 'auto' "
                         "once the cause is fixed" if last else "no resume state was saved yet")
                raise OutputWriteError(f"{e}; stopped at step {counters.step}, {where}") from e
    accelerator.wait_for_everyone()
    return path


def save_main(s, method, model, data, optimizer, lr_scheduler, ema, counters, steps, *, with_result: bool,
              final: bool) -> Path | None:
    """The main process writes the result and (unless DeepSpeed) the resume state."""
    path = None
    out_dir = Path(s.save.output_dir)
    trainable = method.trainable_state(model)
    bad = [k for k, v in trainable.items() if not bool(torch.isfinite(v).all())]
    if bad:
        # An update overflowed the weights themselves (the loss guard cannot see that): saving them would put
        # garbage in a result and a state that fails again at once, so the last good state stays the newest.
        last = st.list_states(out_dir)
        raise TrainingStopped(
            f"the trained weights are no longer finite at step {counters.step} ({len(bad)} tensors, e.g. {bad[0]}), "
            "so nothing was saved; " + (f"the last good state is {last[-1]} (resume with train.resume = 'auto')"
                                        if last else "no earlier state exists") + f". {USUAL_FIXES}")
    if with_result:
        stem = out_dir / (s.save.output_name if final else f"{s.save.output_name}-step{counters.step:08d}")
        meta = {**s.metadata, "sdtk_step": str(counters.step), "sdtk_epoch": str(counters.epoch)}
        with ema.applied() if ema is not None else nullcontext():
            path = method.save_result(model, stem, meta)
        method.save_optimizer_sidecar(path, optimizer)
        if not final and s.save.save_last_n > 0:
            prune_results(out_dir, s.save.output_name, path.suffix, s.save.save_last_n)
    if (s.save.save_state or not with_result) and steps.resumable:
        st.save_state(out_dir, counters, trainable, {
            "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
            "ema": None if ema is None else ema.state_dict(), "data": data.state_dict(),
            "rng": st.rng_state()}, keep_last=s.save.save_last_n)
    return path


def prune_results(out_dir: Path, name: str, suffix: str, keep: int) -> None:
    old = sorted(out_dir.glob(f"{name}-step*{suffix}"))
    for p in old[:-keep]:
        for sidecar in out_dir.glob(f"{p.name}.*"):  # e.g. A1111's `.pt.optim`
            sidecar.unlink()
        remove_atomic(p)
