"""Run any merge recipe: checkpoint merges (library/merge/recipe.py) or the LoRA modes (library/merge/lora_ops.py).

The dispatch lives here, above both, so neither module imports the other's caller (lora_ops uses recipe's readers
and writer).
"""

from __future__ import annotations

from pathlib import Path

from library.config.merge import MergeRecipe
from library.errors import ConfigError

LORA_MODES = ("lora_merge", "lora_extract", "lora_resize")


def run_recipe(cfg: MergeRecipe, recipe_text: str, *, progress: bool = True, dry_run: bool = False,
               timings: dict[str, float] | None = None) -> Path | None:
    """Run the recipe; returns the output path. `recipe_text`: the resolved TOML, stored with the output.

    dry_run: open the inputs and check them (family, keys, shapes), print what would be written, write nothing.
    """
    out = Path(cfg.output.path).expanduser()
    if out.exists() and not cfg.output.overwrite:
        raise ConfigError(f"output.path {out} exists; choose another path or set output.overwrite = true")
    if cfg.merge.mode in LORA_MODES:
        if dry_run:
            print(f"recipe is valid ({cfg.merge.mode}); LoRA inputs are read when it runs; would write {out}")
            return None
        from library.merge import lora_ops

        return lora_ops.run_lora_mode(cfg, recipe_text, progress=progress)
    from library.merge.recipe import run_merge

    return run_merge(cfg, recipe_text, progress=progress, dry_run=dry_run, timings=timings)
