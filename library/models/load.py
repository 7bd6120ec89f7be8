"""Load the base model a `[model]` table names: a diffusers folder, a single checkpoint file or a `tiny:` reference.

Family and prediction type are read from the model (folder configs) unless the config forces them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from library.config.model import ModelConfig
from library.errors import ModelFileError
from library.models.families import Family, PredictionType
from library.models.model import SDModel
from library.models.tiny import resolve_model_ref  # noqa: F401  (also part of this module's API)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ACCEPTED = (
    "a diffusers folder (with model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/), "
    "a single checkpoint file (" + ", ".join(SINGLE_FILE_SUFFIXES) + "), "
    "or 'tiny:sd15' | 'tiny:sd2' | 'tiny:sdxl' | 'tiny:sd3' (embedded test models); SD3 / SD3.5: a folder with "
    "transformer/ or a single file with model.diffusion_model.joint_blocks.*"
)


def load_model(cfg: ModelConfig, *, dtype: torch.dtype | None = torch.float32) -> SDModel:
    """Load `cfg.pretrained_model_name_or_path` with every weight in `dtype`, modules in eval mode, no grads.

    dtype=None keeps each weight as stored (an fp16 file stays fp16): no full-precision copy of the model is made
    when the caller casts the frozen weights to its own precision afterwards anyway (the training loop does)."""
    ref = cfg.pretrained_model_name_or_path.strip()
    if ref.startswith("tiny:"):
        model = load_diffusers_folder(resolve_model_ref(ref), cfg, dtype=dtype)
        model.source = ref
        model.extra["tiny"] = ref
    else:
        path = Path(ref).expanduser()
        if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            from library.models.safe_load import open_tensor_file
            from library.models.sd3.single_file import is_sd3_keys

            if is_sd3_keys(open_tensor_file(path).keys()):  # header only; SD3 has its own key maps
                from library.models.sd3.single_file import load_sd3_single_file as load_single_file
            else:
                from library.models.single_file import load_single_file  # written separately; heavy key maps

            model = load_single_file(path, cfg)
        elif path.is_dir():
            model = load_diffusers_folder(path, cfg, dtype=dtype)
        elif path.is_file():
            raise ModelFileError(f"model.pretrained_model_name_or_path: {path} is not a model file; accepted: {ACCEPTED}")
        else:
            hint = ""
            if "/" in ref and not path.is_absolute() and not ref.startswith("."):
                hint = " (model hub names are not downloaded: download the model and give its local path)"
            raise ModelFileError(
                f"model.pretrained_model_name_or_path: {ref} does not exist{hint}; accepted: {ACCEPTED}"
            )
    if model.family == "sd3":
        model.extra["t5xxl_max_token_length"] = cfg.t5xxl_max_token_length  # read by sd3/text.py
    if cfg.vae:
        model.vae = load_vae(Path(cfg.vae).expanduser(), model, dtype)
    forced = cfg.resolved_prediction_type()
    if forced and model.family != "sd3":  # SD3 is rectified flow; its loader refuses other forced types
        set_prediction_type(model, forced)  # type: ignore[arg-type]
    from library.precision import cast_floating_

    for module in (model.unet, model.vae, *model.text_encoders):
        if dtype is not None:
            cast_floating_(module, dtype)
        module.eval().requires_grad_(False)
    return model


def load_diffusers_folder(folder: Path, cfg: ModelConfig, *, dtype: torch.dtype | None = torch.float32) -> SDModel:
    """Load a diffusers-format pipeline folder (as written by diffusers' `save_pretrained` or `save_diffusers`)."""
    folder = Path(folder)
    from library.models.sd3.load import is_sd3_folder

    if is_sd3_folder(folder):
        from library.models.sd3.load import load_sd3_folder

        return load_sd3_folder(folder, cfg, dtype=dtype)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    unet_config = _read_json(_require(folder, "unet/config.json"))
    family: Family = cfg.resolved_family() or detect_family(index, unet_config)  # type: ignore[assignment]
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    n_text = 2 if family == "sdxl" else 1
    te_names, tok_names = ["text_encoder", "text_encoder_2"][:n_text], ["tokenizer", "tokenizer_2"][:n_text]
    for sub in ("vae/config.json", *(f"{n}/config.json" for n in te_names), *tok_names):
        _require(folder, sub, family)
    variant = cfg.variant or None
    try:
        unet = _load_component(folder, "unet", variant, dtype)
        vae = _load_component(folder, "vae", variant, dtype)
        text_encoders = [_load_component(folder, name, variant, dtype) for name in te_names]
        tokenizers = load_tokenizers([folder / name for name in tok_names])
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{folder}: cannot load this diffusers folder ({type(e).__name__}: {e})") from e
    prediction: PredictionType = scheduler_config.get("prediction_type") or "epsilon"
    if prediction not in ("epsilon", "v_prediction"):
        raise ModelFileError(
            f"{scheduler_path}: prediction_type {prediction!r} is not supported (epsilon or v_prediction); "
            "set model.prediction_type to override"
        )
    extra: dict[str, Any] = {}
    if scheduler_config.get("rescale_betas_zero_snr"):
        extra["zero_terminal_snr"] = True  # trained with zero-terminal-SNR betas (arXiv 2305.08891)
    model = SDModel(
        family=family, prediction_type=prediction, unet=unet, vae=vae, text_encoders=text_encoders,
        tokenizers=tokenizers, scheduler_config=scheduler_config, source=str(folder), config_dir=folder, extra=extra,
    )
    set_prediction_type(model, prediction)
    return model


# What each component of an SD1/SD2/SDXL folder is built as, and the stem of its weights file.
_UNET, _VAE = "diffusion_pytorch_model", "diffusion_pytorch_model"
_TE = "model"


def _component_class(folder: Path, name: str) -> tuple[type, str]:
    """(class, weights file stem) of component `name` (unet, vae, text_encoder, text_encoder_2)."""
    match name:
        case "unet":
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

            return UNet2DConditionModel, _UNET
        case "vae":
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

            return AutoencoderKL, _VAE
        case "text_encoder" | "text_encoder_2":
            from transformers.models.clip.modeling_clip import CLIPTextModel, CLIPTextModelWithProjection

            # SDXL's second encoder carries the pooled projection; everything else is a plain CLIPTextModel.
            arch = _read_json(folder / name / "config.json").get("architectures", [""])[0]
            return (CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel), _TE
        case _:
            raise ValueError(f"unknown component {name!r}")


def _load_component(folder: Path, name: str, variant: str | None, dtype: torch.dtype | None) -> Any:
    """One component: built on the meta device from its config and given the safetensors weights
    (library/models/meta_load.py); other formats (pickled .bin) and key sets this path does not know go through
    the owning library's `from_pretrained`, which converts them."""
    from library.models.meta_load import WeightsMismatch, assign_weights, empty, folder_weights, read_safetensors

    cls, stem = _component_class(folder, name)
    weights = folder_weights(folder / name, stem, variant)
    if weights is not None:
        module = empty(lambda: _from_config(cls, folder / name))
        try:
            state = read_safetensors(weights)
            if name.startswith("text_encoder"):
                from library.models.keymaps_clip import te_module_keys

                state = te_module_keys(module, state)  # files carry `text_model.` keys (library/models/save.py)
            assign_weights(module, state, dtype=dtype)
            if name.startswith("text_encoder"):
                module.config.dtype = module.dtype  # as transformers' from_pretrained records it (saved configs)
            return module.eval()
        except WeightsMismatch:
            pass  # e.g. a VAE saved by diffusers < 0.14 (old attention names): from_pretrained renames them
    if name.startswith("text_encoder"):
        return cls.from_pretrained(folder, subfolder=name, dtype=dtype, variant=variant)
    return cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype, variant=variant)


def _from_config(cls: type, component: Path) -> Any:
    if hasattr(cls, "load_config"):  # diffusers ModelMixin
        return cls.from_config(cls.load_config(component))
    from transformers.models.clip.configuration_clip import CLIPTextConfig

    return cls(CLIPTextConfig.from_pretrained(component))


def load_tokenizers(folders: list[Path]) -> list[Any]:
    """The CLIP tokenizers of these tokenizer folders (tokenizer.json, or vocab.json + merges.txt)."""
    return [_tokenizer(folder) for folder in folders]


# tokenizer_config.json keys a CLIPTokenizer takes as arguments; the rest say where files were or are implied by
# tokenizer.json (its added tokens). A config with any other key is left to from_pretrained.
_TOKENIZER_ARGS = frozenset({"add_prefix_space", "bos_token", "clean_up_tokenization_spaces", "do_lower_case",
                             "eos_token", "errors", "model_max_length", "pad_token", "padding_side",
                             "truncation_side", "unk_token"})
_TOKENIZER_IGNORED = frozenset({"added_tokens_decoder", "backend", "is_local", "local_files_only", "merges_file",
                                "name_or_path", "special_tokens_map_file", "tokenizer_class", "tokenizer_file",
                                "vocab_file"})


def _tokenizer(folder: Path) -> Any:
    """A folder with tokenizer.json (every folder we write, every tiny: model) is read straight from that file with
    the config's arguments: the same tokenizer (ids, special tokens, saved files; tests/test_meta_load.py) in a
    third of from_pretrained's time, which resolves hub files and merges configs first. Others: from_pretrained."""
    from transformers.models.clip.tokenization_clip import CLIPTokenizer

    tokenizer_json, config_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if tokenizer_json.is_file() and config_path.is_file():
        config = _read_json(config_path)
        if config.get("tokenizer_class", "CLIPTokenizer") == "CLIPTokenizer" and set(config) <= (
                _TOKENIZER_ARGS | _TOKENIZER_IGNORED):
            return CLIPTokenizer(tokenizer_file=str(tokenizer_json),
                                 **{k: v for k, v in config.items() if k in _TOKENIZER_ARGS})
    return CLIPTokenizer.from_pretrained(folder)


def detect_family(model_index: dict[str, Any], unet_config: dict[str, Any]) -> Family:
    """SD1 / SD2 / SDXL from a folder's model_index.json and unet/config.json.

    SDXL: its pipeline class, a second text encoder, or the UNet's `text_time` size conditioning. SD1 vs SD2: the
    context width (768 vs 1024) of released models; other widths (tiny or unusual models) are told apart by SD2's
    linear projections in the transformer blocks (SD1 uses 1x1 convolutions).
    """
    if (
        "XL" in str(model_index.get("_class_name", ""))
        or "text_encoder_2" in model_index
        or unet_config.get("addition_embed_type") == "text_time"
    ):
        return "sdxl"
    match unet_config.get("cross_attention_dim"):
        case 768:
            return "sd1"
        case 1024:
            return "sd2"
        case _:
            return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def set_prediction_type(model: SDModel, prediction: PredictionType) -> None:
    """Set the prediction type on the model and on its scheduler config (which samplers and saving read)."""
    model.prediction_type = prediction
    model.scheduler_config = {**model.scheduler_config, "prediction_type": prediction}


def load_vae(path: Path, model: SDModel, dtype: torch.dtype | None) -> Any:
    """A replacement VAE: a diffusers VAE folder (config.json + weights, or a pipeline folder with vae/), or one
    .safetensors file in diffusers or original (LDM) naming, read with the model's own VAE config."""
    from diffusers import AutoencoderKL

    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            from safetensors.torch import load_file

            if path.suffix.lower() == ".safetensors":
                state = load_file(path)
                if any(k.startswith("encoder.down_blocks.") for k in state):  # already diffusers naming
                    vae = AutoencoderKL.from_config(model.vae.config)
                    vae.load_state_dict(state, strict=True)
                    return vae if dtype is None else vae.to(dtype)
            return AutoencoderKL.from_single_file(
                str(path), config=str(model.config_dir), subfolder="vae", torch_dtype=dtype, local_files_only=True
            )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelFileError(f"model.vae: cannot load {path} as a VAE ({type(e).__name__}: {e})") from e
    raise ModelFileError(
        f"model.vae: {path} does not exist or is not a VAE; give a diffusers VAE folder or a .safetensors file"
    )


def _require(folder: Path, sub: str, family: str | None = None) -> Path:
    path = folder / sub
    if not path.exists():
        what = f" (needed for an {family} model)" if family else ""
        raise ModelFileError(
            f"{folder}: missing {sub}{what}; expected a diffusers folder with model_index.json and "
            "unet/, vae/, text_encoder/, tokenizer/, scheduler/ (SDXL also text_encoder_2/, tokenizer_2/)"
        )
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from e
