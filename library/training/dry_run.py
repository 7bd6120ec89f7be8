"""`--dry-run`: validate everything and estimate memory, time and cost, reading no weights and needing no GPU.

The config is already validated when this runs. It then
1. makes the run plan (library/training/plan.py): every check the real run makes before it loads the model, the
   model family and its diffusers configs (folder configs, or a single file's header; no tensors read),
2. indexes the dataset (counts, bucket report, skipped files) and runs the quick quality check on each image folder,
3. counts steps per epoch and in total,
4. runs one training step of the configured method on fake tensors (library/estimate) and prints the report: peak
   memory with its breakdown, FLOPs, time and cost per GPU, and what to change where it does not fit.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any


def quality_summary(subsets, caption_extension: str) -> str:
    """The quick check of every image folder and local dataset the run trains on (library/data/doctor_datasets.py)."""
    from library.data.doctor_datasets import quick_check_subsets

    kinds: Counter = Counter()
    blocking = 0
    for report in quick_check_subsets(subsets, caption_extension):
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
    from library.training.plan import make_plan

    plan = make_plan(cfg, method, script=script, dry_run=True)  # every check the real run makes before loading
    print(f"{script}: config is valid (hash {config_hash(cfg)})")
    print(f"model: {cfg.model.pretrained_model_name_or_path} -> {FAMILIES[plan.family].label}; weights not read")
    data = build_train_data(plan.data, default_resolution=plan.native_resolution, seed=cfg.train.seed,
                            family=plan.family)
    subsets = data.index.subsets
    dirs = {s.image_dir for s in subsets if s.image_dir and not (s.dataset_path or s.dataset_name)}
    sets = {s.dataset_path or s.dataset_name for s in subsets if s.dataset_path or s.dataset_name}
    where = f"{len(dirs)} folder(s)" + (f" and {len(sets)} dataset(s)" if sets else "")
    print(f"data: {data.num_images} images in {where}, {data.steps_per_epoch} batches per epoch")
    print(quality_summary(subsets, plan.data.caption_extension))
    steps = total_steps(cfg.train, data.steps_per_epoch)
    per_epoch = math.ceil(data.steps_per_epoch / cfg.train.gradient_accumulation_steps)
    print(f"steps: {per_epoch} optimizer steps per epoch, {steps} in total (~{steps / per_epoch:.1f} epochs)")

    kind, extra = method.estimate_kind()  # what the method trains, in the estimator's terms
    spec = spec_from_sections(kind, plan.family, plan.peek.config_dir, cfg.train, cfg.optimizer, plan.data, **extra)
    e = cfg.estimate
    print(estimate_run(spec, steps, e.price_per_hour, e.utilisation, e.gpus or None, e.context_gib, e.fragmentation))
    return 0
