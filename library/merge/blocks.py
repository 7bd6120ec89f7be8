"""Block slots of a block-weighted merge ("MBW"): which UNet block an LDM/SGM key belongs to, and per-slot alphas.

Slots (DESIGN.md "Block-weighted merge", the layout of the A1111 "Merge Block Weighted" extension and supermerger):
- SD1/SD2, 26 slots: BASE, IN00-IN11, M00, OUT00-OUT11;
- SDXL, 20 slots: BASE, IN00-IN08, M00, OUT00-OUT08.
Key -> slot: `time_embed` (and SDXL `label_emb`) -> IN00, `input_blocks.N` -> IN{N}, `middle_block` -> M00,
`output_blocks.N` -> OUT{N}, the final `out.` -> the last OUT slot; text encoders, VAE and everything else -> BASE.

Users paste alphas in the forms those tools use: 25 values (SDXL 19) for the UNet slots, BASE taken from `alpha`;
26 values (SDXL 20) with BASE first; a comma-separated string of either; or a preset name (PRESETS).

SD3 / SD3.5 (MMDiT, `n_blocks` joint blocks: 24 for SD3 Medium / SD3.5 Medium, 38 for SD3.5 Large): the slots of
ComfyUI's ModelMergeSD3_2B / ModelMergeSD35_Large nodes (comfy_extras/nodes_model_merging_model_specific.py),
named as there: pos_embed, x_embedder, context_embedder, y_embedder, t_embedder, joint_blocks.0 ..
joint_blocks.{n-1}, final_layer (n_blocks + 6 model slots), plus BASE for the text encoders and the VAE.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

from library.errors import ConfigError
from library.models.families import Family

UNET = "model.diffusion_model."
_UNET_BLOCKS = {"sd1": 12, "sd2": 12, "sdxl": 9}  # input_blocks / output_blocks per family (LDM / SGM UNetModel)
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
SD3_EMBEDDERS = ("pos_embed", "x_embedder", "context_embedder", "y_embedder", "t_embedder")
_JOINT = re.compile(r"joint_blocks\.(\d+)\.")


def sd3_blocks_in(keys) -> int:
    """Number of MMDiT joint blocks among single-file keys (what SD3 slot lists are built for)."""
    found = {int(m.group(1)) for k in keys if k.startswith(UNET) and (m := _JOINT.match(k[len(UNET):]))}
    if found != set(range(len(found))):
        raise ValueError(f"joint blocks are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def slot_names(family: Family, n_blocks: int | None = None) -> list[str]:
    """All slots in the order users write them: BASE, IN.., M00, OUT.. (26 for SD1/SD2, 20 for SDXL); SD3:
    BASE, the five embedders, joint_blocks.0 .. joint_blocks.{n_blocks - 1}, final_layer."""
    if family == "sd3":
        if not n_blocks:
            raise ValueError("SD3 slot names need the number of joint blocks (sd3_blocks_in)")
        return ["BASE", *SD3_EMBEDDERS, *(f"joint_blocks.{i}" for i in range(n_blocks)), "final_layer"]
    n = _blocks(family)
    return ["BASE", *(f"IN{i:02d}" for i in range(n)), "M00", *(f"OUT{i:02d}" for i in range(n))]


def _blocks(family: Family) -> int:
    if family not in _UNET_BLOCKS:
        raise ValueError(f"unknown family {family!r}")
    return _UNET_BLOCKS[family]


def block_slot(key: str, family: Family) -> str:
    """The slot of one single-file (LDM/SGM) key. A UNet key outside the family's layout raises ValueError."""
    if family == "sd3":
        return _sd3_slot(key)
    n = _blocks(family)
    if not key.startswith(UNET):
        return "BASE"  # text encoder(s), VAE, schedule buffers, markers
    rest = key[len(UNET):]
    if rest.startswith("time_embed.") or (family == "sdxl" and rest.startswith("label_emb.")):
        return "IN00"
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith("out."):
        return f"OUT{n - 1:02d}"
    m = _BLOCK.match(rest)
    if m and int(m.group(2)) < n:
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    raise ValueError(f"'{key}' is not a UNet key of the {family} layout (no block slot for it)")


def _sd3_slot(key: str) -> str:
    if not key.startswith(UNET):
        return "BASE"  # text_encoders.*, first_stage_model.*
    rest = key[len(UNET):]
    head = rest.split(".", 1)[0]
    if head in SD3_EMBEDDERS or head == "final_layer":
        return head
    m = _JOINT.match(rest)
    if m:
        return f"joint_blocks.{int(m.group(1))}"
    raise ValueError(f"'{key}' is not an MMDiT key of the SD3 layout (no block slot for it)")


# Presets over the UNet slots (IN00 .. OUT last), as functions of the position t in [0, 1] (IN00 = 0, last OUT = 1).
# Names follow the MBW extension where its curve is the same (GRAD_V: 1 at both ends, 0 at M00, linear between);
# each is defined here by its formula so that it applies to SDXL's 19 UNet slots as well as SD's 25.
PRESETS: dict[str, Callable[[float], float]] = {
    "ALL_A": lambda t: 0.0,
    "ALL_B": lambda t: 1.0,
    "FLAT_25": lambda t: 0.25,
    "FLAT_75": lambda t: 0.75,
    "GRAD_V": lambda t: abs(2 * t - 1),
    "GRAD_A": lambda t: 1 - abs(2 * t - 1),
    "LINEAR": lambda t: t,
    "REVERSE_LINEAR": lambda t: 1 - t,
    "SMOOTHSTEP": lambda t: t * t * (3 - 2 * t),  # 3t^2 - 2t^3, the Hermite smoothstep
    "REVERSE_SMOOTHSTEP": lambda t: 1 - t * t * (3 - 2 * t),
    "COSINE": lambda t: (1 + math.cos(2 * math.pi * t)) / 2,  # a soft GRAD_V
    "REVERSE_COSINE": lambda t: (1 - math.cos(2 * math.pi * t)) / 2,
    "INPUT": lambda t: 1.0 if t < 0.5 else 0.0,  # B in the IN slots only
    "MIDDLE": lambda t: 1.0 if t == 0.5 else 0.0,
    "OUTPUT": lambda t: 1.0 if t > 0.5 else 0.0,
}


def preset_values(name: str, family: Family, n_blocks: int | None = None) -> list[float]:
    """The UNet-slot values (25 or 19; SD3: n_blocks + 6, embedders first, final_layer last) of a named preset."""
    key = name.strip().upper()
    if key not in PRESETS:
        raise ConfigError(f"unknown block-weight preset {name!r}; known: {', '.join(PRESETS)}")
    n = len(slot_names(family, n_blocks)) - 1
    return [round(PRESETS[key](i / (n - 1)), 10) for i in range(n)]


def parse_block_alphas(value: str | Sequence[float], family: Family, base: float, *, what: str,
                       n_blocks: int | None = None) -> dict[str, float]:
    """slot -> alpha from a preset name, a comma-separated string or a list (UNet slots only, or BASE first).

    `base` is BASE's value when the UNet-only form is given; `what` names the config key in error messages.
    An empty value gives every slot `base` (a plain, unweighted merge).
    """
    slots = slot_names(family, n_blocks)
    n = len(slots) - 1
    if isinstance(value, str):
        text = value.strip()
        if not text:
            values: list[float] = []
        elif re.fullmatch(r"[A-Za-z_][\w*-]*", text):
            return dict(zip(slots, [base, *preset_values(text, family, n_blocks)]))
        else:
            try:
                values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
            except ValueError:
                raise ConfigError(f"{what} = {value!r}: write {n} or {n + 1} numbers separated by commas, or a "
                                  f"preset name ({', '.join(PRESETS)})") from None
    else:
        values = [float(v) for v in value]
    if not values:
        return {s: float(base) for s in slots}
    if len(values) == n:
        values = [base, *values]
    if len(values) != n + 1:
        raise ConfigError(f"{what} has {len(values)} values; a {family} block-weighted merge takes {n} "
                          f"({slots[1]}..{slots[-1]}, BASE from the plain alpha) or {n + 1} (BASE first)")
    return dict(zip(slots, values))
