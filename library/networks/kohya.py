"""The kohya LoRA file format: key names, strict save / load, `ss_*` and `modelspec.*` metadata (the file is written
by library/networks/lora_file.py, with the sshs hashes).

Key rules (sd-scripts networks/lora.py `LoRANetwork.create_modules`, DESIGN.md "LoRA (kohya format)"):
- `lora_unet_` + module path with `.` -> `_`; the path is diffusers' for SD1/SD2 and SGM's for SDXL (sd-scripts trains
  SDXL on its SGM-layout UNet), e.g. `lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`.
- `lora_te_` (SD1/SD2) or `lora_te1_` / `lora_te2_` (SDXL) + the CLIP path *with* `text_model.`, which transformers 5
  CLIPTextModel module names lack and every released file has.
- per module `<name>.<suffix>`; suffixes per adapter type in library/networks/lycoris.py.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from library.errors import ModelFileError
from library.models.model import SDModel
from library.networks import lycoris
from library.networks.lora import AdaptedModule, Network
from library.networks.lora_file import write_lora_file

PREFIXES = {
    ("sd1", "unet"): "lora_unet", ("sd2", "unet"): "lora_unet", ("sdxl", "unet"): "lora_unet",
    ("sd1", "text_encoder"): "lora_te", ("sd2", "text_encoder"): "lora_te",
    ("sdxl", "text_encoder"): "lora_te1", ("sdxl", "text_encoder_2"): "lora_te2",
}


def _unet_sgm_modules(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet module path -> SGM module path, from the state-dict key map (weights name every layer)."""
    from library.models.keymaps import unet_key_map

    return {k.removesuffix(".weight"): v.removesuffix(".weight")
            for k, v in unet_key_map(dict(unet_config)).items() if k.endswith(".weight")}


def kohya_name(family: str, component: str, path: str, sgm: Mapping[str, str] | None = None) -> str:
    """The kohya module name of one layer (diffusers / transformers path inside `component`)."""
    prefix = PREFIXES.get((family, component))
    if prefix is None:
        raise ModelFileError(f"{family} has no kohya prefix for component {component!r}")
    if component == "unet":
        if family == "sdxl":
            if sgm is None or path not in sgm:
                raise ModelFileError(f"SDXL UNet module {path} has no SGM name (unet_key_map does not list it)")
            path = sgm[path]
    else:
        path = "text_model." + path.removeprefix("text_model.")
    return f"{prefix}_{path.replace('.', '_')}"


def module_names(model: SDModel, network: Network) -> dict[str, AdaptedModule]:
    """kohya module name -> adapted layer; fails if two layers would share a name."""
    sgm = _unet_sgm_modules(model.unet.config) if model.family == "sdxl" and any(
        m.component == "unet" for m in network.modules) else None
    out: dict[str, AdaptedModule] = {}
    for m in network.modules:
        name = kohya_name(model.family, m.component, m.path, sgm)
        if name in out:
            raise ModelFileError(f"two layers map to the kohya name {name}: {out[name].path} and {m.path}")
        out[name] = m
    return out


def kohya_weight_map(model: SDModel) -> dict[str, str]:
    """kohya module name -> "<component>.<path>.weight" for every Linear / Conv2d of the UNet and text encoders.

    Works on meta-device models; library/networks/lora_tools.py uses it to merge or extract with diffusers names.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    comps = [("unet", model.unet)] + list(zip(("text_encoder", "text_encoder_2"), model.text_encoders))
    sgm = _unet_sgm_modules(model.unet.config) if model.family == "sdxl" else None
    out: dict[str, str] = {}
    for component, root in comps:
        for path, mod in root.named_modules():
            if isinstance(mod, BaseTunerLayer):
                raise ModelFileError("kohya_weight_map needs a model without adapters")
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                if component == "unet" and sgm is not None and path not in sgm:
                    continue
                out[kohya_name(model.family, component, path, sgm)] = f"{component}.{path}.weight"
    return out


def target_weight_map(model: SDModel, cfg) -> dict[str, str]:
    """Like kohya_weight_map, restricted to the layers `cfg` (a NetworkConfig) adapts: what extraction produces."""
    from library.networks.lora import plan_ranks

    sgm = _unet_sgm_modules(model.unet.config) if model.family == "sdxl" else None
    return {kohya_name(model.family, component, path, sgm): f"{component}.{path}.weight"
            for component, entries in plan_ranks(model, cfg).items() for path in entries}


def network_state_dict_kohya(model: SDModel, network: Network, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The adapters as a kohya state dict; every trained parameter lands in exactly one key (checked)."""
    sd: dict[str, torch.Tensor] = {}
    trained = {id(p) for p in network.parameters()}
    covered = 0
    for name, m in module_names(model, network).items():
        tensors = lycoris.module_tensors(network.module_type, m, network.adapter_name)
        covered += len(tensors) - 1  # all but alpha are parameters
        for suffix, t in tensors.items():
            t = t.detach() if t.is_meta else t.detach().to("cpu")  # meta: key-name checks without weights
            sd[f"{name}.{suffix}"] = (t.to(dtype) if dtype is not None else t.clone()).contiguous()
    if covered != len(trained):
        raise ModelFileError(f"kohya export covered {covered} tensors but the network trains {len(trained)}")
    return sd


def _file_family(keys: list[str]) -> str | None:
    if any(k.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_middle_block",
                         "lora_unet_output_blocks")) for k in keys):
        return "sdxl"
    if any(k.startswith(("lora_te_", "lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks"))
           for k in keys):
        return "sd1/sd2"
    return None


def load_kohya_into(model: SDModel, network: Network, state_dict: Mapping[str, torch.Tensor],
                    source: str = "LoRA file", strict: bool = True) -> None:
    """Load a kohya state dict into the network's adapters; any unknown key, shape or family mismatch is an error.

    strict: every adapted layer must be in the file too (resume). The file's alphas replace the configured ones.
    """
    keys = list(state_dict)
    fam = _file_family(keys)
    want = "sdxl" if model.family == "sdxl" else "sd1/sd2"
    if fam is not None and fam != want:
        raise ModelFileError(f"{source} is a {fam.upper()} LoRA (keys like {keys[0]}); the model is {model.family}")
    names = module_names(model, network)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, dot, suffix = key.partition(".")
        if not dot:
            raise ModelFileError(f"{source}: key {key!r} is not <module>.<tensor>")
        if name not in names:
            hint = "" if name.startswith(tuple(f"{p}_" for p in set(PREFIXES.values()))) else \
                " (every key must start with lora_unet_, lora_te_, lora_te1_ or lora_te2_)"
            raise ModelFileError(f"{source}: key {key} names no adapted layer of this network{hint}; check "
                                 "network.network_module, network.target, conv_dim and the model family")
        grouped.setdefault(name, {})[suffix] = tensor
    if strict:
        missing = sorted(set(names) - set(grouped))
        if missing:
            raise ModelFileError(f"{source} lacks {len(missing)} adapted layers, e.g. {missing[0]}; it was made with "
                                 "other network settings (network_module, target, conv_dim, block_dims)")
    for name, tensors in grouped.items():
        m = names[name]
        expected = lycoris.expected_shapes(network.module_type, m, network.adapter_name)
        if set(tensors) != set(expected):
            extra = sorted(set(tensors) - set(expected))
            lacking = sorted(set(expected) - set(tensors))
            raise ModelFileError(f"{source}: {name} has tensors {sorted(tensors)} but a {network.module_type} layer "
                                 f"needs {sorted(expected)} (extra {extra}, missing {lacking}); check network_module")
        for suffix, shape in expected.items():
            got = tuple(tensors[suffix].shape)
            if suffix == "alpha" and tensors[suffix].numel() == 1:
                continue
            if got != shape:
                raise ModelFileError(f"{source}: {name}.{suffix} has shape {list(got)}, this network needs "
                                     f"{list(shape)}; check network_dim / conv_dim (rank) and the model family")
    for name, tensors in grouped.items():
        lycoris.load_module_tensors(network.module_type, names[name], network.adapter_name, tensors,
                                    f"{source}: {name}")


def read_kohya(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors LoRA; ModelFileError if it cannot be read."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path}: only .safetensors LoRA files are read (pickled .pt/.ckpt are unsafe)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, Exception) as e:  # safetensors raises its own SafetensorError for malformed files
        raise ModelFileError(f"{path}: cannot read as safetensors ({e})") from None


def load_kohya_file_into(model: SDModel, network: Network, path: str | os.PathLike) -> dict[str, str]:
    """Read a kohya file and load it strictly (network_weights); returns its metadata."""
    tensors, metadata = read_kohya(path)
    load_kohya_into(model, network, tensors, source=str(path))
    return metadata


def save_kohya(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write the LoRA atomically as .safetensors with `metadata` plus sshs_model_hash / sshs_legacy_hash
    (library/networks/lora_file.py: no inf / NaN after the cast)."""
    bad = [k for k in state_dict if not k.startswith(tuple(f"{p}_" for p in set(PREFIXES.values())))]
    if bad:  # diffusers only converts kohya files whose every key has one of these prefixes
        raise ModelFileError(f"refusing to write {path}: key {bad[0]} lacks a lora_unet_/lora_te*_ prefix")
    return write_lora_file(path, state_dict, metadata)


# ---------------------------------------------------------------------------------------------------------------
# Metadata.

# Where a DoRA file gives the weight peft trained (m (W + dW) / ||W + dW||, norm per output row); the loaders' rules
# are re-implemented and checked in tests/test_comfy_rules.py. No layout makes all three agree (see lycoris.py).
DORA_NOTE = ("dora_scale per output row ([out, 1], LyCORIS wd_on_output=True), trained as peft's DoRA: "
             "m * (W + dW) / ||W + dW|| per output row. LyCORIS computes this weight. ComfyUI divides by ||W|| of the "
             "base weight for this layout and A1111 reads only the per-input layout: both compute another weight. "
             "For the exact result there, merge it into the checkpoint with merge_models.py")

# modelspec architecture per (family, v-prediction): sd-scripts library/sai_model_spec.py ARCH_* + "/lora".
_ARCH = {("sd1", False): "stable-diffusion-v1", ("sd1", True): "stable-diffusion-v1",
         ("sd2", False): "stable-diffusion-v2-512", ("sd2", True): "stable-diffusion-v2-768-v",
         ("sdxl", False): "stable-diffusion-xl-v1-base", ("sdxl", True): "stable-diffusion-xl-v1-base"}


def base_model_version(family: str, v_prediction: bool) -> str:
    """`ss_base_model_version`: sd_v1 / sd_v2 (+ `_v` for v-prediction), sdxl_base_v1-0 (sd-scripts model_util);
    the family table (library/models/families.py) holds the names."""
    from library.models.families import FAMILIES

    match family:
        case "sd1" | "sd2" | "sdxl":
            return FAMILIES[family].ss_base_model_version + ("_v" if v_prediction and family != "sdxl" else "")
        case other:
            raise ValueError(f"unknown family {other!r}")


def metadata_for(
    *,
    family: str,
    v_prediction: bool,
    network_module: str,
    network_dim: int,
    network_alpha: float,
    title: str,
    network_args: Mapping[str, Any] | None = None,
    base_model: str = "",
    resolution: tuple[int, int] = (512, 512),
    steps: int = 0,
    epochs: int = 0,
    num_train_images: int = 0,
    learning_rate: float = 0.0,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    training_started_at: float = 0.0,
    training_finished_at: float | None = None,
    seed: int | None = None,
    clip_skip: int | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    datasets: list[dict] | None = None,
    config_text: str = "",
    config_hash: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The `ss_*` + `modelspec.*` metadata of a LoRA, from explicit values (all strings, as safetensors needs).

    network_module: lora / locon / loha / lokr / dora. LoRA and LoCon are written as sd-scripts does
    ("networks.lora", conv settings in ss_network_args); LoHa / LoKr / DoRA as LyCORIS via sd-scripts does
    ("lycoris.kohya" with algo in ss_network_args). config_text: the resolved TOML; config_hash:
    library.config.core.config_hash of that config (the one meaning of sdtk_config_hash in every file we write).
    """
    args = {k: str(v) for k, v in (network_args or {}).items()}
    match network_module:
        case "lora" | "locon" | "networks.lora":
            module = "networks.lora"
        case "loha" | "lokr":
            module, args["algo"] = "lycoris.kohya", network_module
        case "dora":
            module, args["algo"], args["dora_wd"], args["wd_on_output"] = "lycoris.kohya", "lora", "True", "True"
        case other:
            raise ValueError(f"unknown network module {other!r}")
    w, h = resolution
    md: dict[str, Any] = {
        "ss_network_module": module,
        "ss_network_dim": int(network_dim),
        "ss_network_alpha": float(network_alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_model_version(family, v_prediction),
        "ss_v2": family == "sd2",
        "ss_v_parameterization": v_prediction,
        "ss_sd_model_name": os.path.basename(base_model),
        "ss_resolution": f"({w}, {h})",
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_epoch": epochs,
        "ss_num_train_images": num_train_images,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr if unet_lr is not None else learning_rate,
        "ss_text_encoder_lr": text_encoder_lr if text_encoder_lr is not None else learning_rate,
        "ss_training_started_at": training_started_at,
        "ss_output_name": title,
        "ss_tag_frequency": json.dumps(dict(tag_frequency or {})),
        "ss_datasets": json.dumps(list(datasets or [])),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{_ARCH[(family, v_prediction)]}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.datetime.fromtimestamp(training_finished_at or training_started_at,
                                                          datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if training_finished_at is not None:
        md["ss_training_finished_at"] = training_finished_at
    if seed is not None:
        md["ss_seed"] = seed
    if clip_skip is not None:
        md["ss_clip_skip"] = clip_skip
        md["modelspec.encoder_layer"] = clip_skip
    if config_text:
        md["sdtk_config"] = config_text
    if config_hash:
        md["sdtk_config_hash"] = config_hash
    if network_module == "dora":
        md["sdtk_dora_layout"] = DORA_NOTE
    md.update(extra or {})
    return {k: str(v) for k, v in md.items()}
