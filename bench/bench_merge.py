"""Merge benchmark: a block-weighted merge of two full-size SDXL-shaped fp16 checkpoints (~6.9 GB each).

    python bench/bench_merge.py [--dir DIR] [--keep]

Writes two single files with the released SDXL key set and shapes (UNet, VAE, both text encoders, from the bundled
configs on the meta device) filled with random fp16 values, times `cat A B > /dev/null` (the time just to read both
files), then runs `merge_models.py` (weighted sum, GRAD_V block alphas, fp16 single-file output) in a child process
and reports its wall time and peak resident memory (the child's ru_maxrss). Targets: peak RSS < 1.5 GB, wall time
< 2x the read time. Also reported: the time to write (and fsync) one file of the output's size with `dd`, since the
merge must write one: on a disk much slower to write than to read (or with inputs in the page cache) that write
alone can exceed twice the read time. Needs 30 GB free in DIR (default: a temporary folder beside the repository), which is removed
afterwards unless --keep. Prints JSON and writes bench/results/merge.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from library.fileio import write_text_atomic  # noqa: E402

NEED_BYTES = 30 * 1024**3
RESULTS = Path(__file__).resolve().parent / "results"
POOL = 1 << 26  # one random fp16 pool of 64 Mi values (128 MiB), sliced per tensor: generating 7 G values is slow


def sdxl_specs() -> dict[str, tuple[int, ...]]:
    """Every single-file key of a released SDXL base checkpoint with its shape (meta-device models, key maps)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.merge.stream import TE_PARTS, folder_parts, read_json
    from library.models import keymaps_clip as kc
    from library.models.configs import bundled_config_dir
    from library.models.keymaps import to_ldm

    folder = bundled_config_dir("sdxl")
    _, parts = folder_parts(folder, "sdxl", with_weights=False)
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(read_json(folder / "unet" / "config.json")),
            "vae": AutoencoderKL.from_config(read_json(folder / "vae" / "config.json")),
        }
        for name, _, _ in TE_PARTS["sdxl"]:
            cfg = read_json(folder / name / "config.json")
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            modules[name] = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    specs: dict[str, tuple[int, ...]] = {}
    for part in parts:
        module = modules[part.name]
        sd = kc.te_state_dict(module) if part.name.startswith("text_encoder") else module.state_dict()
        specs.update({k: tuple(v.shape) for k, v in to_ldm(sd, part.keymap).items()})
    return specs


def write_random(path: Path, specs: dict[str, tuple[int, ...]], seed: int) -> None:
    from library.merge.stream import SafetensorsWriter

    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed)).half()
    w = SafetensorsWriter(path, {k: (torch.float16, s) for k, s in specs.items()})
    pos = 0
    for key, shape in specs.items():
        n = 1
        for d in shape:
            n *= d
        chunks, left = [], n
        while left:  # a tensor larger than the pool wraps around it
            take = min(left, POOL - pos)
            chunks.append(pool[pos:pos + take])
            pos, left = (pos + take) % POOL, left - take
        w.write(key, torch.cat(chunks).reshape(shape) if len(chunks) > 1 else chunks[0].reshape(shape))
        pos = (pos + 7919) % POOL  # vary the alignment between tensors
    w.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the ~21 GB of files go (default: a temp folder in the repo)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else ROOT
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < NEED_BYTES:
        print(f"skipped: {free / 1024**3:.1f} GB free in {base}, the benchmark needs 30 GB")
        return 0
    work = Path(tempfile.mkdtemp(prefix=".bench-merge-", dir=base))
    try:
        specs = sdxl_specs()
        a, b, out = work / "a.safetensors", work / "b.safetensors", work / "merged.safetensors"
        t0 = time.perf_counter()
        write_random(a, specs, 1)
        write_random(b, specs, 2)
        gen_s = time.perf_counter() - t0
        size = a.stat().st_size
        t0 = time.perf_counter()
        subprocess.run(f"cat '{a}' '{b}' > /dev/null", shell=True, check=True)
        read_s = time.perf_counter() - t0
        # The merge also writes (and fsyncs) a file as large as one input: time that alone as the disk's floor.
        t0 = time.perf_counter()
        subprocess.run(f"dd if=/dev/zero of='{work / 'zeros'}' bs=16M count={size // (16 << 20)} conv=fsync "
                       "status=none", shell=True, check=True)
        write_s = time.perf_counter() - t0
        (work / "zeros").unlink()
        cmd = [sys.executable, str(ROOT / "merge_models.py"), "--merge.model_a", str(a), "--merge.model_b", str(b),
               "--merge.alpha", "0.5", "--merge.block_alphas", "GRAD_V", "--output.path", str(out),
               "--output.precision", "fp16", "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall_s = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        result = {
            "benchmark": "merge_sdxl_block_weighted_fp16",
            "file_gb": round(size / 1e9, 3),
            "tensors": len(specs),
            "generate_s": round(gen_s, 1),
            "read_both_s": round(read_s, 2),
            "merge_wall_s": round(wall_s, 2),
            "wall_over_read": round(wall_s / read_s, 2),
            "write_one_file_fsync_s": round(write_s, 2),
            "wall_over_read_plus_write": round(wall_s / (read_s + write_s), 2),
            "peak_rss_gb": round(rss / 1e9, 3),
            "targets": {"peak_rss_gb_lt": 1.5, "wall_over_read_lt": 2.0},
            "pass": rss / 1e9 < 1.5 and wall_s / read_s < 2.0,
            "output_gb": round(out.stat().st_size / 1e9, 3),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        }
        print(json.dumps(result, indent=2))
        RESULTS.mkdir(exist_ok=True)
        write_text_atomic(RESULTS / "merge.json", json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
