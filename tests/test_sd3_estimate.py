"""The memory / FLOP estimate runs SD3's training step (MMDiT call, T5 tokens, cached text outputs) on fake tensors."""

from __future__ import annotations

import pytest

from library.config.network import NetworkConfig
from library.estimate.memory import EstimateSpec
from library.estimate.step import measure


@pytest.fixture
def tiny(tiny_sd3):
    return tiny_sd3  # the session's shared model (tests/conftest.py); the LoRA test injects into a copy


@pytest.mark.parametrize("cached", [False, True])
def test_lora_step_on_the_tiny_sd3(tiny, cached):
    from library.networks.lora import inject_network
    import copy

    net = NetworkConfig(network_dim=4, network_alpha=4, train_unet_only=True)
    spec = EstimateSpec(family="sd3", config_dir=tiny.config_dir, method="lora", network=net, resolution=(64, 64),
                        mixed_precision="no", cache_latents=cached, cache_text_outputs=cached)
    m = measure(spec)
    real = inject_network(copy.deepcopy(tiny), net)
    want = sorted(tuple(p.shape) for p in real.parameters())
    assert sorted(shape for shape, _ in m.trained) == want
    assert m.gradients == sum(p.numel() * 4 for p in real.parameters())  # fp32 LoRA grads, nothing else
    encoders = sum(p.numel() * 4 for te in tiny.text_encoders for p in te.parameters())
    transformer = sum(t.numel() * 4 for t in [*tiny.unet.parameters(), *tiny.unet.buffers()])
    resident = m.weights - sum(p.numel() * 4 for p in real.parameters())
    assert resident >= transformer + (0 if cached else encoders)
    assert m.flops > 0


def test_full_step_trains_the_transformer_only(tiny):
    spec = EstimateSpec(family="sd3", config_dir=tiny.config_dir, method="full", resolution=(64, 64),
                        mixed_precision="no", cache_latents=True, cache_text_outputs=True)
    m = measure(spec)
    assert m.gradients == sum(p.numel() * 4 for p in tiny.unet.parameters())
