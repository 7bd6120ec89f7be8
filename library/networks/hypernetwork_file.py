"""The A1111 hypernetwork `.pt` file: write it, and read it back (ours, A1111's, and the old linear1/linear2 naming).

Layout (AUTOMATIC1111 modules/hypernetworks/hypernetwork.py, `Hypernetwork.save` / `load`), a pickled dict:
- `<width: int>` -> `(k_state_dict, v_state_dict)`, each `{"linear.<i>.weight"|"linear.<i>.bias": tensor}` with i the
  index in the module's `nn.Sequential` (activation / LayerNorm / Dropout entries shift it; see hypernetwork.py),
  in Sequential order (ComfyUI rebuilds the layers from the key order).
- `step`, `name`, `layer_structure`, `activation_func`, `is_layer_norm`, `weight_initialization`, `use_dropout`,
  `dropout_structure`, `last_layer_dropout`, `activate_output`, `sd_checkpoint`, `sd_checkpoint_name`,
  `optional_info`; plus `sdtk_metadata` ({str: str}: how the file was made; A1111 and ComfyUI skip non-int keys).
Only tensors, ints, floats, strs, bools, None, lists, tuples and dicts are pickled, so
`torch.load(path, weights_only=True)` reads it (ComfyUI's safe load). Reading here uses weights_only too.

SDXL: the same layout with the SDXL UNet's widths (640 and 1280 self-attention, 2048 cross-attention). A1111 has no
SDXL hypernetwork support (its training and "Create hypernetwork" are SD1/SD2 only) and ComfyUI's loader is untested
with them; load one with `load_hypernetwork` + `apply_hypernetwork` on a diffusers SDXL pipeline's UNet.
Missing metadata gets A1111's load defaults (layer_structure [1, 2, 1], activation none, activate_output true, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelFileError
from library.fileio import atomic_path
from library.networks.hypernetwork import Hypernetwork, HypernetworkSpec, parse_dropout_structure

# A1111's HypernetworkModule.fix_old_state_dict: the first files had two Linear layers named linear1 / linear2.
OLD_NAMES = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
             "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}


@dataclass
class HypernetworkInfo:
    """The non-weight entries of a hypernetwork file."""

    name: str = ""
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def to_a1111_dict(hn: Hypernetwork, info: HypernetworkInfo, dtype: torch.dtype = torch.float32) -> dict[Any, Any]:
    """The dict A1111 pickles: integer width keys -> (k, v) state dicts, then the metadata keys."""
    out: dict[Any, Any] = {}
    for width, pair in zip(hn.widths, hn.pairs.values()):
        out[width] = tuple({k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in m.state_dict().items()}
                           for m in pair)
    spec = hn.spec
    out.update({
        "step": int(info.step),
        "name": info.name,
        "layer_structure": [float(x) for x in spec.layer_structure],
        "activation_func": spec.activation_func,
        "is_layer_norm": bool(spec.add_layer_norm),
        "weight_initialization": spec.weight_init,
        "sd_checkpoint": info.sd_checkpoint,
        "sd_checkpoint_name": info.sd_checkpoint_name,
        "activate_output": bool(spec.activate_output),
        "use_dropout": bool(spec.use_dropout),
        "dropout_structure": [float(x) for x in spec.dropout_structure],
        # A1111 derives it when saving: `dropout_structure[-2] != 0`
        "last_layer_dropout": bool(spec.dropout_structure[-2] != 0) if len(spec.dropout_structure) > 1 else False,
        "optional_info": None,
        "sdtk_metadata": {str(k): str(v) for k, v in info.metadata.items()},
    })
    return out


def save_hypernetwork(path: str | os.PathLike, hn: Hypernetwork, info: HypernetworkInfo,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write the A1111 `.pt` file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(to_a1111_dict(hn, info, dtype), str(tmp))
    return path


def read_weights_only(path: Path) -> dict[Any, Any]:
    """torch.load(weights_only=True): a pickle that asks to run code is refused before anything runs."""
    if not path.is_file():
        raise ModelFileError(f"hypernetwork file {path} does not exist")
    from library.models.safe_load import read_pickle_dict

    return read_pickle_dict(path, "A1111 hypernetwork file")


def spec_from_a1111(sd: dict[Any, Any], where: str = "hypernetwork file") -> HypernetworkSpec:
    """The structure stored in a file, with A1111's `Hypernetwork.load` defaults for missing keys."""
    layer_structure = [float(x) for x in (sd.get("layer_structure") or [1, 2, 1])]
    use_dropout = bool(sd.get("use_dropout", False))
    dropout = sd.get("dropout_structure")
    if dropout is None:
        dropout = parse_dropout_structure(layer_structure, use_dropout, bool(sd.get("last_layer_dropout", False)))
    dropout = [float(x) for x in dropout]
    try:
        return HypernetworkSpec(
            layer_structure=tuple(layer_structure),
            activation_func=sd.get("activation_func") or "linear",  # A1111: None means no activation
            add_layer_norm=bool(sd.get("is_layer_norm", False)),
            activate_output=bool(sd.get("activate_output", True)),  # A1111's default for files without the key
            dropout_structure=tuple(dropout),
            weight_init=sd.get("weight_initialization") or "Normal",
            use_dropout=use_dropout or any(dropout),  # A1111's load rule
        )
    except ModelFileError as e:
        raise ModelFileError(f"{where}: {e}") from None


def from_a1111_dict(sd: dict[Any, Any], where: str = "hypernetwork file") -> tuple[Hypernetwork, HypernetworkInfo]:
    """Rebuild the modules from a file's dict (strict: every module's keys and shapes must match its structure)."""
    spec = spec_from_a1111(sd, where)
    widths = [k for k in sd if isinstance(k, int) and not isinstance(k, bool)]
    if not widths:
        raise ModelFileError(f"{where}: no integer width keys (e.g. 768): not an A1111 hypernetwork")
    hn = Hypernetwork(spec, widths)
    for width, pair in zip(widths, hn.pairs.values()):
        states = sd[width]
        if not isinstance(states, (tuple, list)) or len(states) != 2 or not all(isinstance(s, dict) for s in states):
            raise ModelFileError(f"{where}: entry {width} must be a (k, v) pair of state dicts")
        for kind, module, state in zip("kv", pair, states):
            state = {OLD_NAMES.get(k, k): v for k, v in state.items()}
            expected = module.state_dict()
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
            if missing or unexpected or wrong:
                raise ModelFileError(
                    f"{where}: the {kind} module of width {width} does not match its structure "
                    f"(layer_structure {list(spec.layer_structure)}, activation {spec.activation_func!r}, "
                    f"layer norm {spec.add_layer_norm}, dropout {list(spec.dropout_structure)}): missing {missing}, "
                    f"unexpected {unexpected}, wrong shape {wrong}")
            module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    meta = sd.get("sdtk_metadata")
    info = HypernetworkInfo(
        name=str(sd.get("name") or ""), step=int(sd.get("step") or 0),
        sd_checkpoint=sd.get("sd_checkpoint"), sd_checkpoint_name=sd.get("sd_checkpoint_name"),
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {})
    return hn, info


def load_hypernetwork(path: str | os.PathLike) -> tuple[Hypernetwork, HypernetworkInfo]:
    """Read an A1111 hypernetwork `.pt` (ours or A1111's, any era) into modules in eval mode."""
    path = Path(path)
    hn, info = from_a1111_dict(read_weights_only(path), where=str(path))
    if not info.name:
        info.name = path.stem  # A1111 names it after the file when the key is missing
    hn.eval()
    return hn, info
