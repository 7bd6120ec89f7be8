"""LoRA tools: exact deltas, merge, SVD extraction (sd-scripts semantics) and resize."""

from __future__ import annotations

import pytest
import torch

from library.errors import ModelFileError
from library.networks.lora_tools import extract_lora, lora_delta, merge_lora, resize_lora


def test_lora_delta_exact_small_cases():
    t = {"lora_down.weight": torch.tensor([[1.0, 2.0]]), "lora_up.weight": torch.tensor([[3.0], [4.0]]),
         "alpha": torch.tensor(0.5)}
    assert torch.equal(lora_delta(t, (2, 2)), torch.tensor([[1.5, 3.0], [2.0, 4.0]]))
    no_alpha = {k: v for k, v in t.items() if k != "alpha"}  # old files: alpha = rank, scale 1
    assert torch.equal(lora_delta(no_alpha, (2, 2)), torch.tensor([[3.0, 6.0], [4.0, 8.0]]))
    loha = {"hada_w1_a": torch.tensor([[1.0], [2.0]]), "hada_w1_b": torch.tensor([[1.0, 1.0]]),
            "hada_w2_a": torch.tensor([[3.0], [1.0]]), "hada_w2_b": torch.tensor([[1.0, -1.0]]), "alpha": torch.tensor(2.0)}
    # (w1a w1b) * (w2a w2b) * alpha / r = [[1,1],[2,2]] * [[3,-3],[1,-1]] * 2
    assert torch.equal(lora_delta(loha, (2, 2)), torch.tensor([[6.0, -6.0], [4.0, -4.0]]))
    lokr_full = {"lokr_w1": torch.tensor([[1.0, 2.0]]), "lokr_w2": torch.tensor([[1.0], [-1.0]]), "alpha": torch.tensor(8.0)}
    # both factors full: readers ignore alpha (scale 1); kron([[1,2]], [[1],[-1]]) = [[1,2],[-1,-2]]
    assert torch.equal(lora_delta(lokr_full, (2, 2)), torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    lokr_dec = {"lokr_w1": torch.tensor([[1.0, 2.0]]), "lokr_w2_a": torch.tensor([[1.0], [-1.0]]),
                "lokr_w2_b": torch.tensor([[2.0]]), "alpha": torch.tensor(0.5)}
    assert torch.equal(lora_delta(lokr_dec, (2, 2)), torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    conv = {"lora_down.weight": torch.ones(1, 2, 3, 3), "lora_up.weight": torch.tensor([2.0, 3.0]).reshape(2, 1, 1, 1),
            "alpha": torch.tensor(1.0)}
    d = lora_delta(conv, (2, 2, 3, 3))
    assert d.shape == (2, 2, 3, 3) and torch.equal(d[0], torch.full((2, 3, 3), 2.0)) and torch.equal(d[1], torch.full((2, 3, 3), 3.0))


def test_merge_with_strength_and_dora():
    w = {"unet.a.weight": torch.eye(2), "unet.b.weight": torch.zeros(3)}
    t = {"lora_unet_a.lora_down.weight": torch.tensor([[1.0, 2.0]]), "lora_unet_a.lora_up.weight": torch.tensor([[3.0], [4.0]]),
         "lora_unet_a.alpha": torch.tensor(0.5)}
    merged = merge_lora(w, t, {"lora_unet_a": "unet.a.weight"}, strength=2.0)
    assert torch.equal(merged["unet.a.weight"], torch.tensor([[4.0, 6.0], [4.0, 9.0]]))
    assert merged["unet.b.weight"] is w["unet.b.weight"] and torch.equal(w["unet.a.weight"], torch.eye(2))
    # DoRA: magnitude [out, 1] times the row-normalised merged weight; rows of eye+delta are [2.5,3] and [2,5]
    dora = dict(t, **{"lora_unet_a.dora_scale": torch.tensor([[1.0], [2.0]])})
    m = merge_lora(w, dora, {"lora_unet_a": "unet.a.weight"})["unet.a.weight"]
    rows = torch.tensor([[2.5, 3.0], [2.0, 5.0]])
    assert torch.allclose(m, rows / rows.norm(dim=1, keepdim=True) * torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ModelFileError, match="lora_unet_zzz"):
        merge_lora(w, {"lora_unet_zzz.alpha": torch.tensor(1.0)}, {"lora_unet_a": "unet.a.weight"})


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"unet.lin.weight": (6, 5), "unet.pw.weight": (4, 3, 1, 1), "unet.conv.weight": (4, 3, 3, 3),
              "text_encoder.q.weight": (5, 5)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    names = {"lora_unet_lin": "unet.lin.weight", "lora_unet_pw": "unet.pw.weight", "lora_unet_conv": "unet.conv.weight",
             "lora_te_text_model_q": "text_encoder.q.weight"}
    return base, tuned, names


def test_extract_at_full_rank_then_merge_reproduces_the_difference():
    base, tuned, names = _pair()
    lora = extract_lora(base, tuned, names, rank=64, conv_rank=64, clamp_quantile=None, min_diff=0.0)
    assert lora["lora_unet_conv.lora_down.weight"].shape == (3, 3, 3, 3)  # rank capped at min(out, in channels)=3
    assert lora["lora_unet_conv.lora_up.weight"].shape == (4, 3, 1, 1)
    assert lora["lora_unet_lin.alpha"].item() == 5.0 and lora["lora_unet_lin.lora_up.weight"].shape == (6, 5)
    merged = merge_lora(base, lora, names)
    for k in base:
        if k == "unet.conv.weight":  # [4, 27] has rank 4 > 3 channels: rank 3 cannot be exact, sd-scripts caps it too
            continue
        assert (merged[k] - tuned[k]).abs().max().item() < 1e-5, k


def test_extract_low_rank_is_exact_for_low_rank_difference_and_clamps():
    g = torch.Generator().manual_seed(1)
    base = {"unet.w.weight": torch.randn(8, 6, generator=g)}
    u, v = torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)
    tuned = {"unet.w.weight": base["unet.w.weight"] + u @ v}
    names = {"lora_unet_w": "unet.w.weight"}
    lora = extract_lora(base, tuned, names, rank=2, clamp_quantile=None)
    assert torch.allclose(merge_lora(base, lora, names)["unet.w.weight"], tuned["unet.w.weight"], atol=1e-5)
    clamped = extract_lora(base, tuned, names, rank=2, clamp_quantile=0.5)
    values = torch.cat([lora["lora_unet_w.lora_up.weight"].flatten(), lora["lora_unet_w.lora_down.weight"].flatten()])
    hi = torch.quantile(values, 0.5).item()
    assert clamped["lora_unet_w.lora_up.weight"].abs().max().item() == pytest.approx(abs(hi))


def test_extract_drops_unchanged_text_encoder_like_sd_scripts():
    base, tuned, names = _pair()
    tuned["text_encoder.q.weight"] = base["text_encoder.q.weight"] + 0.001
    lora = extract_lora(base, tuned, names, rank=2, min_diff=0.01)
    assert not any(k.startswith("lora_te") for k in lora) and "lora_unet_lin.alpha" in lora
    lora = extract_lora(base, tuned, names, rank=2, min_diff=0.0001)
    assert "lora_te_text_model_q.alpha" in lora


def test_resize_full_rank_lossless_and_lower_rank_optimal():
    g = torch.Generator().manual_seed(2)
    lora = {"lora_unet_a.lora_down.weight": torch.randn(4, 7, generator=g),
            "lora_unet_a.lora_up.weight": torch.randn(9, 4, generator=g), "lora_unet_a.alpha": torch.tensor(2.0),
            "lora_unet_c.lora_down.weight": torch.randn(3, 5, 3, 3, generator=g),
            "lora_unet_c.lora_up.weight": torch.randn(6, 3, 1, 1, generator=g), "lora_unet_c.alpha": torch.tensor(1.0)}
    same = resize_lora(lora, new_rank=4)
    for name, shape in (("lora_unet_a", (9, 7)), ("lora_unet_c", (6, 5, 3, 3))):
        old_t = {k.split(".", 1)[1]: v for k, v in lora.items() if k.startswith(name + ".")}
        new_t = {k.split(".", 1)[1]: v for k, v in same.items() if k.startswith(name + ".")}
        assert (lora_delta(old_t, shape) - lora_delta(new_t, shape)).abs().max().item() < 1e-5
    small = resize_lora(lora, new_rank=2, new_conv_rank=1)
    assert small["lora_unet_a.lora_down.weight"].shape == (2, 7) and small["lora_unet_a.alpha"].item() == 1.0
    assert small["lora_unet_c.lora_down.weight"].shape == (1, 5, 3, 3) and small["lora_unet_c.alpha"].item() == pytest.approx(1 / 3)
    full = lora_delta({"lora_down.weight": lora["lora_unet_a.lora_down.weight"],
                       "lora_up.weight": lora["lora_unet_a.lora_up.weight"], "alpha": torch.tensor(2.0)}, (9, 7))
    approx = lora_delta({k.split(".", 1)[1]: v for k, v in small.items() if k.startswith("lora_unet_a.")}, (9, 7))
    s = torch.linalg.svdvals(full)
    assert (full - approx).norm().item() == pytest.approx(s[2:].norm().item(), rel=1e-4)  # Eckart-Young
    with pytest.raises(ModelFileError, match="LoHa"):
        resize_lora({"lora_unet_h.hada_w1_a": torch.zeros(2, 1)}, 1)
