"""Saving during training: the result file and the resume state, written atomically, never with broken weights.

Split from library/training/loop.py (which calls `save`) to keep the loop module about the loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Mapping

import torch

from library.errors import UserError
from library.fileio import OutputWriteError, remove_atomic
from library.precision import DTYPES
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
        over = overflowing_tensors(trainable, s.save.save_precision)
        if over:
            # The fp32 weights are fine, only the cast to the saving precision is not (fp16 tops out at 65504): write
            # the resume state, which is fp32, so the run continues from here in another precision; no result.
            if s.save.save_state and steps.resumable:
                _save_state(s, out_dir, counters, trainable, optimizer, lr_scheduler, ema, data)
            raise TrainingStopped(overflow_message(over, s.save.save_precision, counters.step,
                                                   _last_result(out_dir, s.save.output_name),
                                                   st.list_states(out_dir) if steps.resumable else []))
        stem = out_dir / (s.save.output_name if final else f"{s.save.output_name}-step{counters.step:08d}")
        with ema.applied() if ema is not None else nullcontext():
            path = method.save_result(model, stem, s.save_context(counters))
        method.save_optimizer_sidecar(path, optimizer)
        if not final and s.save.save_last_n > 0:
            prune_results(out_dir, s.save.output_name, path.suffix, s.save.save_last_n)
    if (s.save.save_state or not with_result) and steps.resumable:
        _save_state(s, out_dir, counters, trainable, optimizer, lr_scheduler, ema, data)
    return path


def _save_state(s, out_dir, counters, trainable, optimizer, lr_scheduler, ema, data) -> None:
    st.save_state(out_dir, counters, trainable, {
        "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
        "ema": None if ema is None else ema.state_dict(), "data": data.state_dict(),
        "method": s.method.extra_state(), "made_with": s.made_with(), "rng": st.rng_state()},
        keep_last=s.save.save_last_n)


def overflowing_tensors(tensors: Mapping[str, torch.Tensor], precision: str) -> dict[str, float]:
    """name -> largest |value| of each tensor that is finite in its own dtype but not once cast to `precision`.

    The check runs on the cast tensor itself (finfo bounds miss the rounding at the edge: 65519 rounds to 65504
    in fp16, 65520 to inf), so what is reported is exactly what the file would hold.
    """
    dtype = DTYPES[precision]
    out: dict[str, float] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.dtype != dtype and bool(torch.isfinite(t).all()) \
                and not bool(torch.isfinite(t.detach().to(dtype)).all()):
            out[name] = float(t.detach().abs().max())
    return out


def overflow_message(over: Mapping[str, float], precision: str, step: int, last_result: Path | None,
                     states: list[Path]) -> str:
    worst = sorted(over.items(), key=lambda kv: -kv[1])
    named = ", ".join(f"{k} (max |x| = {v:.3g})" for k, v in worst[:3]) + (f" and {len(worst) - 3} more"
                                                                        if len(worst) > 3 else "")
    limit = torch.finfo(DTYPES[precision]).max
    kept = f"the last good result {last_result} is kept" if last_result else "no earlier result exists"
    resume = (f"; the weights themselves are fine and were saved in the resume state {states[-1]}: set "
              "save.save_precision = 'bf16' (or 'fp32') and resume with train.resume = 'auto'" if states else
              "; set save.save_precision = 'bf16' (or 'fp32') and train again")
    return (f"at step {step} the trained weights do not fit in {precision} (largest value {limit:.6g}): {len(worst)} "
            f"tensors would be saved as inf: {named}. Nothing was written for this step, {kept}{resume}")


def _last_result(out_dir: Path, name: str) -> Path | None:
    """The newest result file (`<name>.safetensors`, `<name>-step<N>.pt`, ...) or diffusers folder in `out_dir`."""
    def is_result(p: Path) -> bool:
        stem = p.name if p.is_dir() else p.stem
        return (p.is_dir() or p.suffix in (".safetensors", ".pt", ".ckpt")) and \
            (stem == name or (stem.startswith(f"{name}-step") and stem[len(name) + 5:].isdigit()))

    results = [p for p in out_dir.glob(f"{name}*") if is_result(p)]
    return max(results, key=lambda p: p.stat().st_mtime_ns) if results else None


def prune_results(out_dir: Path, name: str, suffix: str, keep: int) -> None:
    old = sorted(out_dir.glob(f"{name}-step*{suffix}"))
    for p in old[:-keep]:
        for sidecar in out_dir.glob(f"{p.name}.*"):  # e.g. A1111's `.pt.optim`
            sidecar.unlink()
        remove_atomic(p)
