"""Generate the README's memory table: SD1.5 / SDXL x LoRA / full / TI / HN on 8, 12, 16 and 24 GB cards.

    python tools/memory_table.py                  # print the markdown table
    python tools/memory_table.py --write README.md  # replace the block between the two marker lines

Each preset is the common recipe (native resolution, batch 1, fp16 mixed precision with fp16 frozen weights, SDPA,
AdamW; LoRA rank 16 on UNet and text encoder; TI 1 vector; HN [1, 2, 1]) estimated on fake tensors
(library/estimate), then walked up the ladder of cheaper settings (library/estimate/report.py LADDER) until each card
size fits. A cell names the changes needed, or says it does not fit with any of them. The allowance (CUDA context and
allocator, library/estimate/gpus.py) is included.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

START, END = "<!-- memory-table:start (tools/memory_table.py) -->", "<!-- memory-table:end -->"
SIZES_GB = (8, 12, 16, 24)
SHORT = {"cached latents/text": "cache", "8-bit optimizer": "8-bit", "gradient checkpointing": "ckpt",
         "DeepSpeed ZeRO-2 CPU offload": "offload", "half batch x2 accumulation": "half batch"}


def presets():
    from library.config.network import NetworkConfig
    from library.estimate.memory import EstimateSpec

    for family, label, side in (("sd1", "SD1.5", 512), ("sdxl", "SDXL", 1024)):
        common = dict(family=family, resolution=(side, side), batch_size=1, mixed_precision="fp16")
        yield f"{label} LoRA r16", EstimateSpec(method="lora", network=NetworkConfig(network_dim=16), **common)
        yield f"{label} full", EstimateSpec(method="full", **common)
        yield f"{label} TI", EstimateSpec(method="ti", **common)
        yield f"{label} HN", EstimateSpec(method="hn", **common)


def _short(label: str) -> str:
    parts = []
    for part in label.split(" + "):
        name = part.split(" (")[0]
        parts.append(SHORT.get(name, part))
    return " + ".join(parts)


def table(entries=None, sizes_gb=SIZES_GB, log=sys.stderr) -> str:
    """The markdown table (and its legend) for `entries`, (name, EstimateSpec) pairs; default: `presets()`."""
    from library.estimate.gpus import GPU, needed_bytes
    from library.estimate.memory import estimate_step
    from library.estimate.report import ladder

    cards = [GPU(key=f"{gb}gb", name=f"{gb} GB", memory_gib=gb, tensor_tflops=1.0, fp32_tflops=0.5, source="size")
             for gb in sizes_gb]
    header = "| preset | tensors (W / G / O / A) | needs | " + " | ".join(f"{gb} GB" for gb in sizes_gb) + " |"
    lines = [header, "|" + "---|" * (3 + len(sizes_gb))]
    for name, spec in entries if entries is not None else presets():
        t0 = time.perf_counter()
        estimates = ladder(estimate_step(spec, "as configured"), cards)
        base = estimates[0]
        parts = " / ".join(f"{b / 2**30:.1f}" for b in (base.weights, base.gradients, base.optimizer_state,
                                                          base.activations))
        cells = []
        for card in cards:
            chosen = next((e for e in estimates if needed_bytes(e.peak) <= card.memory_gib * 2**30), None)
            cells.append("no" if chosen is None else "yes" if chosen is base else
                         f"{_short(chosen.label)} ({needed_bytes(chosen.peak) / 2**30:.1f})")
        lines.append(f"| {name} | {parts} | {needed_bytes(base.peak) / 2**30:.1f} GiB | " + " | ".join(cells) + " |")
        if log is not None:
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=log, flush=True)
    return "\n".join([
        *lines, "",
        ("Tensors: weights / gradients / optimizer state / activations at the peak, GiB; needs: peak plus the "
         "CUDA-context and allocator allowance (library/estimate/gpus.py). Cells: yes = fits as configured; "
         "otherwise the cumulative changes that make it fit and the GiB it then needs (cache = cached latents and "
         "frozen text-encoder outputs, 8-bit = AdamW8bit, ckpt = gradient checkpointing, half batch, offload = "
         "DeepSpeed ZeRO-2 CPU optimizer offload); no = does not fit even with all of them."),
    ])


def replace_block(doc: str, text: str) -> str:
    """`doc` with the lines between the START and END markers replaced by `text`."""
    if START not in doc or END not in doc:
        raise ValueError(f"no block between '{START}' and '{END}'; add the two lines where the table goes")
    head, rest = doc.split(START, 1)
    return head + START + "\n" + text + "\n" + END + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="a markdown file whose marked block is replaced by the table")
    args = parser.parse_args()
    text = table()
    if args.write is None:
        print(text)
        return
    try:
        doc = replace_block(args.write.read_text(encoding="utf-8"), text)
    except ValueError as exc:
        sys.exit(f"error: {args.write}: {exc}")
    args.write.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
