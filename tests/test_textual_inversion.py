"""Textual inversion: token names and captions (exact), the row guard, embedding files (A1111 / diffusers rules),
safe loading, and adding the token to a tiny model's tokenizer and text encoder."""

import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.config.core import load_config
from library.config.embedding import TextualInversionConfig
from library.errors import ConfigError, ModelFileError
from library.networks import embeddings as ti

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# ---- a reader written from DESIGN.md's rules (not from our writer) ----

def a1111_read(data: dict) -> dict[str, torch.Tensor]:
    """What A1111 accepts: string_to_param with exactly one term; a dict with clip_g and clip_l (SDXL); or a dict
    whose single value is a tensor. A second key breaks the single-key rule."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        return {"te": next(iter(params.values()))}
    if "clip_g" in data and "clip_l" in data:
        assert all(isinstance(v, torch.Tensor) for v in data.values())
        return {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    assert isinstance(next(iter(data.values())), torch.Tensor)
    assert len(data) == 1, "embedding file has multiple terms in it"
    return {"te": next(iter(data.values()))}


def test_a1111_reader_refuses_a_second_key():
    with pytest.raises(AssertionError, match="multiple terms"):
        a1111_read({"emb_params": torch.zeros(1, 4), "other": torch.zeros(1, 4)})


# ---- names and captions ----

def test_token_names_and_expansion():
    assert ti.token_names("<t>", 1) == ["<t>"]
    assert ti.token_names("<t>", 3) == ["<t>", "<t>_1", "<t>_2"]
    assert ti.expand_token("a <t> and <t>, <t>_1", "<t>", 3) == "a <t> <t>_1 <t>_2 and <t> <t>_1 <t>_2, <t>_1"
    assert ti.expand_token("a <t>", "<t>", 1) == "a <t>"


def test_caption_with_token():
    assert ti.caption_with_token("a sks dog, sksx", "<t>", "sks") == "a <t> dog, sksx"
    assert ti.caption_with_token("photo of <t> on grass", "<t>", "") == "photo of <t> on grass"
    assert ti.caption_with_token("a dog", "<t>", "sks") == "<t>, a dog"  # replace word absent: token in front
    assert ti.caption_with_token("  ", "<t>", "") == "<t>"


def test_render_captions_caption_and_templates():
    rng = random.Random(0)
    assert ti.render_captions(["a sks cat", "a dog"], "caption", "<t>", 2, "sks", rng) == [
        "a <t> <t>_1 cat", "<t> <t>_1, a dog"]
    got = ti.render_captions(["x"] * 3, "object", "<t>", 1, "", random.Random(7))
    assert got == ti.render_captions(["y"] * 3, "object", "<t>", 1, "", random.Random(7))  # caption text ignored
    assert all(g in [t.format("<t>") for t in ti.OBJECT_TEMPLATES] for g in got)
    style = ti.render_captions(["x"] * 40, "style", "<s>", 2, "", random.Random(1))
    assert all(s.endswith("style of <s> <s>_1") for s in style) and len(set(style)) > 5
    with pytest.raises(ValueError):
        ti.render_captions(["x"], "poem", "<t>", 1, "", rng)


def test_cycled_rows_exact():
    w = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(ti.cycled_rows(w, [4, 1], 3), torch.tensor([[8.0, 9.0], [2.0, 3.0], [8.0, 9.0]]))
    assert torch.equal(ti.cycled_rows(w, [5, 2, 3], 2), torch.tensor([[10.0, 11.0], [4.0, 5.0]]))


# ---- training only the new rows ----

def _step_embedding(guarded: bool, weight_decay: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    before = emb.weight.detach().clone()
    guard = ti.RowGuard(emb.weight, [8, 9]) if guarded else None
    opt = torch.optim.AdamW([emb.weight], lr=0.1, weight_decay=weight_decay)
    if guard:
        guard.snapshot()
    for _ in range(3):
        emb(torch.tensor([[1, 8, 2, 9]])).pow(2).sum().backward()  # rows 1 and 2 get gradients too
        if guard:
            assert emb.weight.grad[:8].abs().sum() == 0 and emb.weight.grad[8:].abs().sum() > 0
        opt.step()
        opt.zero_grad()
        if guard:
            guard.restore()
    return before, emb.weight.detach()


def test_row_guard_keeps_other_rows_bit_identical_under_weight_decay():
    before, after = _step_embedding(guarded=True)
    assert torch.equal(after[:8], before[:8])
    assert not torch.equal(after[8:], before[8:])
    # Without the guard the same steps move the caption's other rows and (weight decay) every row.
    before, unguarded = _step_embedding(guarded=False)
    assert not torch.equal(unguarded[1], before[1]) and not torch.equal(unguarded[5], before[5])


def test_row_guard_rows_and_set_rows():
    emb = torch.nn.Embedding(5, 3)
    guard = ti.RowGuard(emb.weight, [3, 4])
    guard.set_rows(torch.ones(2, 3))
    assert torch.equal(guard.rows(), torch.ones(2, 3)) and torch.equal(emb.weight[3], torch.ones(3))
    with pytest.raises(RuntimeError):
        guard.restore()


# ---- files ----

def test_safetensors_sd_single_key_round_trip(tmp_path):
    vec = torch.randn(3, 768)
    path = ti.save_embedding(tmp_path / "e.safetensors", [vec], "sd1", layout="safetensors", name="<t>", step=5,
                             metadata={"sdtk_step": "5"})
    data = load_file(str(path))
    assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], vec)
    assert torch.equal(a1111_read(data)["te"], vec)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"sdtk_step": "5"}
    (back,) = ti.embedding_vectors(ti.read_embedding_file(path), "sd1", [768], str(path))
    assert torch.equal(back, vec)


def test_safetensors_sdxl_round_trip(tmp_path):
    l, g = torch.randn(2, 768), torch.randn(2, 1280)
    path = ti.save_embedding(tmp_path / "e.safetensors", [l, g], "sdxl", layout="safetensors", name="<t>", step=1)
    data = load_file(str(path))
    assert sorted(data) == ["clip_g", "clip_l"] and data["clip_l"].shape == (2, 768)
    read = a1111_read(data)
    assert torch.equal(read["clip_l"], l) and torch.equal(read["clip_g"], g)
    back = ti.embedding_vectors(ti.read_embedding_file(path), "sdxl", [768, 1280], "f")
    assert torch.equal(back[0], l) and torch.equal(back[1], g)


def test_a1111_pt_layout_round_trip(tmp_path):
    vec = torch.randn(2, 1024)
    path = ti.save_embedding(tmp_path / "e.pt", [vec], "sd2", layout="pt", name="<t>", step=7,
                             checkpoint_name="v2-1_768")
    data = torch.load(path, weights_only=True)  # only tensors and plain values were pickled
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["name"] == "<t>" and data["step"] == 7
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] == "v2-1_768"
    assert type(data["string_to_param"]["*"]) is torch.Tensor and torch.equal(a1111_read(data)["te"], vec)
    (back,) = ti.embedding_vectors(ti.read_embedding_file(path), "sd2", [1024], str(path))
    assert torch.equal(back, vec)


def test_star_token_id_is_clips():
    from transformers import CLIPTokenizer

    from library.models.configs import CONFIGS_ROOT

    tok = CLIPTokenizer.from_pretrained(str(CONFIGS_ROOT / "clip_tokenizer"))
    assert tok("*", add_special_tokens=False).input_ids == [ti.A1111_STAR_TOKEN]


def test_other_files_read_as_embeddings():
    # A diffusers-concept file (one tensor under the token's name), and a 1-D vector.
    vec = torch.arange(768.0)
    (v,) = ti.embedding_vectors({"<cat-toy>": vec}, "sd1", [768], "f")
    assert v.shape == (1, 768) and torch.equal(v[0], vec)
    rows = torch.randn(2, 768).half()  # a diffusers-concept file with two vectors, saved in fp16: read as fp32
    (v,) = ti.embedding_vectors({"<cat-toy>": rows}, "sd1", [768], "f")
    assert v.dtype == torch.float32 and torch.equal(v, rows.float())


@pytest.mark.parametrize("data, family, widths, message", [
    ({"emb_params": torch.zeros(1, 768)}, "sdxl", [768, 1280], "SD1/SD2 .* model is sdxl"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "sd1", [768], "SDXL .* model is sd1"),
    ({"emb_params": torch.zeros(1, 1024)}, "sd1", [768], "1024 wide .* 768 wide; .* made for SD2.x"),
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1024)}, "sdxl", [768, 1280], "clip_g are 1024 wide"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(1, 1280)}, "sdxl", [768, 1280], "different vector"),
    ({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, "sd1", [768], "not an embedding.*'a', 'b'"),
    ({"string_to_param": {"*": torch.zeros(1, 768), "x": torch.zeros(1, 768)}}, "sd1", [768], "exactly one term"),
    ({"emb_params": torch.zeros(1, 2, 768)}, "sd1", [768], "not a \\[vectors, width\\]"),
])
def test_mismatched_embeddings_are_refused(data, family, widths, message):
    with pytest.raises(ModelFileError, match=message):
        ti.embedding_vectors(data, family, widths, "emb.pt")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": payload}}, f)
    with pytest.raises(ModelFileError, match="refused to load"):
        ti.read_embedding_file(path)
    assert not marker.exists()
    with pytest.raises(ModelFileError, match="does not exist"):
        ti.read_embedding_file(tmp_path / "missing.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    with pytest.raises(ModelFileError):
        ti.read_embedding_file(tmp_path / "bad.safetensors")


# ---- the token in a tiny model ----

@pytest.fixture(scope="module")
def tiny_sd15():
    from library.config.model import ModelConfig
    from library.models.load import load_model

    return lambda: load_model(ModelConfig(pretrained_model_name_or_path="tiny:sd15"))


def test_add_token_initialises_from_init_word_cycled(tiny_sd15):
    model = tiny_sd15()
    tok, enc = model.tokenizers[0], model.text_encoders[0]
    base = enc.get_input_embeddings().weight.detach().clone()
    init_ids = tok("red shape", add_special_tokens=False).input_ids
    assert len(init_ids) == 2
    ids = ti.add_token(tok, enc, "<r>", 3, "red shape")
    assert ids == [49408, 49409, 49410]
    weight = enc.get_input_embeddings().weight.detach()
    assert weight.shape == (49411, base.shape[1])
    assert torch.equal(weight[:49408], base)
    assert torch.equal(weight[ids], base[[init_ids[0], init_ids[1], init_ids[0]]])
    text = ti.expand_token("a <r> on grass", "<r>", 3)
    assert tok(text).input_ids == [49406, 320, 49408, 49409, 49410, *tok("on grass", add_special_tokens=False)
                                   .input_ids, 49407]
    with pytest.raises(ConfigError, match="already a token"):
        ti.add_token(tok, enc, "<r>", 1, "red")
    with pytest.raises(ConfigError, match="has no tokens"):
        ti.add_token(tok, enc, "<q>", 1, "   ")


def test_method_setup_from_file_in_either_layout(tiny_sd15, tmp_path):
    from library.methods.textual_inversion import make_method

    vec = torch.randn(2, 48)
    for layout in ("safetensors", "pt"):
        path = ti.save_embedding(tmp_path / f"e.{layout}", [vec], "sd1", layout=layout, name="<t>", step=3)
        cfg = load_config(TextualInversionConfig, {"embedding": {
            "token_string": "<t>", "num_vectors_per_token": 2, "init_from": str(path)}}, source="test")
        model = tiny_sd15()
        method = make_method(cfg)
        groups = method.setup(model)
        assert groups[0]["params"] == [model.text_encoders[0].get_input_embeddings().weight]
        assert torch.equal(method.trainable_state(model)["te0.rows"], vec)
        assert not any(p.requires_grad for p in model.unet.parameters())
    cfg = load_config(TextualInversionConfig, {"embedding": {"init_from": str(path)}}, source="test")
    with pytest.raises(ConfigError, match="holds 2 vectors .* set it to 2"):
        make_method(cfg).setup(tiny_sd15())
    wrong = ti.save_embedding(tmp_path / "w.safetensors", [torch.zeros(1, 80)], "sd2", layout="safetensors",
                              name="w", step=0)
    cfg = load_config(TextualInversionConfig, {"embedding": {"init_from": str(wrong)}}, source="test")
    with pytest.raises(ModelFileError, match="80 wide .* 48 wide"):
        make_method(cfg).setup(tiny_sd15())


# ---- config ----

@pytest.mark.parametrize("embedding, message", [
    ({"token_string": "two words"}, "one word"),
    ({"token_string": ""}, "one word"),
    ({"num_vectors_per_token": 0}, "1..75"),
    ({"init_word": " "}, "init_word is empty"),
    ({"replace_word": "x<sks>"}, "contains the token"),
    ({"replace_word": "sks", "captions": "object"}, "only used with"),
])
def test_config_errors_name_the_key(embedding, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TextualInversionConfig, {"embedding": embedding}, source="test")
    with pytest.raises(ConfigError, match="train_text_encoder"):
        load_config(TextualInversionConfig, {"train": {"train_text_encoder": True}}, source="test")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*textual_inversion.toml")), ids=lambda p: p.name)
def test_example_configs_load_and_use_the_token_in_samples(path):
    cfg = load_config(TextualInversionConfig, path)
    token = cfg.embedding.token_string
    assert any(token in p.split(" --n ")[0] for p in cfg.sample.prompts)
    assert any(token in p.split(" --n ")[1] for p in cfg.sample.prompts if " --n " in p)


def test_there_are_three_example_configs():
    names = {p.name for p in CONFIGS.glob("*textual_inversion.toml")}
    assert names == {"quickstart_textual_inversion.toml", "sd15_textual_inversion.toml",
                     "sdxl_textual_inversion.toml"}


def test_sdxl_pooled_output_reads_the_end_token_not_the_new_token():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from library.models.configs import CONFIGS_ROOT
    from library.models.tiny import tiny_text_configs

    torch.manual_seed(0)
    enc = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_configs("sdxl")[1])).eval()
    tok = CLIPTokenizer.from_pretrained(str(CONFIGS_ROOT / "clip_tokenizer"))
    ti.add_token(tok, enc, "<t>", 1, "cat")
    ids = tok(["a <t> sitting"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    end = int((ids[0] == tok.eos_token_id).nonzero()[0])
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
        at_end = enc.text_projection(out.last_hidden_state[0, end])
        assert not torch.allclose(out.text_embeds[0], at_end)  # released configs pool at the highest id (<t>)
        ti.pool_at_end_token(enc, tok.eos_token_id)
        assert torch.allclose(enc(ids).text_embeds[0], at_end)
