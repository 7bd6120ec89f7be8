"""SD3 facts from configs and file headers only (no weights read), for library/models/peek.py `peek_model`.

`peek_sd3(model_cfg)` returns (family, config_dir, prediction_type, denoiser sample_size, vae_scale_factor) -- the
fields of peek.ModelPeek -- for an SD3 / SD3.5 diffusers folder, single `.safetensors` file or `tiny:sd3`, and None
for anything else, so that the run plan and `--dry-run` know an SD3 model before `load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from library.errors import ConfigError


def peek_sd3(model_cfg: Any) -> tuple[str, Path, str, int | None, int] | None:
    from library.models.sd3.load import config_folder, is_sd3_folder

    ref = model_cfg.pretrained_model_name_or_path.strip()
    if ref.startswith("tiny:"):
        from library.models.tiny import parse_tiny_ref, resolve_model_ref

        if parse_tiny_ref(ref).family != "sd3":
            return None
        folder = resolve_model_ref(ref)
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            if not is_sd3_folder(path):
                return None
            folder = path
        elif path.is_file() and path.suffix.lower() == ".safetensors":
            from library.models.safe_load import read_safetensors_header
            from library.models.sd3.single_file import is_sd3_keys, variant_of_keys

            shapes, _ = read_safetensors_header(path)
            if not is_sd3_keys(shapes):
                return None
            folder = config_folder(model_cfg, variant_of_keys(shapes))
        else:
            return None
    forced = model_cfg.resolved_family()
    if forced not in (None, "sd3"):
        raise ConfigError(f"model.family = '{forced}' but {ref} is an SD3 / SD3.5 model; set 'sd3' or 'auto'")
    transformer = _read(folder / "transformer" / "config.json")
    vae = _read(folder / "vae" / "config.json")
    return ("sd3", folder, "flow", transformer.get("sample_size"),
            2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1))


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
