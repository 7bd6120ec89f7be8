"""Where the toolkit keeps things it builds on first use (embedded tiny models, the demo dataset)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """`$SDTK_CACHE`, else `$XDG_CACHE_HOME/sdtk`, else `~/.cache/sdtk`."""
    if os.environ.get("SDTK_CACHE"):
        return Path(os.environ["SDTK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdtk"
