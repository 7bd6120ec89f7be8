"""What every training script does around its method: parse, load, build data, train, report.

A script is: its root config class + a `Method` + `run_script(...)`. Keeping this here means five scripts share one
tested path from the command line to the saved result.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from library.config.cli import parse_cli
from library.config.core import config_hash, dump_toml, save_resolved_config
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


def run_training(cfg: RunConfig, method, *, script: str, cache_only: bool = False, wrap_data: Callable | None = None):
    """Load the model and data named by `cfg`, train with `method`, save; returns the loop's TrainResult.

    wrap_data(data, model, rank, world_size) -> data: replaces the built data (DreamBooth's paired batches).
    """
    import torch

    from library.config.diffusion import check_prediction_compat
    from library.data.loader import build_train_data
    from library.diffusion.objective import Objective
    from library.models.families import FAMILIES
    from library.models.load import load_model
    from library.training.loop import LoopSettings, train

    t0 = time.perf_counter()
    apply_cpu_threads(cfg.train)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model)
    check_prediction_compat(cfg.noise, model.prediction_type, cfg.loss)
    native = FAMILIES[model.family].resolution
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cache_only:  # an on-disk cache for later runs; ConfigError unless data.cache_latents(_to_disk) are on
        from library.data.loader import build_latent_cache

        count = build_latent_cache(cfg.data, model.vae, default_resolution=native)
        print(f"latent cache ready for {count} images", file=sys.stderr)
        return None
    data = build_train_data(cfg.data, default_resolution=native, seed=cfg.train.seed, rank=rank, world_size=world,
                            vae=model.vae if cfg.data.cache_latents else None, family=model.family)
    if wrap_data is not None:
        data = wrap_data(data, model, rank, world)
    resolution = _side(cfg.data.resolution) or native
    objective = Objective(cfg.noise, cfg.loss, model.prediction_type, scheduler_config=model.scheduler_config,
                          native_resolution=native)
    out_dir = Path(cfg.save.output_dir)
    if rank == 0:
        save_resolved_config(cfg, out_dir, cfg.save.output_name)
    metadata = {
        "sdtk_script": script,
        "sdtk_config_hash": config_hash(cfg),
        "sdtk_config": dump_toml(cfg, comments=False),
        "sdtk_base_model": cfg.model.pretrained_model_name_or_path,
        "sdtk_family": model.family,
        "sdtk_prediction_type": model.prediction_type,
    }
    summary = data.summary()
    method.bind_data({"tag_frequency": data.tag_frequency(), "datasets": summary["datasets"],
                      "num_train_images": sum(d["num_train_images"] for d in summary["datasets"]),
                      "resolution": resolution})
    settings = LoopSettings(train=cfg.train, optimizer=cfg.optimizer, scheduler=cfg.scheduler, save=cfg.save,
                            sample=cfg.sample, log=cfg.log, clip_skip=cfg.model.clip_skip, resolution=resolution,
                            metadata=metadata,
                            fixed_captions=data.fixed_captions() if cfg.data.cache_text_encoder_outputs else None)
    setup_s = time.perf_counter() - t0
    result = train(model, method, data, objective, settings)
    if rank == 0:
        first = sum(result.losses[:10]) / max(1, len(result.losses[:10]))
        last = sum(result.losses[-10:]) / max(1, len(result.losses[-10:]))
        print(f"done: {result.steps} steps, loss {first:.4f} (first 10) -> {last:.4f} (last 10), "
              f"set-up {setup_s:.1f} s, training {result.timings['wall']:.1f} s; saved {result.result_path}",
              file=sys.stderr)
    return result


def _side(resolution) -> int:
    if isinstance(resolution, list):
        return max(resolution)
    return int(resolution)
