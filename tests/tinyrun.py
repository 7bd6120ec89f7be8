"""Tiny training runs for end-to-end tests: one TOML writer for every script, ways to run a script (in this process or
as users do, in a subprocess), and a check that every file a run left in its output folder is complete.

    path = write_config(tmp_path / "run.toml", tmp_path / "out", "lora", train={"max_train_steps": 4})
    result = train_in_process("lora", path)                 # library.training.run.run_training
    code = main_in_process("lora", path, "--train.seed=3")   # train_lora.main([...]): its exit code
    code = main_in_fork("lora", path, env={...})            # the same in a forked process (to be killed)
    proc = run_script("lora", path, "--save.save_state=false")  # python train_lora.py --config ...
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Script:
    file: str
    module: str  # the script's module (main)
    methods: str  # its library.methods module (CONFIG_CLASS, make_method)
    method: str  # the Method class in `methods`
    tables: dict = field(default_factory=dict)  # what the method needs besides BASE


SCRIPTS = {
    "native": Script("train_native.py", "train_native", "library.methods.native", "NativeFineTune"),
    "lora": Script("train_lora.py", "train_lora", "library.methods.lora", "LoraTraining"),
    "ti": Script("train_textual_inversion.py", "train_textual_inversion", "library.methods.textual_inversion",
                 "TextualInversion", {"embedding": {"token_string": "<thing>", "init_word": "shape"}}),
    "hn": Script("train_hypernetwork.py", "train_hypernetwork", "library.methods.hypernetwork",
                 "HypernetworkTraining"),
}

# A run of a few 40 ms steps on the tiny SD1 model (library/models/tiny.py) and the demo shapes, no worker processes.
BASE = {
    "model": {"pretrained_model_name_or_path": "tiny:sd15"},
    "data": {"train_data_dir": "demo:shapes", "resolution": 64, "batch_size": 2, "min_bucket_reso": 64,
             "max_bucket_reso": 128, "num_workers": 0},
    "train": {"max_train_steps": 3, "seed": 5},
    "optimizer": {"learning_rate": 1e-3},
    "save": {"output_name": "run", "save_precision": "fp32"},
    "log": {"log_with": "none", "progress_bar": False},
}


def merge(into: dict, tables: dict) -> dict:
    """`tables` merged into `into` key by key (nested tables too); returns `into`."""
    for key, value in tables.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def config(out_dir: Path, method: str = "lora", **tables: dict) -> dict:
    """BASE + what `method` needs + `tables` (merged key by key, nested tables too), writing into `out_dir`."""
    data = merge(copy.deepcopy(BASE), SCRIPTS[method].tables)
    data["save"]["output_dir"] = str(out_dir)
    return merge(data, tables)


def write_config(path: Path, out_dir: Path, method: str = "lora", **tables: dict) -> Path:
    path.write_text(tomli_w.dumps(config(out_dir, method, **tables)))
    return path


def script_module(method: str):
    return importlib.import_module(SCRIPTS[method].module)


def methods_module(method: str):
    return importlib.import_module(SCRIPTS[method].methods)


def method_class(method: str) -> type:
    return getattr(methods_module(method), SCRIPTS[method].method)


def make_method(method: str, cfg, method_cls: type | None = None):
    """The script's method for `cfg` (its module's make_method); `method_cls`: a subclass of that method's class
    (adding no state of its own) to train with instead, e.g. a test's fault."""
    made = methods_module(method).make_method(cfg)
    if method_cls is not None:
        assert issubclass(method_cls, type(made)), (method_cls, type(made))
        made.__class__ = method_cls
    return made


def train_in_process(method: str, cfg_path: Path, method_cls: type | None = None, **tables: dict):
    """Load `cfg_path` (with `tables` on top, e.g. train={"resume": "auto"}) and train here; the TrainResult.

    method_cls: a subclass of the method's class to train with instead (a test's fault).
    """
    from library.config.core import load_config
    from library.training.run import run_training

    data = merge(tomllib.loads(cfg_path.read_text()), tables)
    cfg = load_config(methods_module(method).CONFIG_CLASS, data, source=str(cfg_path))
    return run_training(cfg, make_method(method, cfg, method_cls), script=SCRIPTS[method].file)


def main_in_process(method: str, cfg_path: Path, *args: str) -> int:
    """The script's main() (command line, error guard and all) in this process; its exit code."""
    return script_module(method).main(["--config", str(cfg_path), *args])


def main_in_fork(method: str, cfg_path: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: float = 900) -> int:
    """The script's main() in a forked copy of this process, with `env` added to its environment; its exit code
    (negative: the signal that ended it). As a subprocess, minus the seconds of importing torch and diffusers again.
    """
    import multiprocessing

    proc = multiprocessing.get_context("fork").Process(target=_main_with_env, args=(method, cfg_path, args, env or {}))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise AssertionError(f"{SCRIPTS[method].file} did not finish in {timeout} s")
    return proc.exitcode


def _main_with_env(method: str, cfg_path: Path, args: tuple, env: dict[str, str]) -> None:
    os.environ.update(env)
    sys.exit(main_in_process(method, cfg_path, *args))


def script_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def command(method: str, cfg_path: Path, *args: str) -> list[str]:
    return [sys.executable, SCRIPTS[method].file, "--config", str(cfg_path), *args]


def run_script(method: str, cfg_path: Path, *args: str, env: dict | None = None, timeout: float = 900,
               **popen) -> subprocess.CompletedProcess:
    """Run the method's script as a user does; stdout and stderr captured as text."""
    return subprocess.run(command(method, cfg_path, *args), cwd=REPO, env=env or script_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def final_trainable(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    from library.training.state import list_states

    return load_file(str(list_states(out_dir)[-1] / "trainable.safetensors"))


def assert_outputs_intact(out_dir: Path) -> list[Path]:
    """Every file under `out_dir` reads back completely; no temporaries, no state folder without `done`.

    Returns the files checked. safetensors: header and every tensor; .pt / .pt.optim / training_state.pt:
    torch.load(weights_only=True); PNG: decoded; TOML: parsed.
    """
    import torch
    from PIL import Image
    from safetensors import safe_open

    checked = []
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir)
        assert not any(part.startswith(".") for part in rel.parts), f"left-over temporary: {rel}"
        if p.is_dir():
            if p.parent.name == "state":
                assert (p / "done").is_file(), f"incomplete state folder: {rel}"
            continue
        assert p.stat().st_size > 0, f"empty file: {rel}"
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        elif p.name.endswith((".pt", ".pt.optim")):
            torch.load(p, map_location="cpu", weights_only=True)
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".toml":
            tomllib.loads(p.read_text())
        elif p.name == "done":
            assert p.read_text() == "complete\n"
        else:
            raise AssertionError(f"unexpected file in the output folder (add a check for it): {rel}")
        checked.append(p)
    return checked
