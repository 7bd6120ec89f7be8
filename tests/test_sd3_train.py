"""SD3 on the one engine (issue 17): train_lora.py / train_native.py on `tiny:sd3` through the same Trainer, the
LoRA file diffusers' StableDiffusion3Pipeline.load_lora_weights reproduces, exact resume after SIGKILL, methods that
do not apply refused before loading, and the --dry-run estimate of a full-size SD3.5 layout."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.training import faults
from library.training.state import list_states
from tests.test_sd3_lora import _pipeline  # the pipeline over a model's live modules
from tests.tinyrun import final_trainable, main_in_fork, main_in_process, train_in_process, write_config

SD3 = {"model": {"pretrained_model_name_or_path": "tiny:sd3"}, "optimizer": {"learning_rate": 2e-3},
       "data": {"batch_size": 4, "cache_latents": True}}
COMFY_PREFIXES = ("transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.")  # comfy/lora.py's SD3 map
CONFIGS = Path(__file__).resolve().parent.parent / "library" / "models" / "configs"


def _lora(tmp_path, steps: int, **tables):
    tmp_path.mkdir(parents=True, exist_ok=True)
    merged = {**SD3, "train": {"max_train_steps": steps}, "network": {"network_dim": 8, "network_alpha": 8.0},
              **tables}
    return write_config(tmp_path / "run.toml", tmp_path / "out", "lora", **merged)


def _outputs(pipe, tokens: int):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    prompt = "a red circle on a white background"
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                                  max_sequence_length=tokens)
        out = pipe.transformer(hidden_states=latents, timestep=torch.tensor([400.0]), encoder_hidden_states=hidden,
                               pooled_projections=pooled).sample
    return hidden, pooled, out


def test_lora_trains_and_diffusers_reproduces_the_trained_model(tmp_path):
    from library.config.model import ModelConfig
    from library.models.load import load_model
    from library.models.sd3.text import t5_tokens

    result = train_in_process("lora", _lora(tmp_path, 40))
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]), result.losses
    keys = load_file(str(result.result_path)).keys()
    assert keys and all(k.startswith(COMFY_PREFIXES) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    trained = result.model
    for m in (trained.unet, *trained.text_encoders):
        m.eval()
    tokens = t5_tokens(trained)
    want = _outputs(_pipeline(trained), tokens)
    pipe = _pipeline(load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd3")))
    before = _outputs(pipe, tokens)
    pipe.load_lora_weights(str(result.result_path))
    got = _outputs(pipe, tokens)
    for w, g, b in zip(want, got, before):
        assert not torch.allclose(w, b, atol=1e-4)  # training moved every output
        assert torch.allclose(w, g, atol=1e-5, rtol=0)


def test_sd_scripts_layout_on_request(tmp_path):
    result = train_in_process("lora", _lora(tmp_path, 2, save={"save_state": False}),
                              network={"network_dim": 8, "sd3_layout": "sd_scripts"})
    keys = set(load_file(str(result.result_path)))
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys


@pytest.mark.parametrize("method", ["ti", "hn"])
def test_methods_that_do_not_apply_are_refused_before_loading(tmp_path, capsys, method):
    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", method, **SD3)
    capsys.readouterr()
    assert main_in_process(method, cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not apply to Stable Diffusion 3 / 3.5" in err[0], err


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    tables = {"train": {"max_train_steps": 6, "gradient_accumulation_steps": 2}, "save": {"save_every_n_steps": 2}}
    ref_cfg = _lora(tmp_path / "ref", 6, **tables)
    reference = train_in_process("lora", ref_cfg)
    cfg = _lora(tmp_path / "killed", 6, **tables)
    assert main_in_fork("lora", cfg, env={faults.KILL_AT: "step:5"}) == -signal.SIGKILL
    out = tmp_path / "killed" / "out"
    assert [p.name for p in list_states(out)][-1] == "step-00000004"
    resumed = train_in_process("lora", cfg, train={"resume": "auto"})
    assert resumed.steps == reference.steps == 6
    a, b = final_trainable(tmp_path / "ref" / "out"), final_trainable(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = load_file(str(reference.result_path)), load_file(str(resumed.result_path))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


def redness(images) -> float:
    a = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return float((a[..., 0] - a[..., 2]).mean())


@pytest.mark.slow
def test_native_fine_tune_learns_colours_from_the_captions(tmp_path):
    """As the SD1 acceptance test: 300 full fine-tune steps make "a red ..." samples redder than "a blue ..." ones."""
    from library.training.sample import SamplePrompt, generate

    cfg = write_config(tmp_path / "run.toml", tmp_path / "out", "native", **{
        **SD3, "train": {"max_train_steps": 300, "seed": 1}, "optimizer": {"learning_rate": 1e-3},
        "save": {"save_state": False}})
    result = train_in_process("native", cfg)
    first, last = np.mean(result.losses[:30]), np.mean(result.losses[-30:])
    assert last < 0.7 * first, (first, last)

    def samples(colour):
        prompts = [SamplePrompt(f"a {colour} {shape} on a white background", width=64, height=64, steps=15,
                                cfg_scale=4.0, seed=i) for i, shape in enumerate(["circle", "square", "triangle", "star"])]
        return generate(result.model, prompts, sampler="euler", base_seed=0)

    red, blue = samples("red"), samples("blue")
    per_seed = [redness([r]) - redness([b]) for r, b in zip(red, blue)]
    assert min(per_seed) > 0 and np.mean(per_seed) > 20, per_seed


@pytest.mark.slow
def test_dry_run_estimates_sd35_medium_without_weights(tmp_path, capsys):
    import train_lora

    cfg = Path(__file__).resolve().parent.parent / "configs" / "sd35m_lora.toml"
    rc = train_lora.main(["--config", str(cfg), "--dry-run", f"--model.pretrained_model_name_or_path={CONFIGS / 'sd35_medium'}",
                          "--data.train_data_dir=demo:shapes", f"--save.output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 0 and "Stable Diffusion 3 / 3.5" in out and "RTX 4090 24 GB" in out, out
