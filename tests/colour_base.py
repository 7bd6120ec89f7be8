"""A tiny SD1 model that knows colour words, for the acceptance tests that need a base which is not random.

Textual inversion and DreamBooth are taught on top of a model that already draws the class: on the random tiny model
nothing about the text shows in the samples. `colour_base()` is the tiny model fine-tuned (train_native.py's method)
for 300 steps on the demo shapes, whose captions name the colour -- the same run test_train_native's acceptance
test makes and checks. It is built once per test cache (keyed by its config and the tiny models' version) and
shared by the tests and by pytest-xdist workers, under a file lock, so the suite pays for it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

BASE_RUN = {
    "model": {"pretrained_model_name_or_path": "tiny:sd15"},
    "data": {"train_data_dir": "demo:shapes", "resolution": 64, "batch_size": 4, "min_bucket_reso": 64,
             "max_bucket_reso": 128, "num_workers": 0, "cache_latents": True},
    "train": {"max_train_steps": 300, "seed": 1},
    "optimizer": {"learning_rate": 1e-3},
    "save": {"output_name": "base", "save_precision": "fp32", "save_state": False},
    "log": {"progress_bar": False},
}


def colour_base() -> dict:
    """`[model]` table values loading the colour-trained tiny model (its single file + the tiny config folder)."""
    from library.config.core import load_config
    from library.config.run import RunConfig
    from library.models.tiny import TINY_VERSION, resolve_model_ref
    from library.paths import cache_dir
    from library.training.run import run_training
    from library.methods.native import make_method

    key = hashlib.sha256(json.dumps([TINY_VERSION, BASE_RUN], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "test-bases"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"colour-{key}.safetensors"
    with open(folder / f"colour-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker building it: wait for its file instead of training twice
        if not final.is_file():
            build = folder / f".build-{key}-{os.getpid()}"
            shutil.rmtree(build, ignore_errors=True)
            data = json.loads(json.dumps(BASE_RUN))
            data["save"]["output_dir"] = str(build)
            cfg = load_config(RunConfig, data, source="tests/colour_base.py")
            result = run_training(cfg, make_method(cfg), script="train_native.py")
            os.replace(result.result_path, final)
            shutil.rmtree(build, ignore_errors=True)
    return {"pretrained_model_name_or_path": str(final), "config_dir": str(resolve_model_ref("tiny:sd15"))}
