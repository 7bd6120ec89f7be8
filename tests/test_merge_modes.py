"""Exact values of the merge formulas (weighted sum, add difference, triple sum, sum twice, TIES, DARE)."""

import pytest
import torch

from library.merge import modes

A = torch.tensor([1.0, 2.0, -4.0, 8.0])
B = torch.tensor([3.0, -2.0, 0.0, 8.0])
C = torch.tensor([1.0, 1.0, 4.0, -8.0])


def test_checkpoint_modes_exact():
    assert modes.weighted_sum(A, B, 0.25).tolist() == [1.5, 1.0, -3.0, 8.0]  # 0.75 A + 0.25 B
    assert modes.add_difference(A, B, C, 0.5).tolist() == [2.0, 0.5, -6.0, 16.0]  # A + (B - C) / 2
    assert modes.triple_sum(A, B, C, 0.25, 0.5).tolist() == [1.5, 0.5, 1.0, 0.0]  # A/4 + B/4 + C/2
    # (1 - 0.5) (0.75 A + 0.25 B) + 0.5 C
    assert modes.sum_twice(A, B, C, 0.25, 0.5).tolist() == [1.25, 1.0, 0.5, 0.0]
    assert modes.checkpoint_merge("sum_twice", (A, B, C), 0.25, 0.5).tolist() == [1.25, 1.0, 0.5, 0.0]
    assert torch.equal(modes.weighted_sum(A, B, 0.0), A) and torch.equal(modes.weighted_sum(A, B, 1.0), B)
    assert A.tolist() == [1.0, 2.0, -4.0, 8.0]  # inputs untouched (in-place ops work on copies)


def test_trim_top_k():
    d = torch.tensor([0.1, -3.0, 2.0, -0.5, 1.0])
    assert modes.trim_top_k(d, 0.4).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]
    assert modes.trim_top_k(d, 1.0).tolist() == d.tolist()
    assert modes.trim_top_k(d, 0.0).tolist() == [0.0] * 5


def test_ties_exact():
    base = torch.zeros(4)
    m1 = torch.tensor([2.0, -1.0, 3.0, 0.5])
    m2 = torch.tensor([4.0, 3.0, -1.0, 0.25])
    m3 = torch.tensor([-1.0, 2.0, -4.0, 0.0])
    g = torch.Generator().manual_seed(0)
    # density 1: no trim. Signs of the sums: [+, +, -, +]. Agreeing means: [(2+4)/2, (3+2)/2, (-1-4)/2, (0.5+0.25)/2]
    out = modes.task_merge("ties", base, [m1, m2, m3], [1, 1, 1], 1.0, 1.0, g)
    assert out.tolist() == [3.0, 2.5, -2.5, 0.375]
    # density 0.5 keeps the 2 largest magnitudes per delta: m1 -> [2,0,3,0], m2 -> [4,3,0,0], m3 -> [0,2,-4,0]
    # signs: [+, +, -, 0] -> [3, 2.5, -4, 0]; scale 0.5 halves the task vector, base 1 shifts all
    out = modes.task_merge("ties", base + 1, [m1 + 1, m2 + 1, m3 + 1], [1, 1, 1], 0.5, 0.5, g)
    assert out.tolist() == [2.5, 2.25, -1.0, 1.0]
    # weights 3, 1: summed 3*m1 + m2 = [10, 0, 8, 1.75]; element 1 has no sign (no delta agrees -> 0); element 2
    # elects + and only m1 agrees: 3*3/3; elsewhere both agree: weighted means (6+4)/4 and (1.5+0.25)/4
    out = modes.task_merge("ties", base, [m1, m2], [3, 1], 1.0, 1.0, g)
    assert out.tolist() == [2.5, 0.0, 3.0, 0.4375]


def test_dare_rescale_and_seed():
    base = torch.zeros(10000)
    m = torch.full((10000,), 2.0)
    out = modes.task_merge("dare", base, [m], [1.0], 0.25, 1.0, torch.Generator().manual_seed(3))
    kept = out != 0
    assert torch.all(out[kept] == 8.0)  # kept elements rescaled by 1 / density
    assert 0.22 < kept.float().mean().item() < 0.28
    again = modes.task_merge("dare", base, [m], [1.0], 0.25, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert torch.equal(modes.task_merge("dare", base, [m, m], [0.5, 0.25], 1.0, 1.0, torch.Generator()),
                       torch.full((10000,), 1.5))  # density 1: plain weighted task arithmetic


def test_dare_ties_elects_signs():
    base = torch.zeros(3)
    out = modes.task_merge("dare_ties", base, [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 1.0, -1.0])],
                           [1, 1], 1.0, 1.0, torch.Generator())
    assert out.tolist() == [2.0, -2.0, 3.0]


def test_out_buffers_give_the_same_values():
    out = torch.empty(4)
    assert modes.checkpoint_merge("add_difference", (A, B, C), 0.5, 0.0, out=out) is out
    assert out.tolist() == [2.0, 0.5, -6.0, 16.0]
    assert modes.checkpoint_merge("sum_twice", (A, B, C), 0.25, 0.5, out=out).tolist() == [1.25, 1.0, 0.5, 0.0]
    a = A.clone()
    modes.weighted_sum(a, B, 0.25, out=a)  # in place on A's storage (documented as allowed)
    assert a.tolist() == [1.5, 1.0, -3.0, 8.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_sum_on_half_inputs_rounds_once_from_float32(dtype):
    """The streaming merge runs weighted_sum on stored fp16 / bf16 tensors directly: torch must compute in float32
    and round once, i.e. give exactly the float32 result rounded to the storage dtype."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100_000, generator=g).to(dtype), torch.randn(100_000, generator=g).to(dtype)
    for alpha in (0.1, 0.5, 11 / 12):
        want = modes.weighted_sum(a.float(), b.float(), alpha).to(dtype)
        assert torch.equal(modes.weighted_sum(a, b, alpha, out=torch.empty_like(a)), want)
