"""Single-file save/load: our files load in diffusers' own single-file loader with identical outputs (the project's
interop acceptance test), our loader reads them back exactly, and bad files fail with ModelFileError."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from library.config.model import ModelConfig
from library.errors import ModelFileError
from library.models.single_file import (
    SD2_TE, SD2_V_PROBE, V_PRED_KEY, ZTSNR_KEY, detect_family, detect_prediction, load_single_file, model_to_ldm, save_single_file,
)
from library.models.tiny import build_tiny

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (tiny model, path of its fp32 single file)."""
    out = {}
    root = tmp_path_factory.mktemp("single")
    for family in FAMILIES:
        model = build_tiny(family, seed=3)
        path = root / f"{family}.safetensors"
        save_single_file(model, path, dtype=torch.float32, metadata={"note": "test"})
        out[family] = (model, path)
    return out


def _cfg(path, model=None, **kw) -> ModelConfig:
    return ModelConfig(pretrained_model_name_or_path=str(path), config_dir=str(model.config_dir) if model else "", **kw)


@torch.no_grad()
def _outputs(family, unet, vae, text_encoders) -> dict[str, torch.Tensor]:
    """Deterministic outputs of every part on fixed inputs (fp32).

    Every module is set to requires_grad=False first: on CPU, torch picks a different (equally valid) linear kernel
    for weights that require grad even under no_grad, which alone changes results by ~1 ulp.
    """
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    out: dict[str, torch.Tensor] = {}
    hidden = []
    for i, te in enumerate(text_encoders):
        r = te(ids, output_hidden_states=True)
        out[f"te{i}"] = r.last_hidden_state
        out[f"te{i}_penultimate"] = r.hidden_states[-2]
        hidden.append(r.hidden_states[-2])
        if hasattr(r, "text_embeds"):
            out[f"te{i}_pooled"] = r.text_embeds
    context = torch.cat(hidden, dim=-1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": out["te1_pooled"],
                                       "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    out["unet"] = unet(x, torch.tensor([10, 900]), encoder_hidden_states=context, **kwargs).sample
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    out["vae_encode"] = vae.encode(img).latent_dist.mean
    out["vae_decode"] = vae.decode(out["vae_encode"]).sample
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {float((a[k] - b[k]).abs().max())})"


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_from_single_file_gives_identical_outputs(saved, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model, path = saved[family]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(model.config_dir), local_files_only=True,
                                torch_dtype=torch.float32)
    theirs = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for a, b in [(model.unet, pipe.unet), (model.vae, pipe.vae), *zip(model.text_encoders, theirs)]:
        sa, sb = a.state_dict(), b.state_dict()  # every weight diffusers reads is ours, bit for bit
        assert all(torch.equal(sa[k], sb[k]) for k in sb), family
    ours, got = (_outputs(family, model.unet, model.vae, model.text_encoders),
                 _outputs(family, pipe.unet, pipe.vae, theirs))
    # Equal weights in buffers of another alignment may take another SIMD path: seen 7.5e-7 on the sd1 UNet.
    assert ours.keys() == got.keys() and all(torch.allclose(ours[k], got[k], rtol=0, atol=1e-5) for k in ours)


@pytest.mark.parametrize("family", FAMILIES)
def test_own_loader_round_trip_is_exact(saved, family):
    model, path = saved[family]
    loaded = load_single_file(path, _cfg(path, model))
    assert (loaded.family, loaded.prediction_type) == (family, model.prediction_type)
    assert loaded.extra["file_metadata"]["note"] == "test"
    for a, b in [(model.unet, loaded.unet), (model.vae, loaded.vae), *zip(model.text_encoders, loaded.text_encoders)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    _assert_same(_outputs(family, model.unet, model.vae, model.text_encoders),
                 _outputs(family, loaded.unet, loaded.vae, loaded.text_encoders))


def test_file_layout_markers_and_dtypes(saved, tmp_path):
    from safetensors import safe_open

    model, _ = saved["sd2"]  # tiny SD2 default: v-prediction
    path = tmp_path / "half.safetensors"
    model.extra["zero_terminal_snr"] = True
    try:
        save_single_file(model, path, dtype=torch.bfloat16)
    finally:
        del model.extra["zero_terminal_snr"]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["modelspec.prediction_type"] == "v"
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.bfloat16
        assert f.get_tensor(SD2_TE + "logit_scale").dtype == torch.bfloat16
    assert {V_PRED_KEY, ZTSNR_KEY} <= keys
    # SD2: the text encoder's 3 layers plus the padding layer (a copy of the last), as released files hold 24 of 23
    layers = {k.split(".")[4] for k in keys if k.startswith(SD2_TE + "transformer.resblocks.")}
    assert layers == {"0", "1", "2", "3"}
    sd = model_to_ldm(model)
    pre = SD2_TE + "transformer.resblocks."
    assert torch.equal(sd[pre + "3.attn.in_proj_weight"], sd[pre + "2.attn.in_proj_weight"])
    assert torch.equal(sd[SD2_TE + "text_projection"], torch.eye(80))
    loaded = load_single_file(path, _cfg(path, model))
    assert loaded.prediction_type == "v_prediction"
    assert loaded.extra["zero_terminal_snr"] and loaded.scheduler_config["rescale_betas_zero_snr"]
    assert loaded.unet.conv_in.weight.dtype == torch.bfloat16  # tensors keep the file's dtype


def test_prediction_type_evidence_and_config_override(saved, tmp_path):
    model, path = saved["sd1"]
    assert load_single_file(path, _cfg(path, model)).prediction_type == "epsilon"
    assert load_single_file(path, _cfg(path, model, v_parameterization=True)).prediction_type == "v_prediction"
    # SD2 file without marker or metadata: ComfyUI's probe (std of one norm bias > 0.09 means v); config overrides
    sd2, _ = saved["sd2"]
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in model_to_ldm(sd2).items() if k != V_PRED_KEY}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))  # fresh init: that bias is all zeros, as in an epsilon-trained file it is small
    assert load_single_file(bare, _cfg(bare, sd2)).prediction_type == "epsilon"
    tensors[SD2_V_PROBE] = torch.tensor([0.1, -0.1]).repeat(tensors[SD2_V_PROBE].numel() // 2)  # std exactly 0.1
    save_file(tensors, str(bare))
    assert load_single_file(bare, _cfg(bare, sd2)).prediction_type == "v_prediction"
    assert load_single_file(bare, _cfg(bare, sd2, prediction_type="epsilon")).prediction_type == "epsilon"
    del tensors[SD2_V_PROBE]  # no probe key (not a released layout): SD2.x 768 default
    assert detect_prediction(tensors, "sd2", None) == "v_prediction"


def test_pickle_checkpoint_loads_through_weights_only(saved, tmp_path):
    model, _ = saved["sd1"]
    path = tmp_path / "model.ckpt"
    sd = model_to_ldm(model)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # a listed non-weight extra, ignored
    sd["model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": sd, "global_step": 10}, path)
    loaded = load_single_file(path, _cfg(path, model))
    assert torch.equal(loaded.unet.conv_in.weight, model.unet.conv_in.weight)


def test_family_mismatch_and_detection(saved):
    model, path = saved["sdxl"]
    with pytest.raises(ModelFileError, match=r"sdxl.safetensors.*model.family = 'sd1'.*sdxl"):
        load_single_file(path, _cfg(path, model, family="sd1"))
    assert detect_family(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert detect_family(["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert detect_family(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert detect_family(["model.diffusion_model.out.2.weight"]) is None


def test_wrong_shape_unexpected_and_missing_keys_name_file_and_key(saved, tmp_path):
    from safetensors.torch import save_file

    model, _ = saved["sd1"]
    base = {k: v.contiguous() for k, v in model_to_ldm(model).items()}
    cases = {
        "shape": ({**base, "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 1, 1)},
                  r"shape\.safetensors: key 'model\.diffusion_model\.out\.2\.weight' has shape \[4, 32, 1, 1\]"),
        "stray": ({**base, "model.diffusion_model.extra.weight": torch.zeros(1)},
                  r"stray\.safetensors: unexpected key 'model\.diffusion_model\.extra\.weight'"),
        "missing": ({k: v for k, v in base.items() if k != "first_stage_model.quant_conv.bias"},
                    r"missing\.safetensors: missing key 'first_stage_model\.quant_conv\.bias'"),
    }
    for name, (sd, pattern) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(sd, str(path))
        with pytest.raises(ModelFileError, match=pattern):
            load_single_file(path, _cfg(path, model))


def test_malformed_header_is_a_model_file_error(saved, tmp_path):
    model, path = saved["sd1"]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.diffusion_model.out.2.bias"]["data_offsets"] = [0, 10 ** 12]
    text = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: malformed safetensors header at key "
                                             r"'model\.diffusion_model\.out\.2\.bias'"):
        load_single_file(bad, _cfg(bad, model))


def test_save_is_atomic_and_refuses_pickles(saved, tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = saved["sd1"]
    with pytest.raises(ModelFileError, match=r"\.safetensors only"):
        save_single_file(model, tmp_path / "m.ckpt")
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_single_file(model, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
