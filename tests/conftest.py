import os
import sys
from pathlib import Path

# Tests must never reach a model hub, and build their tiny models into a private cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("SDTK_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "sdtk-tests"))

# One torch thread per test process: pytest runs two workers on two cores, and several OpenMP threads per process
# on an oversubscribed machine were measured 10-30x slower than one (spinning threads starve each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
