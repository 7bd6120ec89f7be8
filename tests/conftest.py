import os
import sys
from pathlib import Path

# Tests must never reach a model hub, and build their tiny models into a private cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("SDTK_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "sdtk-tests"))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
