"""Tiny, randomly initialised SD1 / SD2 / SDXL models for tests, demos and `tiny:` references.

They keep each family's real block structure (so LDM/SGM key maps, LoRA naming and block-weighted merges see the
same module paths as on a released model) and the real CLIP tokenizer, but with small channel counts and a /8 VAE
with 16-32 channels, so that a training step at 64 px takes milliseconds on a CPU. The VAE's weights are set to a
colour codec (each 8x8 block's mean colour; library/models/tiny_vae.py) so that what the UNet learns about colour
shows in decoded samples; every other weight is random.

References: `tiny:<name>[:<option>=<value>[,<option>=<value>]]`
    name     sd15 (alias sd1), sd2 (alias sd21), sdxl, sd3 (SD3.5 Medium layout; library/models/sd3/tiny.py)
    seed     integer weight seed (default 0)
    prediction  epsilon | v_prediction (alias v); default: sd15 epsilon, sd2 v_prediction (as SD 2.1 768-v), sdxl epsilon;
             sd3 predicts rectified flow and takes no prediction option
e.g. `tiny:sd15`, `tiny:sd15:seed=2`, `tiny:sd2:prediction=epsilon,seed=1`. A reference is built on first use into
`cache_dir()/tiny/v<TINY_VERSION>/<canonical name>` and reused after.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import ConfigError
from library.models.configs import bundled_config_dir, bundled_config_for
from library.models.families import Family, PredictionType
from library.models.model import SDModel
from library.models.tiny_vae import make_colour_codec
from library.paths import cache_dir

# Bump when the tiny architectures or their initialisation change, so stale cached folders are not reused.
# v2: UNet widths (32, 64, 128[, 128]) -> (16, 32, 64[, 64]) (~8.5 M -> ~2.2 M parameters, ~4x faster steps).
# v4: the VAE is a colour codec (library/models/tiny_vae.py) instead of random weights that lose colour (v3 was
# skipped: development caches held earlier experiments under it).
TINY_VERSION = 4

DEFAULT_PREDICTION: dict[str, PredictionType] = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon",
                                                 "sd3": "flow"}
_NAMES: dict[str, Family] = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sd21": "sd2", "sdxl": "sdxl", "sd3": "sd3"}
_CANONICAL: dict[str, str] = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl", "sd3": "sd3"}

# Text-encoder widths are chosen apart from every UNet channel count (16, 32, 64) so that width-keyed modules
# (A1111 hypernetworks pick their layers by context width) behave as on real models, and apart from each other
# so that an SD1 embedding cannot be mistaken for an SD2 one. Real: SD1 768, SD2 1024, SDXL 768 + 1280.
_TEXT: dict[str, list[dict[str, Any]]] = {
    "sd1": [dict(arch="CLIPTextModel", hidden=48, heads=2, act="quick_gelu", proj=48)],
    "sd2": [dict(arch="CLIPTextModel", hidden=80, heads=2, act="gelu", proj=40)],
    "sdxl": [
        dict(arch="CLIPTextModel", hidden=48, heads=2, act="quick_gelu", proj=48),
        dict(arch="CLIPTextModelWithProjection", hidden=96, heads=2, act="gelu", proj=96),
    ],
}
_TEXT_LAYERS = 3  # enough for clip_skip 2 and SDXL's penultimate layer to differ from the last one


@dataclass(frozen=True)
class TinyRef:
    family: Family
    seed: int
    prediction_type: PredictionType

    @property
    def name(self) -> str:
        """Canonical folder name: `sd15`, `sd15-seed2`, `sd2-epsilon`, ..."""
        name = _CANONICAL[self.family]
        if self.seed != 0:
            name += f"-seed{self.seed}"
        if self.prediction_type != DEFAULT_PREDICTION[self.family]:
            name += f"-{self.prediction_type}"
        return name


def parse_tiny_ref(ref: str) -> TinyRef:
    """Parse `tiny:<name>[:opt=value,...]` (see the module docstring); ConfigError names what is accepted."""
    accepted = ("tiny:sd15 | tiny:sd2 | tiny:sdxl | tiny:sd3, optionally ':seed=N' and/or "
                "':prediction=epsilon|v_prediction' (not for sd3)")
    parts = ref.split(":")
    if len(parts) < 2 or parts[0] != "tiny" or parts[1] not in _NAMES:
        raise ConfigError(f"model reference {ref!r} is not a tiny model; accepted: {accepted}")
    family = _NAMES[parts[1]]
    seed, prediction = 0, DEFAULT_PREDICTION[family]
    options = [o for p in parts[2:] for o in p.split(",") if o.strip()]
    for option in options:
        key, _, value = option.partition("=")
        match key.strip():
            case "seed" if value.strip().isdigit():
                seed = int(value)
            case "prediction" | "prediction_type" if value.strip() in ("epsilon", "v", "v_prediction") \
                    and family != "sd3":
                prediction = "epsilon" if value.strip() == "epsilon" else "v_prediction"
            case _:
                raise ConfigError(f"model reference {ref!r}: bad option {option!r}; accepted: {accepted}")
    return TinyRef(family, seed, prediction)


# UNet widths: the released ratios (SD1/SD2 1:2:4:4, SDXL 1:2:4), so the channel changes -- and with them the
# resnets carrying a shortcut convolution (LDM `input_blocks.4/7.0.skip_connection`) -- sit where the released
# UNets have them; (32, 32, 64, 64) would be cheaper but drop `input_blocks.4.0.skip_connection`, which key maps,
# LoCon counts and block-weighted merges (IN04) expect. 16 is the smallest base that keeps 8 group-norm groups of
# 2 channels and 16-wide attention heads on the attention levels (SD2 / SDXL: 16-wide heads everywhere; SD1's fixed
# 2 heads: 8, 16, 32 wide, as the released SD1 keeps the head count and widens heads per level).
# Below 16 a step gets little faster: at 8x8 latents it is dominated by per-op overhead (~700 modules, ~690
# parameter tensors), which the block structure fixes, not by the widths.
_UNET_WIDTHS = {"sd1": [16, 32, 64, 64], "sd2": [16, 32, 64, 64], "sdxl": [16, 32, 64]}


def tiny_unet_config(family: Family) -> dict[str, Any]:
    """The family's released UNet config with small widths; block types and layer counts stay as released."""
    cross = sum(t["hidden"] for t in _TEXT[family])
    match family:
        case "sd1":
            base, small = "sd15", dict(block_out_channels=_UNET_WIDTHS[family], attention_head_dim=2)
        case "sd2":
            # SD2 counts heads per level ([5, 10, 20, 20] -> 64-wide heads); here 16-wide heads.
            base, small = "sd21", dict(block_out_channels=_UNET_WIDTHS[family], attention_head_dim=[1, 2, 4, 4])
        case "sdxl":
            pooled = _TEXT["sdxl"][1]["proj"]
            base, small = "sdxl", dict(
                block_out_channels=_UNET_WIDTHS[family],
                attention_head_dim=[1, 2, 4],  # 16-wide heads on the two attention levels (released: 64-wide)
                transformer_layers_per_block=[1, 1, 2],  # released: [1, 2, 10]; >1 keeps transformer_blocks.1
                addition_time_embed_dim=16,
                # text_time embedding input: pooled text projection + 6 size numbers of addition_time_embed_dim each.
                projection_class_embeddings_input_dim=pooled + 6 * 16,
            )
        case _:
            raise ValueError(f"unknown family {family!r}")
    cfg = _read_json(bundled_config_dir(base) / "unet" / "config.json")
    cfg.update(small, cross_attention_dim=cross, norm_num_groups=8, sample_size=8)
    return cfg


def tiny_vae_config(family: Family) -> dict[str, Any]:
    """The family's VAE (same /8 down-sampling, scaling factor) with 16-32 channels."""
    cfg = _read_json(bundled_config_for(family, DEFAULT_PREDICTION[family]) / "vae" / "config.json")
    cfg.update(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, sample_size=64)
    return cfg


def tiny_text_configs(family: Family) -> list[dict[str, Any]]:
    """CLIP text configs (real vocabulary, 77 positions, the family's activation) with few, narrow layers."""
    out = []
    for t in _TEXT[family]:
        out.append(dict(
            architectures=[t["arch"]], model_type="clip_text_model", vocab_size=49408, max_position_embeddings=77,
            hidden_size=t["hidden"], intermediate_size=4 * t["hidden"], num_hidden_layers=_TEXT_LAYERS,
            num_attention_heads=t["heads"], hidden_act=t["act"], projection_dim=t["proj"], layer_norm_eps=1e-5,
            # The released configs say bos 0 / eos 2 / pad 1 (not the tokenizer's ids): transformers then pools at
            # the highest token id, which is <|endoftext|> (49407). Kept so pooling works as on released models.
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ))
    return out


def build_tiny(family: Family, seed: int = 0, prediction_type: PredictionType | None = None) -> SDModel:
    """A tiny model of `family` with weights drawn from `seed` (same seed -> bit-identical weights).

    Initialisation is each library's own (so weights look like a fresh model's), drawn from a private copy of
    torch's RNG: the caller's global RNG state is left untouched.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in DEFAULT_PREDICTION:
        raise ValueError(f"unknown family {family!r}")
    if family == "sd3":
        from library.models.sd3.tiny import build_tiny_sd3

        model = build_tiny_sd3(seed)
        model.source = f"tiny:{TinyRef('sd3', seed, 'flow').name}"
        model.config_dir = _tiny_config_dir(model, TinyRef("sd3", seed, "flow"))
        return model
    prediction: PredictionType = prediction_type or DEFAULT_PREDICTION[family]
    bundled = bundled_config_for(family, prediction)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(tiny_unet_config(family))
        vae = AutoencoderKL.from_config(tiny_vae_config(family))
        make_colour_codec(vae)
        text_encoders = []
        for cfg in tiny_text_configs(family):
            cls = CLIPTextModelWithProjection if cfg["architectures"][0] == "CLIPTextModelWithProjection" else CLIPTextModel
            text_encoders.append(cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})))
    tokenizer_dirs = ["tokenizer", "tokenizer_2"][: len(text_encoders)]
    tokenizers = [CLIPTokenizer.from_pretrained(bundled / d) for d in tokenizer_dirs]
    scheduler_config = _read_json(bundled / "scheduler" / "scheduler_config.json")
    scheduler_config["prediction_type"] = prediction
    for m in (unet, vae, *text_encoders):
        m.eval().requires_grad_(False)
    ref = TinyRef(family, seed, prediction)
    model = SDModel(
        family=family, prediction_type=prediction, unet=unet, vae=vae, text_encoders=text_encoders,
        tokenizers=tokenizers, scheduler_config=scheduler_config, source=f"tiny:{ref.name}",
        config_dir=bundled, extra={"tiny": ref.name},
    )
    model.config_dir = _tiny_config_dir(model, ref)
    return model


def _tiny_config_dir(model: SDModel, ref: TinyRef) -> Path:
    """A configs-only diffusers folder describing this tiny model (what single-file loading needs as config_dir)."""
    from library.models.save import write_configs

    final = _cache_root(ref.family) / "configs" / ref.name
    if not (final / "model_index.json").is_file():
        staging = _staging(final)
        staging.mkdir(parents=True)
        write_configs(model, staging)
        _publish(staging, final)
    return final


def resolve_model_ref(ref: str) -> Path:
    """The diffusers folder of a `tiny:` reference, built into the cache on first use and reused after.

    Two processes may race to build it: each writes its own temporary folder and renames it into place; renaming
    onto a folder that already exists fails, so the first complete folder wins and readers never see a partial
    or disappearing one (which replacing an existing folder, as `atomic_path` does, could show them).
    """
    from library.models.save import save_diffusers

    tiny = parse_tiny_ref(ref)
    final = _cache_root(tiny.family) / tiny.name
    if (final / "model_index.json").is_file():
        return final
    staging = _staging(final)
    model = build_tiny(tiny.family, tiny.seed, tiny.prediction_type)
    save_diffusers(model, staging, dtype=torch.float32)
    _publish(staging, final)
    return final


def _cache_root(family: str) -> Path:
    """Where built tiny models are kept: per TINY_VERSION, and for SD3 also per its own layout version."""
    if family == "sd3":
        from library.models.sd3.tiny import SD3_TINY_VERSION

        return cache_dir() / "tiny" / f"v{TINY_VERSION}-sd3.{SD3_TINY_VERSION}"
    return cache_dir() / "tiny" / f"v{TINY_VERSION}"


def _staging(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.build-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _publish(staging: Path, final: Path) -> None:
    """Rename a complete folder into place; if another process got there first, keep theirs."""
    try:
        os.rename(staging, final)
    except OSError:
        if not (final / "model_index.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    return copy.deepcopy(json.loads(path.read_text(encoding="utf-8")))
