"""validation_loss with a real (tiny) model: the batches ValidationData makes run through the VAE, the text encoder
and the UNet, the figure is repeatable bit for bit, and it falls when the model learns the images (issue 21 item 8)."""

from __future__ import annotations

import pytest
import torch

from library.config.data import DataConfig
from library.config.diffusion import LossConfig, NoiseConfig
from library.data.loader import build_train_data
from library.diffusion.objective import Objective
from library.models.text import encode_text, tokenize
from library.models.tiny import build_tiny
from library.training.validation import validation_loss


@pytest.mark.slow  # 25-40 s on 2 shared cores: three validation passes and 12 training steps
def test_validation_loss_of_a_tiny_model_is_repeatable_and_falls_with_training():
    model = build_tiny("sd1")
    data = build_train_data(DataConfig(train_data_dir="demo:shapes", resolution=64, batch_size=2, min_bucket_reso=64,
                                       max_bucket_reso=64, num_workers=0, validation_split=0.1),
                            default_resolution=64, seed=0)
    val = data.validation
    objective = Objective(NoiseConfig(), LossConfig(), model.prediction_type, native_resolution=64)

    def denoise(batch, noisy, timesteps):
        hidden = encode_text(model, tokenize(model, batch["captions"])).hidden
        return model.unet(noisy, timesteps, encoder_hidden_states=hidden).sample

    def encode(pixels, generator):
        dist = model.vae.encode(pixels).latent_dist
        return dist.sample(generator=generator) * model.vae.config.scaling_factor

    before = validation_loss(val, denoise, objective, seed=0, encode=encode)
    torch.randn(100)  # training's own draws in between change nothing
    assert validation_loss(val, denoise, objective, seed=0, encode=encode) == before
    assert before.samples == 6 and len(before.per_timestep) == 4

    # Learn the validation images themselves (an overfit on purpose): their loss must fall.
    unet = model.unet.train().requires_grad_(True)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    batches = list(val)
    for step in range(12):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            latents = encode(batch["pixels"], g)
        prepared = objective.prepare(latents, g)
        loss, _ = objective.loss(denoise(batch, prepared.noisy_latents, prepared.timesteps).float(), prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    after = validation_loss(val, denoise, objective, seed=0, encode=encode)
    assert after.loss < 0.8 * before.loss, (before, after)  # measured 1.036 -> 0.673
