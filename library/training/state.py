"""Resume states: everything needed to continue a run exactly where it stopped.

A state is a folder `<output_dir>/state/step-<N>/` with
- `trainable.safetensors`: the trained tensors in fp32 (the method decides which),
- `training_state.pt`: optimizer, LR scheduler, grad scaler, EMA, counters, data position and every RNG state, saved with
  plain tensors and Python values only so that it is read back with `torch.load(weights_only=True)`,
- `done`: written last; a folder without it is incomplete (killed mid-save) and is never resumed from.
The folder is written under a temporary name and renamed, so a kill during a save leaves the previous state intact.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.fileio import atomic_path, remove_atomic
from library.training import faults

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Counters:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    nan_steps: int = 0  # non-finite losses skipped in total
    extra: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """Global RNG states (dropout, peft's rank dropout, ...); batch noise is seeded per batch, see loop.py."""
    state = {"torch": torch.get_rng_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def state_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "state"


def save_state(
    output_dir: str | Path,
    counters: Counters,
    trainable: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a complete state folder for `counters.step` and prune old ones (keep_last = 0 keeps all)."""
    root = state_root(output_dir)
    final = root / f"step-{counters.step:08d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        faults.kill_point("save", counters.step)
        payload = {"counters": {"step": counters.step, "epoch": counters.epoch, "nan_steps": counters.nan_steps,
                                "extra": counters.extra}, **training_state}
        torch.save(payload, tmp / "training_state.pt")
        (tmp / "done").write_text("complete\n")
    if keep_last > 0:
        for old in list_states(output_dir)[:-keep_last]:
            remove_atomic(old)
    return final


def list_states(output_dir: str | Path) -> list[Path]:
    """Complete state folders, oldest first."""
    root = state_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "done").exists()]
    return [p for _, p in sorted(found)]


def find_resume_dir(resume: str, output_dir: str | Path) -> Path | None:
    """`resume` = "" (fresh run), "auto" (newest complete state, or fresh if none) or a state folder."""
    if not resume:
        return None
    if resume == "auto":
        states = list_states(output_dir)
        return states[-1] if states else None
    path = Path(resume)
    if not (path / "done").exists():
        raise UserError(f"train.resume: {path} is not a complete resume state (expected a folder like "
                        f"<output_dir>/state/step-00000100 containing 'done'); use resume = 'auto' to pick the newest")
    return path


def load_state(path: Path) -> tuple[Counters, dict[str, torch.Tensor], dict[str, Any]]:
    from library.models.safe_load import open_tensor_file, read_pickle_dict

    # The checked readers: a damaged or hostile state file is a ModelFileError naming it, never a traceback.
    f = open_tensor_file(path / "trainable.safetensors")
    trainable = {k: f[k] for k in f}
    payload = read_pickle_dict(path / "training_state.pt", "resume state")
    c = payload.pop("counters")
    return Counters(c["step"], c["epoch"], c["nan_steps"], c.get("extra", {})), trainable, payload


def check_made_with(saved: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """A resume state continues a run only with what it was made with: the trained tensors (names and shapes: the
    method and its [network] / [embedding] / [hypernetwork] settings), the optimizer type (its state has that
    optimizer's buffers) and the learning rates (the restored optimizer and schedule would keep the old ones, while
    the new config and the result's metadata said otherwise). One error naming what differs, never a traceback."""
    if saved is None:  # states written before this check: what could be compared is not recorded
        return
    trained_then, trained_now = saved.get("trained", {}), current.get("trained", {})
    if trained_then != trained_now:
        names = sorted(set(trained_then) ^ set(trained_now))
        if names:
            what = f"tensors differ (e.g. {names[0]})"
        else:
            k = next(k for k in sorted(trained_now) if trained_then[k] != trained_now[k])
            what = f"{k} is {trained_then[k]} in the state and {trained_now[k]} now"
        raise UserError(f"train.resume: {path} was made with other settings of what trains ({what}): a changed "
                        "rank (network.network_dim / conv_dim), target, method or token count cannot continue "
                        "that state; restore those settings, or start a fresh run (train.resume = '')")
    for key in ("optimizer.optimizer_type", "optimizer.learning_rate", "optimizer.unet_lr",
                "optimizer.text_encoder_lr"):
        if key in saved and saved[key] != current.get(key):
            raise UserError(f"train.resume: {path} was made with {key} = {saved[key]!r}, this run sets "
                            f"{current.get(key)!r}: a resumed run continues with the state's optimizer and schedule, "
                            f"so set {key} back to {saved[key]!r} (or start a fresh run with train.resume = '')")
