"""Bundled diffusers-format config folders (see README.md here): models load and build offline from these."""

from __future__ import annotations

from pathlib import Path

CONFIGS_ROOT = Path(__file__).resolve().parent

BUNDLED = ("sd15", "sd21", "sd21_base", "sdxl", "sd3_medium", "sd35_medium", "sd35_large")
# A family name picks its usual release; SD2 with epsilon prediction is the 512-px base model; SD3 the 3.5 Medium
# layout (single files and folders pick their own variant from their keys / configs).
_ALIASES = {"sd1": "sd15", "sd2": "sd21", "sd2_v": "sd21", "sd2_base": "sd21_base", "sd3": "sd35_medium"}


def bundled_config_dir(name: str) -> Path:
    """The bundled folder for `name`: one of BUNDLED, or a family name ("sd1" -> sd15, "sd2" -> sd21, "sdxl")."""
    key = _ALIASES.get(name, name)
    if key not in BUNDLED:
        # Not a UserError: names come from code (family literals), never straight from a user.
        raise KeyError(f"no bundled config {name!r}; known: {', '.join(BUNDLED + tuple(_ALIASES))}")
    return CONFIGS_ROOT / key


def bundled_config_for(family: str, prediction_type: str) -> Path:
    """The bundled folder matching a family and prediction type (SD2: 768-v for v_prediction, base otherwise)."""
    if family == "sd2":
        return bundled_config_dir("sd21" if prediction_type == "v_prediction" else "sd21_base")
    return bundled_config_dir(family)
