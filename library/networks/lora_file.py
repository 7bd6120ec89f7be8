"""Writing a LoRA `.safetensors` file as sd-scripts does, for every layout (kohya keys in library/networks/kohya.py,
SD3's sd-scripts and diffusers keys in library/networks/sd3_keys.py): every tensor finite after the cast, the
`sshs_*` hashes added to the metadata, the file written atomically. Each caller checks its own key prefixes first.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch

from library.errors import ModelFileError
from library.fileio import atomic_path


def sshs_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts `precalculate_safetensors_hashes` computes them.

    Model hash: sha256 of the tensor data after the safetensors header (A1111 additional-networks `addnet_hash_
    safetensors`; metadata cannot change it). Legacy hash: first 8 hex of sha256 of the 64 KiB at offset 1 MiB of the
    file serialised with only its `ss_*` metadata (`addnet_hash_legacy`).
    """
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(dict(state_dict), ss or None)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def write_lora_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    metadata: Mapping[str, str]) -> Path:
    """Write the tensors atomically with `metadata` (values as str) plus sshs_model_hash / sshs_legacy_hash.

    Refused, with nothing written, when a floating tensor holds inf or NaN: checked on what is written, after any
    cast, since fp16 turns values above 65504 into inf.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        dtypes = sorted({str(tensors[k].dtype).removeprefix("torch.") for k in bad})
        raise ModelFileError(f"refusing to write {path}: {len(bad)} tensors hold inf or NaN ({', '.join(dtypes)}), "
                             f"e.g. {', '.join(bad[:3])}; nothing was written. Values above 65504 overflow fp16: save "
                             "in bf16 or fp32 (save.save_precision / output.precision)")
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)
