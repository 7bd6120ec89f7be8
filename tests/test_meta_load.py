"""The meta-device load path (library/models/meta_load.py): exact tensors, one copy, clear mismatches, fallbacks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.config.model import ModelConfig
from library.errors import ModelFileError
from library.models.load import load_model
from library.models.meta_load import WeightsMismatch, assign_weights, empty, folder_weights, read_safetensors
from library.models.save import save_diffusers
from library.models.tiny import build_tiny


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0),
        "u8": torch.arange(9, dtype=torch.uint8),
    }


def test_read_safetensors_matches_the_library_and_is_aligned(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    ours, theirs = read_safetensors(path), load_file(str(path))
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])
        if ours[k].numel():
            assert ours[k].data_ptr() % 64 == 0, k  # what torch's own allocations give (see _read_aligned)


def test_read_safetensors_follows_a_shard_index(tmp_path):
    a, b = {"x": torch.ones(2)}, {"y": torch.full((3,), 4.0)}
    save_file(a, str(tmp_path / "m-00001.safetensors"))
    save_file(b, str(tmp_path / "m-00002.safetensors"))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "m-00001.safetensors", "y": "m-00002.safetensors"}}))
    got = read_safetensors(index)
    assert set(got) == {"x", "y"} and torch.equal(got["y"], b["y"])
    assert folder_weights(tmp_path, "m", None) == index  # no m.safetensors: the index
    assert folder_weights(tmp_path, "m", "fp16") is None
    (tmp_path / "m.fp16.safetensors.index.json").write_text(index.read_text())
    assert folder_weights(tmp_path, "m", "fp16") == tmp_path / "m.fp16.safetensors.index.json"


def test_read_safetensors_refuses_a_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match="t.safetensors"):
        read_safetensors(path)


def test_assign_weights_uses_the_tensors_given_and_casts_one_by_one():
    module = empty(lambda: torch.nn.Linear(4, 3))
    assert module.weight.device.type == "meta"
    state = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    ptr = state["weight"].data_ptr()
    assign_weights(module, dict(state))
    assert module.weight.data_ptr() == ptr and torch.equal(module.bias, state["bias"])  # no second copy
    half = empty(lambda: torch.nn.Linear(4, 3))
    assign_weights(half, dict(state), dtype=torch.float16)
    assert half.weight.dtype == torch.float16 and torch.equal(half.weight, state["weight"].half())


@pytest.mark.parametrize("bad, message", [
    ({"weight": torch.zeros(3, 4)}, "missing 'bias'"),
    ({"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "extra": torch.zeros(1)}, "unexpected 'extra'"),
    ({"weight": torch.zeros(4, 3), "bias": torch.zeros(3)}, r"'weight' has shape \[4, 3\], the config's model \[3, 4\]"),
])
def test_assign_weights_names_the_first_mismatch(bad, message):
    module = empty(lambda: torch.nn.Linear(4, 3))
    with pytest.raises(WeightsMismatch, match=message):
        assign_weights(module, bad)
    assert module.weight.device.type == "meta"  # checked before anything was assigned


def test_folder_with_pickled_weights_loads_through_from_pretrained(tmp_path):
    """A diffusers folder saved with .bin weights (older diffusers / transformers) still loads, identically."""
    model = build_tiny("sd1", seed=5)
    out = save_diffusers(model, tmp_path / "m", dtype=torch.float32)
    unet_file = out / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet_file)), out / "unet" / "diffusion_pytorch_model.bin")
    unet_file.unlink()
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(out)))
    for k, v in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v), k


def test_loaded_folder_has_no_empty_weight_and_keeps_position_ids(tmp_path):
    model = build_tiny("sdxl", seed=2)
    out = save_diffusers(model, tmp_path / "m", dtype=torch.float16)
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(out)))
    for module in (loaded.unet, loaded.vae, *loaded.text_encoders):
        assert all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))
        assert module.dtype == torch.float32
    for te in loaded.text_encoders:
        ids = dict(te.named_buffers())
        (pos,) = [v for k, v in ids.items() if k.endswith("position_ids")]
        assert torch.equal(pos, torch.arange(77).expand(1, -1))
        assert te.config.dtype == torch.float32


def test_dtype_none_keeps_the_stored_precision(tmp_path):
    """load_model(dtype=None): an fp16 folder stays fp16 (no full-precision copy of the weights is made)."""
    model = build_tiny("sd1", seed=1)
    out = save_diffusers(model, tmp_path / "m", dtype=torch.float16)
    loaded = load_model(ModelConfig(pretrained_model_name_or_path=str(out)), dtype=None)
    assert {m.dtype for m in (loaded.unet, loaded.vae, *loaded.text_encoders)} == {torch.float16}
    for k, v in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v.half()), k


@pytest.mark.parametrize("ref", ["tiny:sd2", "tiny:sdxl"])
def test_tokenizer_from_its_json_is_the_from_pretrained_one(ref, tmp_path):
    """Read straight from tokenizer.json (library/models/load.py _tokenizer): the same ids, special tokens and
    saved files as CLIPTokenizer.from_pretrained (SD2 / SDXL-2 pad with "!", the others with <|endoftext|>)."""
    from transformers import CLIPTokenizer

    from library.models.load import load_tokenizers, resolve_model_ref
    from library.models.diffusers_folder import save_tokenizer

    folder = resolve_model_ref(ref)
    subs = ["tokenizer", "tokenizer_2"][: 2 if ref == "tiny:sdxl" else 1]
    captions = ["a photo of a cat", "Ünïcödé  weird,,, text!!! " * 10, "", "1girl, solo, <|endoftext|> tag"]
    for sub, ours in zip(subs, load_tokenizers([folder / s for s in subs])):
        theirs = CLIPTokenizer.from_pretrained(folder / sub)
        assert type(ours) is type(theirs)
        for attr in ("pad_token", "bos_token", "eos_token", "unk_token", "model_max_length", "pad_token_id",
                     "padding_side", "truncation_side", "all_special_ids", "added_tokens_decoder"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        kw = dict(padding="max_length", max_length=77, truncation=True)
        assert ours(captions, **kw).input_ids == theirs(captions, **kw).input_ids
        save_tokenizer(ours, tmp_path / f"{sub}-ours")
        save_tokenizer(theirs, tmp_path / f"{sub}-theirs")
        for f in (tmp_path / f"{sub}-theirs").iterdir():
            assert (tmp_path / f"{sub}-ours" / f.name).read_bytes() == f.read_bytes(), f.name


def test_tokenizer_config_with_unknown_keys_goes_through_from_pretrained(tmp_path, monkeypatch):
    import shutil

    from transformers import CLIPTokenizer

    from library.models.load import load_tokenizers, resolve_model_ref

    folder = tmp_path / "tokenizer"
    shutil.copytree(resolve_model_ref("tiny:sd15") / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "some_future_option": 1}))
    calls = []
    real = CLIPTokenizer.from_pretrained.__func__
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: calls.append(a) or real(cls, *a, **k)))
    (tok,) = load_tokenizers([folder])
    assert calls == [(folder,)] and tok.model_max_length == 77
