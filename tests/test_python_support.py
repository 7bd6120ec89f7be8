"""Python 3.10 is supported (pyproject requires-python, README): `tomllib` is 3.11+, so every module that reads TOML
imports it behind a version check with `tomli` as the 3.10 fallback (requirements.txt installs tomli there). A bare
`import tomllib` breaks `import` of the module, and with it every script, on 3.10; this machine runs 3.11, so only a
static check catches it."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A module-level `import tomllib` (not indented under `if sys.version_info >= (3, 11):`).
BARE = re.compile(r"^(import tomllib\b|from tomllib import)", re.M)


def test_no_bare_tomllib_import():
    files = [p for d in ("library", "tests", "tools", "bench") for p in (REPO / d).rglob("*.py")]
    files += list(REPO.glob("*.py"))
    bare = sorted(str(p.relative_to(REPO)) for p in files if BARE.search(p.read_text(encoding="utf-8")))
    assert len(files) > 50
    assert not bare, f"bare `import tomllib` (fails on Python 3.10): {bare}"
