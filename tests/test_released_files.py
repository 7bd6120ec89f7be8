"""Issue 20 item 3: single files in the key layout of the code that trained the released models load.

The original generative-models (SGM) code saves `DiffusionEngine.state_dict()`: besides the weights it holds the
`DiscreteDenoiser` buffer `denoiser.sigmas` (sgm/modules/diffusionmodules/denoiser.py) and, when trained with EMA, the
`LitEma` copy `model_ema.<parameter name without dots>` plus `model_ema.decay` / `model_ema.num_updates`
(sgm/modules/ema.py); the CompVis LDM code (SD1/SD2) adds the DDPM schedule buffers of ldm/models/diffusion/ddpm.py.
These are accepted and listed once at load; a key no model has still fails loudly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from library.config.model import ModelConfig
from library.errors import ModelFileError
from library.models.single_file import load_single_file, model_to_ldm
from library.models.tiny import build_tiny

DDPM = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"]


def _ema(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LitEma's buffers for the UNet wrapper (`model`): shadow names are parameter names with the dots removed."""
    out = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1200, dtype=torch.int32)}
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            out["model_ema." + k.removeprefix("model.").replace(".", "")] = v.clone()
    return out


def _cfg(path, model) -> ModelConfig:
    return ModelConfig(pretrained_model_name_or_path=str(path), config_dir=str(model.config_dir))


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_a_file_in_the_original_codebase_layout_loads_and_lists_the_extras_once(tmp_path, capsys, family):
    model = build_tiny(family, seed=4)
    sd = {k: v.contiguous() for k, v in model_to_ldm(model).items()}
    ema = _ema(sd)
    if family == "sdxl":  # SGM DiffusionEngine: denoiser buffer (1000 discrete sigmas) + EMA
        extras = {"denoiser.sigmas": torch.linspace(14.6, 0.03, 1000), **ema}
        named = "denoiser.sigmas"
    else:  # CompVis LDM: the DDPM schedule buffers, logvar + EMA
        extras = {k: torch.linspace(1, 0, 1000) for k in DDPM + ["logvar"]} | ema
        named = ", ".join(sorted(DDPM + ["logvar"]))
    path = tmp_path / f"{family}_released.safetensors"
    save_file({**sd, **extras}, str(path))
    capsys.readouterr()
    loaded = load_single_file(path, _cfg(path, model))
    for mine, theirs in [(loaded.unet, model.unet), *zip(loaded.text_encoders, model.text_encoders)]:
        want = mine.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in theirs.state_dict().items())
    err = capsys.readouterr().err.strip().splitlines()
    n_ema = len(ema)
    assert err == [f"note: {path}: left out {len(extras)} keys that are not weights of the model (noise-schedule "
                   f"buffers of the code that trained it, EMA copies): {named}, model_ema.* ({n_ema} keys: the EMA "
                   "copy kept by the original trainer)"]


def test_our_own_files_load_without_a_note(tmp_path, capsys):
    model = build_tiny("sdxl", seed=4)
    path = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in model_to_ldm(model).items()}, str(path))
    capsys.readouterr()
    load_single_file(path, _cfg(path, model))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("stray", ["denoiser.log_sigma_table", "model.diffusion_model.extra.weight",
                                   "conditioner.embedders.2.weight"])
def test_a_truly_unknown_key_still_fails_naming_it(tmp_path, stray):
    model = build_tiny("sdxl", seed=4)
    sd = {k: v.contiguous() for k, v in model_to_ldm(model).items()}
    path = tmp_path / "odd.safetensors"
    save_file({**sd, "denoiser.sigmas": torch.ones(1000), stray: torch.zeros(3)}, str(path))
    with pytest.raises(ModelFileError, match=rf"odd\.safetensors: unexpected key '{stray}' \(1 keys no sdxl model has\)"):
        load_single_file(path, _cfg(path, model))
