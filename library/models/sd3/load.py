"""Load an SD3 / SD3.5 diffusers folder (as `StableDiffusion3Pipeline.save_pretrained` writes it) into an `SDModel`,
and the shared pieces single-file loading needs (config folder, empty modules, tokenizers, scheduler).

`SDModel` for SD3: `unet` holds the SD3Transformer2DModel (the denoiser), `text_encoders` is [CLIP-L, CLIP-G]
plus T5 when it is used (`model.use_t5 = false`, or a folder saved without `text_encoder_3`, drops it: its tokens
are then zeros, as StableDiffusion3Pipeline does with `text_encoder_3=None`), `tokenizers` matches,
`prediction_type` is "flow" (rectified flow) and `scheduler_config` the FlowMatchEulerDiscreteScheduler config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from library.errors import ConfigError, ModelFileError
from library.models.model import SDModel

TE_DIRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def is_sd3_folder(folder: Path) -> bool:
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        try:
            if json.loads(index.read_text(encoding="utf-8")).get("_class_name") == "StableDiffusion3Pipeline":
                return True
        except (OSError, json.JSONDecodeError):
            return False
    return (folder / "transformer" / "config.json").is_file() and not (folder / "unet").exists()


def check_config(cfg: Any) -> None:
    """What a `[model]` table may not ask of an SD3 model (its prediction type is rectified flow)."""
    forced = cfg.resolved_prediction_type()
    if forced not in (None, "flow"):
        raise ConfigError(f"model.prediction_type = '{forced}' does not apply to SD3 (a rectified-flow model): "
                          "remove it or set 'auto' / 'flow'" + (" and drop model.v_parameterization"
                                                               if cfg.v_parameterization else ""))
    family = cfg.resolved_family()
    if family not in (None, "sd3"):
        raise ConfigError(f"model.family = '{family}' but the model is an SD3 / SD3.5 model; set 'sd3' or 'auto'")


def load_sd3_folder(folder: Path, cfg: Any, *, dtype: torch.dtype | None = torch.float32) -> SDModel:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(folder)
    check_config(cfg)
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    use_t5 = bool(getattr(cfg, "use_t5", True)) and (folder / "text_encoder_3" / "config.json").is_file() \
        and index.get("text_encoder_3", ["", ""])[0] is not None
    needed = ["transformer/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json"]
    for sub in needed:
        if not (folder / sub).exists():
            raise ModelFileError(f"{folder}: missing {sub} (needed for an SD3 model); expected a diffusers folder with "
                                 "transformer/, vae/, text_encoder/, text_encoder_2/ (text_encoder_3/ optional), "
                                 "tokenizer/, tokenizer_2/, scheduler/")
    variant = cfg.variant or None
    try:
        transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                            variant=variant)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, variant=variant)
        encoders = [CLIPTextModelWithProjection.from_pretrained(folder, subfolder=d, dtype=dtype, variant=variant)
                    for d in TE_DIRS[:2]]
        if use_t5:
            t5_file = getattr(cfg, "t5xxl", "")
            if t5_file:  # the folder's config, weights from the separate file
                from library.models.sd3.text_encoders import load_separate

                t5 = _empty_t5(folder / "text_encoder_3")
                load_separate(t5, "t5xxl", Path(t5_file).expanduser())
                encoders.append(t5 if dtype is None else t5.to(dtype))
            else:
                encoders.append(T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_3", dtype=dtype,
                                                               variant=variant))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{folder}: cannot load this SD3 diffusers folder ({type(e).__name__}: {e})") from e
    from library.models.families import sd3_variant

    return SDModel(
        family="sd3", prediction_type="flow", unet=transformer, vae=vae, text_encoders=encoders,
        tokenizers=tokenizers_for(folder, cfg, use_t5), scheduler_config=scheduler_config(folder),
        source=str(folder), config_dir=folder, extra={"sd3_variant": sd3_variant(dict(transformer.config))},
    )


def config_folder(cfg: Any, variant: str) -> Path:
    """`model.config_dir` when set (checked), else the bundled folder of `variant`."""
    from library.models.configs import bundled_config_dir

    check_config(cfg)
    if not cfg.config_dir:
        return bundled_config_dir(variant)
    d = Path(cfg.config_dir).expanduser()
    if not (d / "transformer" / "config.json").is_file():
        raise ModelFileError(f"model.config_dir = '{d}' is not an SD3 diffusers config folder "
                             "(no transformer/config.json)")
    return d


def build_empty(config_dir: Path, *, use_t5: bool, path: Path) -> tuple[Any, Any, list[Any]]:
    """Transformer, VAE and text encoders from the config folder with parameters on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    try:
        with init_empty_weights():
            transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(config_dir / "transformer"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
            encoders = [CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / d)) for d in TE_DIRS[:2]]
        if use_t5:
            encoders.append(_empty_t5(config_dir / "text_encoder_3"))
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path}: cannot build the model from the config folder {config_dir} ({e})") from e
    return transformer, vae, encoders


def _empty_t5(config_dir: Path) -> Any:
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        return T5EncoderModel(T5Config.from_pretrained(config_dir))


def tokenizers_for(folder: Path, cfg: Any, use_t5: bool) -> list[Any]:
    """CLIP tokenizers from the folder; the T5 one from `model.t5_tokenizer`, else the folder's tokenizer_3/.

    The bundled config folders hold no T5 tokenizer: T5's SentencePiece vocabulary does not ship with any package
    we install, and nothing is downloaded. A model whose T5 is used then needs `model.t5_tokenizer`.
    """
    from transformers import AutoTokenizer, CLIPTokenizer

    toks: list[Any] = [CLIPTokenizer.from_pretrained(Path(folder) / d) for d in TOKENIZER_DIRS[:2]]
    if use_t5:
        given = getattr(cfg, "t5_tokenizer", "") or ""
        t5_dir = Path(given).expanduser() if given else Path(folder) / "tokenizer_3"
        if not t5_dir.is_dir():
            raise ConfigError(
                f"model.t5_tokenizer: {'the folder ' + str(t5_dir) + ' does not exist' if given else 'not set'}; "
                "this SD3 model uses T5-XXL, whose tokenizer is not bundled: give the folder of a T5 tokenizer "
                "(the model's tokenizer_3/, with tokenizer.json or spiece.model) or set model.use_t5 = false")
        try:
            toks.append(AutoTokenizer.from_pretrained(t5_dir))
        except (OSError, ValueError) as e:
            raise ModelFileError(f"model.t5_tokenizer: cannot load a tokenizer from {t5_dir} ({e})") from e
    return toks


def scheduler_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    sched = _read_json(path) if path.is_file() else {}
    if sched.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise ModelFileError(f"{path}: scheduler {sched.get('_class_name')!r} is not a flow-matching scheduler; "
                             "SD3 models use FlowMatchEulerDiscreteScheduler")
    sched.setdefault("_class_name", "FlowMatchEulerDiscreteScheduler")
    sched.setdefault("num_train_timesteps", 1000)
    sched.setdefault("shift", 3.0)
    return sched


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from e
