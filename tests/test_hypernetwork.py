"""Hypernetwork modules, the A1111 `.pt` format, the attention processor and the [hypernetwork] config (no training)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from library.config.core import load_config
from library.config.hypernetwork import HypernetworkRunConfig
from library.errors import ConfigError, ModelFileError
from library.networks.hypernetwork import (HypernetworkModule, HypernetworkSpec, apply_hypernetwork,
                                           attention_layers, attention_widths, build_layers, create_hypernetwork,
                                           parse_dropout_structure, remove_hypernetwork)
from library.networks.hypernetwork_file import (HypernetworkInfo, load_hypernetwork, save_hypernetwork,
                                                to_a1111_dict)

A1111_KEYS = {"step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
              "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
              "last_layer_dropout", "optional_info"}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("structure, use, last, expected", [
    ([1, 2, 1], False, False, [0, 0, 0]),
    ([1, 2, 1], True, False, [0, 0, 0]),
    ([1, 2, 1], True, True, [0, 0.3, 0]),
    ([1, 2, 2, 1], True, False, [0, 0.3, 0, 0]),
    ([1, 2, 2, 1], True, True, [0, 0.3, 0.3, 0]),
    ([1, 2, 4, 2, 1], True, False, [0, 0.3, 0.3, 0, 0]),
])
def test_parse_dropout_structure_matches_a1111_rule(structure, use, last, expected):
    assert parse_dropout_structure(structure, use, last) == expected


@pytest.mark.parametrize("spec, types", [
    (HypernetworkSpec(), ["Linear", "Linear"]),
    (HypernetworkSpec(activation_func="relu"), ["Linear", "ReLU", "Linear"]),
    (HypernetworkSpec(activation_func="relu", activate_output=True), ["Linear", "ReLU", "Linear", "ReLU"]),
    (HypernetworkSpec(activation_func="swish", add_layer_norm=True, dropout_structure=(0, 0.3, 0)),
     ["Linear", "Hardswish", "LayerNorm", "Dropout", "Linear", "LayerNorm"]),
    (HypernetworkSpec(layer_structure=(1, 2, 2, 1), activation_func="tanh", dropout_structure=(0, 0.1, 0.2, 0)),
     ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear"]),
])
def test_build_layers_sequential_entries(spec, types):
    assert [type(m).__name__ for m in build_layers(8, spec)] == types


def test_build_layers_widths_and_dropout_probabilities():
    seq = build_layers(8, HypernetworkSpec(layer_structure=(1, 1.5, 1), dropout_structure=(0, 0.25, 0)))
    assert [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)] == [(8, 12), (12, 8)]
    assert [m.p for m in seq if isinstance(m, nn.Dropout)] == [0.25]
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_normal_init_is_a1111_normal_from_the_generator():
    spec = HypernetworkSpec(add_layer_norm=True)
    hn = create_hypernetwork(spec, [16, 8], gen(3))
    first = hn.pairs["16"][0].linear[0]
    expected = torch.nn.init.normal_(torch.empty(32, 16), 0.0, 0.01, generator=gen(3))
    assert torch.equal(first.weight, expected) and torch.equal(first.bias, torch.zeros(32))
    ln = hn.pairs["16"][0].linear[1]  # A1111 draws LayerNorm weights from N(0, 0.01) too, bias zero
    assert isinstance(ln, nn.LayerNorm) and 0 < ln.weight.abs().max() < 0.1 and not ln.bias.any()
    again = create_hypernetwork(spec, [16, 8], gen(3))
    assert all(torch.equal(a, b) for a, b in zip(hn.parameters(), again.parameters()))
    assert not torch.equal(hn.pairs["16"][0].linear[0].weight, hn.pairs["16"][1].linear[0].weight)


@pytest.mark.parametrize("init", ["XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_other_inits_zero_bias_and_scale(init):
    hn = create_hypernetwork(HypernetworkSpec(weight_init=init, activation_func="relu"), [64], gen(1))
    lin = hn.pairs["64"][0].linear[0]  # 64 -> 128
    assert not lin.bias.any()
    std = float(lin.weight.detach().std())
    expected = {"XavierUniform": (2 / 192) ** 0.5, "XavierNormal": (2 / 192) ** 0.5,
                "KaimingUniform": (2 / 64) ** 0.5, "KaimingNormal": (2 / 64) ** 0.5}[init]
    assert abs(std / expected - 1) < 0.1, (std, expected)


def test_module_strength_is_one_in_training_and_multiplier_in_eval():
    m = HypernetworkModule(4, HypernetworkSpec())
    torch.nn.init.normal_(m.linear[0].weight, std=0.5, generator=gen(2))
    torch.nn.init.normal_(m.linear[1].weight, std=0.5, generator=gen(3))
    x = torch.randn(2, 3, 4, generator=gen(4))
    delta = m.linear(x)
    m.multiplier = 0.25
    assert torch.equal(m.train()(x), x + delta * 1.0)
    assert torch.equal(m.eval()(x), x + delta * 0.25)


def test_unknown_activation_in_spec_is_a_file_error():
    with pytest.raises(ModelFileError, match="activation_func 'frobnicate'"):
        HypernetworkSpec(activation_func="frobnicate")


# --- the file --------------------------------------------------------------------------------------------------------

def test_file_layout_weights_only_and_round_trip(tmp_path):
    spec = HypernetworkSpec(activation_func="leakyrelu", add_layer_norm=True, dropout_structure=(0, 0.3, 0),
                            use_dropout=True, weight_init="KaimingNormal")
    hn = create_hypernetwork(spec, [48, 32], gen(0))
    info = HypernetworkInfo(name="mine", step=7, sd_checkpoint="0123456789", sd_checkpoint_name="base",
                            metadata={"sdtk_family": "sd1"})
    path = save_hypernetwork(tmp_path / "mine.pt", hn, info)
    raw = torch.load(path, weights_only=True)
    assert [k for k in raw if isinstance(k, int)] == [48, 32]
    assert set(k for k in raw if not isinstance(k, int)) == A1111_KEYS | {"sdtk_metadata"}
    assert raw["layer_structure"] == [1.0, 2.0, 1.0] and raw["activation_func"] == "leakyrelu"
    assert raw["is_layer_norm"] is True and raw["use_dropout"] is True and raw["dropout_structure"] == [0, 0.3, 0]
    assert raw["last_layer_dropout"] is True  # A1111 writes dropout_structure[-2] != 0
    assert (raw["step"], raw["name"], raw["sd_checkpoint"]) == (7, "mine", "0123456789")
    k_state, v_state = raw[48]
    # Sequential order: Linear, LeakyReLU, LayerNorm, Dropout, Linear, LayerNorm
    assert list(k_state) == ["linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
                             "linear.4.weight", "linear.4.bias", "linear.5.weight", "linear.5.bias"]
    assert tuple(k_state["linear.0.weight"].shape) == (96, 48) and k_state["linear.0.weight"].dtype == torch.float32

    back, back_info = load_hypernetwork(path)
    assert back.spec == spec and back.widths == [48, 32] and not back.training
    assert (back_info.name, back_info.step, back_info.metadata) == ("mine", 7, {"sdtk_family": "sd1"})
    assert all(torch.equal(a, b) for a, b in zip(hn.state_dict().values(), back.state_dict().values()))
    half = torch.load(save_hypernetwork(tmp_path / "h.pt", hn, info, torch.float16), weights_only=True)
    assert half[48][1]["linear.0.weight"].dtype == torch.float16


def test_old_linear1_linear2_file_loads_with_a1111_defaults(tmp_path):
    g = gen(5)
    w1, b1, w2, b2 = (torch.randn(s, generator=g) for s in [(16, 8), (16,), (8, 16), (8,)])
    old = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    torch.save({8: (dict(old), dict(old)), "step": 1234, "name": "ancient"}, tmp_path / "old.pt")
    hn, info = load_hypernetwork(tmp_path / "old.pt")
    assert hn.widths == [8] and (info.name, info.step) == ("ancient", 1234)
    assert hn.spec.layer_structure == (1, 2, 1) and hn.spec.activation_func == "linear"
    x = torch.randn(3, 8, generator=g)
    hn.set_multiplier(1.0)
    expected = x + ((x @ w1.T + b1) @ w2.T + b2)
    assert torch.allclose(hn.pairs["8"][0](x), expected, atol=1e-6)


def test_missing_name_defaults_to_file_stem_and_legacy_dropout_rule(tmp_path):
    spec = HypernetworkSpec(layer_structure=(1, 2, 2, 1), activation_func="relu", dropout_structure=(0, 0.3, 0, 0),
                            use_dropout=True)
    d = to_a1111_dict(create_hypernetwork(spec, [8], gen(0)), HypernetworkInfo())
    for key in ("name", "dropout_structure"):  # files from before dropout_structure existed
        del d[key]
    d["last_layer_dropout"] = False
    torch.save(d, tmp_path / "legacy.pt")
    hn, info = load_hypernetwork(tmp_path / "legacy.pt")
    assert info.name == "legacy" and hn.spec.dropout_structure == (0, 0.3, 0, 0)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[8][0].pop("linear.1.bias"), r"k module of width 8 .*missing \['linear.1.bias'\]"),
    (lambda d: d[8][1].update({"linear.0.weight": torch.zeros(3, 3)}), r"v module .*wrong shape \['linear.0.weight'\]"),
    (lambda d: d.update(activation_func="relu"), r"unexpected \['linear.1.bias', 'linear.1.weight'\]"),
    (lambda d: d.update(activation_func="nope"), "activation_func 'nope' is not supported"),
    (lambda d: d.update({8: "x"}), "entry 8 must be a"),
    (lambda d: [d.pop(8)], "no integer width keys"),
])
def test_malformed_files_name_the_problem(tmp_path, mutate, message):
    d = to_a1111_dict(create_hypernetwork(HypernetworkSpec(), [8], gen(0)), HypernetworkInfo(name="x"))
    mutate(d)
    torch.save(d, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=message):
        load_hypernetwork(tmp_path / "bad.pt")


class Payload:  # a pickle that would run code: must be refused, not executed
    def __reduce__(self):
        return (print, ("payload ran",))


def test_code_running_pickle_and_missing_file_are_refused(tmp_path, capsys):
    torch.save({8: Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError, match="refused to load"):
        load_hypernetwork(tmp_path / "evil.pt")
    assert "payload ran" not in capsys.readouterr().out
    with pytest.raises(ModelFileError, match="does not exist"):
        load_hypernetwork(tmp_path / "nope.pt")


# --- on the UNet: our processor vs a reader written from the A1111 rules --------------------------------------------

def reference_modules(raw: dict) -> dict[int, tuple[nn.Sequential, nn.Sequential]]:
    """Rebuild the modules from a file with only the DESIGN.md / A1111 rules (independent of our builder)."""
    acts = {"linear": None, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "swish": nn.Hardswish, "tanh": nn.Tanh}
    ls, drop = raw["layer_structure"], raw["dropout_structure"]
    out = {}
    for width in (k for k in raw if isinstance(k, int)):
        pair = []
        for state in raw[width]:
            entries = []
            for i in range(len(ls) - 1):
                entries.append(nn.Linear(int(width * ls[i]), int(width * ls[i + 1])))
                if acts[raw["activation_func"]] and (i < len(ls) - 2 or raw["activate_output"]):
                    entries.append(acts[raw["activation_func"]]())
                if raw["is_layer_norm"]:
                    entries.append(nn.LayerNorm(int(width * ls[i + 1])))
                if drop[i + 1] > 0:
                    entries.append(nn.Dropout(drop[i + 1]))
            seq = nn.Sequential(*entries)
            seq.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()}, strict=True)
            pair.append(seq.eval())
        out[width] = tuple(pair)
    return out


def hook_reference(unet, modules, strength):
    """Apply `x + m(x) * strength` to the inputs of to_k / to_v with forward pre-hooks (default processors)."""
    handles = []
    for attn in attention_layers(unet).values():
        pair = modules.get(attn.to_k.in_features)
        if pair is None:
            continue
        for proj, m in ((attn.to_k, pair[0]), (attn.to_v, pair[1])):
            handles.append(proj.register_forward_pre_hook(lambda mod, args, m=m: (args[0] + m(args[0]) * strength,)))
    return handles


def unet_inputs(model, batch=2):
    g = gen(11)
    unet = model.unet
    kwargs = {}
    if model.family == "sdxl":
        cfg = unet.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500]),
            torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)), kwargs


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_reference_reader_reproduces_unet_outputs_exactly(tmp_path, family):
    from library.models.tiny import build_tiny

    model = build_tiny(family)
    unet = model.unet.eval()
    (x, t, ctx), kw = unet_inputs(model)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx, **kw).sample
    spec = HypernetworkSpec(activation_func="relu", add_layer_norm=True, dropout_structure=(0, 0.3, 0),
                            use_dropout=True, weight_init="XavierNormal")
    hn = create_hypernetwork(spec, attention_widths(unet), gen(0))
    path = save_hypernetwork(tmp_path / f"{family}.pt", hn, HypernetworkInfo(name=family))

    ours, _ = load_hypernetwork(path)
    originals = apply_hypernetwork(unet, ours, strength=0.7)
    assert len(originals) == len(attention_layers(unet))  # every attention layer's width has a pair
    with torch.no_grad():
        with_ours = unet(x, t, encoder_hidden_states=ctx, **kw).sample
    remove_hypernetwork(unet, originals)
    handles = hook_reference(unet, reference_modules(torch.load(path, weights_only=True)), 0.7)
    with torch.no_grad():
        with_reference = unet(x, t, encoder_hidden_states=ctx, **kw).sample
    for h in handles:
        h.remove()
    with torch.no_grad():
        restored = unet(x, t, encoder_hidden_states=ctx, **kw).sample
    assert not torch.allclose(with_ours, base, atol=1e-4)  # the hypernetwork changes the output
    assert torch.equal(with_ours, with_reference)
    assert torch.equal(restored, base)


def test_apply_keeps_unused_widths_and_rejects_foreign_ones():
    from library.models.tiny import build_tiny

    unet = build_tiny("sd1").unet
    cross = unet.config.cross_attention_dim
    assert cross in attention_widths(unet) and len(attention_widths(unet)) == 4  # 3 self-attention widths + cross
    partial = create_hypernetwork(HypernetworkSpec(), [cross, 4096], gen(0))
    originals = apply_hypernetwork(unet, partial)
    assert {attention_layers(unet)[n].to_k.in_features for n in originals} == {cross}
    assert len(originals) == len(attention_layers(unet)) // 2  # every transformer block's attn2
    remove_hypernetwork(unet, originals)
    with pytest.raises(ModelFileError, match="match none of this UNet"):
        apply_hypernetwork(unet, create_hypernetwork(HypernetworkSpec(), [640, 1280], gen(0)))


# --- config ----------------------------------------------------------------------------------------------------------

def hn_cfg(**tables):
    data = {"model": {"pretrained_model_name_or_path": "tiny:sd15"}}
    data.update(tables)
    return load_config(HypernetworkRunConfig, data, source="test")


def test_config_defaults_and_int_structure():
    cfg = hn_cfg(hypernetwork={"layer_structure": [1, 1.5, 1], "enable_sizes": [320, 768]})
    assert cfg.hypernetwork.layer_structure == [1.0, 1.5, 1.0] and cfg.hypernetwork.activation_func == "linear"


@pytest.mark.parametrize("tables, message", [
    ({"hypernetwork": {"layer_structure": [2, 1]}}, "first and the last equal to 1"),
    ({"hypernetwork": {"layer_structure": [1, 0, 1]}}, "must be > 0"),
    ({"hypernetwork": {"use_dropout": True, "dropout_structure": [0, 0.3]}}, "one entry per layer_structure"),
    ({"hypernetwork": {"use_dropout": True, "dropout_structure": [0.1, 0.3, 0]}}, "first and last entries must be 0"),
    ({"hypernetwork": {"use_dropout": True, "dropout_structure": [0, 1.0, 0]}}, r"in \[0, 1\)"),
    ({"hypernetwork": {"dropout_structure": [0, 0.3, 0]}}, "use_dropout = true"),
    ({"hypernetwork": {"activation_func": "prelu"}}, "activation_func"),
    ({"hypernetwork": {"enable_sizes": [0]}}, "enable_sizes"),
    ({"train": {"attention": "xformers"}}, "xformers"),
    ({"train": {"train_text_encoder": True}}, "train_text_encoder"),
])
def test_config_errors_name_the_key(tables, message):
    with pytest.raises(ConfigError, match=message):
        hn_cfg(**tables)


CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*hypernetwork.toml"))


def test_hypernetwork_configs_exist():
    assert [p.name for p in CONFIGS] == ["quickstart_hypernetwork.toml", "sd15_hypernetwork.toml",
                                         "sdxl_hypernetwork.toml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_hypernetwork_config_loads(path):
    cfg = load_config(HypernetworkRunConfig, path)
    assert cfg.save.output_dir and cfg.hypernetwork.layer_structure[0] == 1


def test_script_prints_config_and_reports_bad_keys(capsys):
    from train_hypernetwork import main

    assert main(["--config", str(CONFIGS[0]), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "[hypernetwork]" in out and "layer_structure = [1.0, 2.0, 1.0]" in out
    assert main(["--config", str(CONFIGS[0]), "--hypernetwork.layer_structure", "[2, 1]"]) == 2
    assert "first and the last equal to 1" in capsys.readouterr().err
