"""`--dry-run`: validate everything and estimate memory, time and cost, reading no weights and needing no GPU.

The config is already validated when this runs. It then
1. finds the model family and its diffusers configs (folder configs, or a single file's header; no tensors read),
2. indexes the dataset (counts, bucket report, skipped files) and runs the quick quality check on each image folder,
3. counts steps per epoch and in total,
4. runs one training step of the configured method on fake tensors (library/estimate) and prints the report: peak
   memory with its breakdown, FLOPs, time and cost per GPU, and what to change where it does not fit.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from library.errors import ModelFileError

# Method.name -> the estimator's method kind.
ESTIMATE_KIND = {"native": "full", "lora": "lora", "textual_inversion": "ti", "hypernetwork": "hn"}


def peek_model(model_cfg) -> tuple[str, Path | None]:
    """(family, diffusers config folder) of the configured base model, from configs and headers only."""
    from library.models.configs import bundled_config_for
    from library.models.load import detect_family
    from library.models.tiny import parse_tiny_ref, resolve_model_ref

    ref = model_cfg.pretrained_model_name_or_path.strip()
    forced = model_cfg.resolved_family()
    if ref.startswith("tiny:"):
        return forced or parse_tiny_ref(ref).family, resolve_model_ref(ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
        return forced or detect_family(index, unet), path
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from library.models.safe_load import read_safetensors_header
        from library.models.single_file import detect_family as family_of_keys

        shapes, _ = read_safetensors_header(path)
        family = forced or family_of_keys(shapes)
        if family is None:
            raise ModelFileError(f"{path}: not a Stable Diffusion single file (no known text-encoder keys)")
    elif path.is_file() and forced:
        family = forced  # a .ckpt is a pickle: reading its keys means loading it, which a dry run avoids
    else:
        raise ModelFileError(f"model.pretrained_model_name_or_path: {ref} does not exist or is not a folder / "
                             ".safetensors file (for a .ckpt, set model.family for --dry-run)")
    config_dir = Path(model_cfg.config_dir) if model_cfg.config_dir else None
    pred = model_cfg.resolved_prediction_type() or "epsilon"
    return family, config_dir or bundled_config_for(family, pred)


def quality_summary(image_dirs: list[str], caption_extension: str) -> str:
    from library.data.doctor import quick_check

    kinds: Counter = Counter()
    blocking = 0
    for d in image_dirs:
        report = quick_check(d, caption_extension)
        kinds.update(f.kind for f in report.findings)
        blocking += len(report.blocking)
    if not kinds:
        return "quality: no problems found by the quick check"
    listed = ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
    return f"quality (quick check; run check_dataset.py for the full report): {listed}" + (
        f" — {blocking} blocking" if blocking else "")


def dry_run(cfg: Any, method: Any, *, script: str) -> int:
    from library.config.core import config_hash
    from library.data.loader import build_train_data
    from library.estimate.report import estimate_run, spec_from_sections
    from library.models.families import FAMILIES
    from library.training.loop import total_steps

    print(f"{script}: config is valid (hash {config_hash(cfg)})")
    family, config_dir = peek_model(cfg.model)
    print(f"model: {cfg.model.pretrained_model_name_or_path} -> {FAMILIES[family].label}; weights not read")
    native = FAMILIES[family].resolution
    data = build_train_data(cfg.data, default_resolution=native, seed=cfg.train.seed, family=family)
    dirs = sorted({s.image_dir for s in data.index.subsets if s.image_dir})
    print(f"data: {data.num_images} images in {len(dirs)} folder(s), {data.steps_per_epoch} batches per epoch")
    print(quality_summary(dirs, cfg.data.caption_extension))
    steps = total_steps(cfg.train, data.steps_per_epoch)
    per_epoch = math.ceil(data.steps_per_epoch / cfg.train.gradient_accumulation_steps)
    print(f"steps: {per_epoch} optimizer steps per epoch, {steps} in total (~{steps / per_epoch:.1f} epochs)")

    kind = ESTIMATE_KIND.get(method.name, getattr(method, "estimate_kind", None))
    if kind is None:
        print(f"no memory estimate for the {method.name!r} method", file=sys.stderr)
        return 0
    extra = {}
    if hasattr(cfg, "embedding"):
        extra["ti_vectors"] = cfg.embedding.num_vectors_per_token
    if hasattr(cfg, "hypernetwork"):
        extra["hn_layer_structure"] = tuple(cfg.hypernetwork.layer_structure)
    spec = spec_from_sections(kind, family, config_dir, cfg.train, cfg.optimizer, cfg.data,
                              network=getattr(cfg, "network", None), **extra)
    e = cfg.estimate
    print(estimate_run(spec, steps, e.price_per_hour, e.utilisation, e.gpus or None, e.context_gib, e.fragmentation))
    return 0
