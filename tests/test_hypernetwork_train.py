"""End to end: train_hypernetwork.py on the embedded tiny models and the demo concept sets."""

import hashlib

import numpy as np
import pytest
import torch

from library.config.core import load_config
from library.config.hypernetwork import HypernetworkRunConfig
from library.config.model import ModelConfig
from library.models.load import load_model
from library.networks.hypernetwork import apply_hypernetwork, attention_widths
from library.networks.hypernetwork_file import load_hypernetwork
from library.training.run import run_training
from library.methods.hypernetwork import HypernetworkTraining, make_method


class Kept(HypernetworkTraining):
    """Keeps the trained model so a test can look at it after run_training."""

    def setup(self, model):
        self.model = model
        return super().setup(model)


def hn_cfg(out, steps: int, ref="tiny:sd15", **tables) -> HypernetworkRunConfig:
    data = {
        "model": {"pretrained_model_name_or_path": ref},
        "data": {"train_data_dir": "demo:red", "resolution": 64, "batch_size": 4, "min_bucket_reso": 64,
                 "max_bucket_reso": 128, "num_workers": 0},
        "train": {"max_train_steps": steps, "seed": 1},
        "optimizer": {"learning_rate": 3e-3},
        "save": {"output_dir": str(out), "output_name": "hn", "save_precision": "fp32"},
        "log": {"progress_bar": False, "log_with": "none"},
    }
    for table, values in tables.items():
        data.setdefault(table, {}).update(values)
    return load_config(HypernetworkRunConfig, data, source="test")


def train(cfg):
    method = Kept(cfg.hypernetwork, cfg.optimizer, cfg.save.save_precision)
    return method, run_training(cfg, method, script="train_hypernetwork.py")


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every UNet / VAE / text-encoder weight, without the hypernetwork pairs living in the attention processors."""
    out = {}
    for prefix, module in [("unet", model.unet), ("vae", model.vae),
                           *[(f"te{i}", e) for i, e in enumerate(model.text_encoders)]]:
        out.update({f"{prefix}.{k}": v for k, v in module.state_dict().items() if ".processor." not in k})
    return out


def unet_out(unet, ctx_dim, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([20, 700]), encoder_hidden_states=ctx).sample


def test_run_file_base_unchanged_outputs_reproduced_and_exact_resume(tmp_path):
    hn_table = {"activation_func": "relu", "add_layer_norm": True, "sample_strength": 0.6}
    cfg = hn_cfg(tmp_path / "a", 4, hypernetwork=hn_table, save={"save_every_n_steps": 2},
                 sample={"prompts": ["a circle --s 2 --d 1"], "steps": 2})
    method, result = train(cfg)
    out = tmp_path / "a"
    assert result.steps == 4 and all(np.isfinite(result.losses))
    assert result.result_path == out / "hn.pt" and (out / "hn-step00000002.pt").is_file()
    assert (out / "sample" / "final_step00000004_00.png").is_file() and (out / "hn.config.toml").is_file()

    raw = torch.load(result.result_path, weights_only=True)  # how ComfyUI reads it
    optim = torch.load(out / "hn.pt.optim", weights_only=True)  # A1111's optimizer sidecar
    assert optim["hash"] == hashlib.sha256(result.result_path.read_bytes()).hexdigest()[:10]
    assert optim["optimizer_name"] == "AdamW" and optim["optimizer_state_dict"]["state"]
    fresh = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15"))
    assert [k for k in raw if isinstance(k, int)] == attention_widths(fresh.unet)
    assert (raw["step"], raw["name"], raw["activation_func"], raw["is_layer_norm"]) == (4, "hn", "relu", True)
    assert raw["sdtk_metadata"]["sdtk_script"] == "train_hypernetwork.py"

    # The base model is bit-identical after training (only the hypernetwork trained).
    trained_model, before = method.model, base_weights(fresh)
    after = base_weights(trained_model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    # The file, applied to a fresh UNet, reproduces the trained UNet exactly (at the sampling strength).
    hn, info = load_hypernetwork(result.result_path)
    apply_hypernetwork(fresh.unet, hn, strength=0.6)
    ctx_dim = fresh.unet.config.cross_attention_dim
    trained_out = unet_out(trained_model.unet, ctx_dim)
    assert torch.equal(unet_out(fresh.unet, ctx_dim), trained_out)
    hn.set_multiplier(0.0)
    assert not torch.allclose(unet_out(fresh.unet, ctx_dim), trained_out, atol=1e-5)  # strength matters

    # Resuming from the step-2 state ends bit-identical to the uninterrupted run.
    resumed_cfg = hn_cfg(tmp_path / "b", 4, hypernetwork=hn_table,
                         train={"resume": str(out / "state" / "step-00000002")})
    _, resumed = train(resumed_cfg)
    again = torch.load(resumed.result_path, weights_only=True)
    assert again["step"] == 4 and resumed.steps == 4 and len(resumed.losses) == 2
    for width in attention_widths(fresh.unet):
        for a, b in zip(raw[width], again[width]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Continuing the A1111 file: its structure, name and step count carry on.
    cont_cfg = hn_cfg(tmp_path / "c", 2, hypernetwork={"network_weights": str(result.result_path)},
                      save={"output_name": "more"})
    _, cont = train(cont_cfg)
    more = torch.load(cont.result_path, weights_only=True)
    assert (more["step"], more["name"], more["activation_func"]) == (6, "hn", "relu")
    assert not torch.equal(more[ctx_dim][0]["linear.0.weight"], raw[ctx_dim][0]["linear.0.weight"])


@pytest.mark.slow
def test_resume_with_dropout_is_exact(tmp_path):
    table = {"use_dropout": True, "dropout_structure": [0, 0.3, 0]}
    _, a = train(hn_cfg(tmp_path / "a", 4, hypernetwork=table, save={"save_every_n_steps": 2}))
    _, b = train(hn_cfg(tmp_path / "b", 4, hypernetwork=table,
                        train={"resume": str(tmp_path / "a" / "state" / "step-00000002")}))
    ra, rb = (torch.load(r.result_path, weights_only=True) for r in (a, b))
    assert all(torch.equal(x[k], y[k]) for w in ra if isinstance(w, int) for x, y in zip(ra[w], rb[w]) for k in x)


def test_sdxl_run_has_sdxl_widths_and_loads_on_a_diffusers_unet(tmp_path):
    cfg = hn_cfg(tmp_path, 2, ref="tiny:sdxl", hypernetwork={"layer_structure": [1, 1.5, 1]})
    method, result = train(cfg)
    raw = torch.load(result.result_path, weights_only=True)
    widths = attention_widths(method.model.unet)
    assert [k for k in raw if isinstance(k, int)] == widths and raw["sdtk_metadata"]["sdtk_family"] == "sdxl"
    hn, _ = load_hypernetwork(result.result_path)
    fresh = load_model(ModelConfig(pretrained_model_name_or_path="tiny:sdxl"))
    assert len(apply_hypernetwork(fresh.unet, hn)) == sum(1 for _ in fresh.unet.attn_processors)


def redness(images) -> float:
    a = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return float((a[..., 0] - a[..., 2]).mean())


@pytest.mark.slow
def test_training_on_red_shifts_samples_to_red(tmp_path):
    """Red shapes whose captions never say 'red': samples with the hypernetwork are redder than without it, on a
    base that already draws the shapes (tests/colour_base.py; on the random tiny UNet the text hardly matters)."""
    from library.training.sample import SamplePrompt, generate
    from tests.colour_base import colour_base

    base = colour_base()
    cfg = hn_cfg(tmp_path, 200, model=base, save={"save_state": False})
    method, result = train(cfg)
    model = method.model
    prompts = [SamplePrompt(f"a {s} on a white background", width=64, height=64, steps=15, cfg_scale=4.0, seed=i)
               for i, s in enumerate(["circle", "square", "triangle", "star"])]
    model.unet.eval()
    with_hn = generate(model, prompts, sampler="ddim", base_seed=0)
    without = generate(load_model(ModelConfig(**base)), prompts, sampler="ddim", base_seed=0)
    shifts = [redness([a]) - redness([b]) for a, b in zip(with_hn, without)]
    # mean (R - B) on a 0-255 scale; measured 4.2, 9.7, 14.5, 5.3 (400 steps: 3.6, 16.7, 13.3, 19.0; a hypernetwork
    # learns slowly: lr 1e-2 diverges)
    assert min(shifts) > 0 and np.mean(shifts) > 4, shifts
