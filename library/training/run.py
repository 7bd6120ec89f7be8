"""What every training script does around its method: parse, plan, load, build data, train, report.

A script is: its root config class + `make_method(cfg)` (library/methods/<method>.py) + `run_script(...)`. Keeping
this here means every script, DreamBooth included, shares one tested path from the command line to the saved result,
with the same `--print-config`, `--dry-run` and `--cache-only`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Callable

from library.config.cli import parse_cli
from library.config.core import dump_toml, save_resolved_config
from library.config.run import RunConfig, sd_scripts_names

EXTRA_FLAGS = {
    "cache_only": "Build the on-disk latent cache (data.cache_latents and cache_latents_to_disk) and exit.",
}


def run_script(root_cls: type, make_method: Callable, argv: list[str] | None, *, prog: str, description: str,
               aliases: dict[str, str] | None = None) -> int:
    """Parse the command line into `root_cls`, then train with `make_method(cfg)`. Returns the exit code."""
    cfg, flags = parse_cli(root_cls, sys.argv[1:] if argv is None else argv,
                           aliases=sd_scripts_names(root_cls, aliases), prog=prog, description=description,
                           extra_flags=EXTRA_FLAGS)
    if flags.print_config:
        print(dump_toml(cfg), end="")
        return 0
    if flags.dry_run:
        from library.training.dry_run import dry_run

        return dry_run(cfg, make_method(cfg), script=prog)
    run_training(cfg, make_method(cfg), script=prog, cache_only=flags.extra.get("cache_only", False))
    return 0


def apply_cpu_threads(train_cfg) -> None:
    """train.cpu_threads > 0: that many intra-op CPU threads for this process (see its help)."""
    if train_cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(train_cfg.cpu_threads)


def run_training(cfg: RunConfig, method, *, script: str, cache_only: bool = False):
    """Plan the run (every check, no weights read), load the model and data, train with `method`, save; returns the
    loop's TrainResult (None with `cache_only`)."""
    import torch

    from library.data.loader import build_train_data
    from library.lean import start_done
    from library.diffusion.objective import Objective
    from library.methods.base import DataFacts
    from library.models.load import load_model
    from library.models.peek import needs_weights, peek_loaded
    from library.training.loop import LoopSettings, train
    from library.precision import cast_floating_
    from library.training.plan import make_plan
    from library.training.setup import load_dtype

    t0 = time.perf_counter()
    apply_cpu_threads(cfg.train)  # before DreamBooth generates class images in make_plan
    dtype = load_dtype(cfg.train)
    if needs_weights(cfg.model):  # a pickle checkpoint without model.family: only loading it tells what it is
        torch.manual_seed(cfg.train.seed)
        model = load_model(cfg.model, dtype=dtype)
        plan = make_plan(cfg, method, script=script, peek=peek_loaded(model))
    else:
        plan = make_plan(cfg, method, script=script)
        torch.manual_seed(cfg.train.seed)
        model = load_model(cfg.model, dtype=dtype)
    start_done()  # the imports that last the whole run are done (library/lean.py, 5)
    cast_floating_(model.vae, torch.float32)  # the SD/SDXL VAEs overflow in fp16; latent caching comes next
    plan = plan.confirm(model, cfg)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cache_only:  # an on-disk cache for later runs; ConfigError unless data.cache_latents(_to_disk) are on
        from library.data.loader import build_latent_cache

        count = build_latent_cache(plan.data, model.vae, default_resolution=plan.native_resolution)
        print(f"latent cache ready for {count} images", file=sys.stderr)
        return None

    def build(data_cfg, seed: int):
        return build_train_data(data_cfg, default_resolution=plan.native_resolution, seed=seed, rank=rank,
                                world_size=world, vae=model.vae if data_cfg.cache_latents else None,
                                family=model.family)

    data = build(plan.data, cfg.train.seed)
    objective = Objective(cfg.noise, cfg.loss, model.prediction_type, scheduler_config=model.scheduler_config,
                          native_resolution=plan.native_resolution)
    if rank == 0:
        save_resolved_config(replace(cfg, data=plan.data), cfg.save.output_dir, cfg.save.output_name)
    summary = data.summary()
    method.bind(plan.facts, DataFacts(sum(d["num_train_images"] for d in summary["datasets"]), data.tag_frequency(),
                                      summary["datasets"]), build)
    settings = LoopSettings(train=cfg.train, optimizer=cfg.optimizer, scheduler=cfg.scheduler, save=cfg.save,
                            sample=cfg.sample, log=cfg.log, facts=plan.facts, batch_size=plan.batch_size,
                            prompts=plan.prompts, cache_text=plan.cache_text)
    setup_s = time.perf_counter() - t0
    result = train(model, method, data, objective, settings)
    if rank == 0:
        first = sum(result.losses[:10]) / max(1, len(result.losses[:10]))
        last = sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))
        print(f"done: {result.steps} steps, loss {first:.4f} (first 10) -> {last:.4f} (last 10), "
              f"set-up {setup_s:.1f} s, training {result.timings['wall']:.1f} s; saved {result.result_path}",
              file=sys.stderr)
    return result
