"""Merge formulas over tensors: pure functions of the input tensors, the weights and (DARE) a random generator.

Checkpoint modes (the four of the A1111 checkpoint merger and supermerger, whose names users know):
- weighted sum   (1 - a) A + a B
- add difference A + a (B - C)
- triple sum     (1 - a - b) A + a B + b C
- sum twice      (1 - b) ((1 - a) A + a B) + b C
Task-vector modes (several fine-tunes of one base; neither GUI tool has them):
- TIES (Yadav et al. 2023, "TIES-Merging", arXiv 2306.01708, Algorithm 1): trim each delta to its top-k magnitudes,
  elect a sign per element from the summed trimmed deltas, average the deltas that agree with it.
- DARE (Yu et al. 2023, "Language Models are Super Mario", arXiv 2311.03099, Sec. 3): drop each delta element with
  probability p = 1 - density, rescale the kept ones by 1 / (1 - p), add the weighted deltas to the base.
- DARE-TIES (the same paper, Sec. 4.3: DARE as the pre-processing of TIES): DARE's drop-and-rescale instead of TIES's trim.
Inputs may be any floating dtype; callers pass float32 (the stream upcasts) for exact, dtype-independent results.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

CheckpointMode = Literal["weighted_sum", "add_difference", "triple_sum", "sum_twice"]
TaskMode = Literal["ties", "dare", "dare_ties"]


# `out`: an optional preallocated result tensor (it may be one of the inputs' storage only where noted), so that a
# streaming merge reuses one work buffer instead of allocating (and page-faulting) a fresh one per chunk.


def weighted_sum(a: torch.Tensor, b: torch.Tensor, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha) A + alpha B, computed as torch.lerp: A + alpha (B - A) (B - (1 - alpha)(B - A) for alpha >= 0.5,
    so alpha = 0 and 1 give A and B exactly). One pass; for fp16 / bf16 inputs torch computes each element in float32
    and rounds once (tests/test_merge_modes.py checks it), so a streaming merge needs no float32 copies. `out` may
    be `a`."""
    return torch.lerp(a, b, alpha, out=out) if out is not None else torch.lerp(a, b, alpha)


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """A + alpha (B - C): moves A by what separates B from its base C (e.g. an inpainting or style delta)."""
    return torch.sub(b, c, out=out).mul_(alpha).add_(a)


def triple_sum(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float, beta: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - alpha - beta) A + alpha B + beta C (supermerger "Triple sum"). `out` may be `a`."""
    return torch.mul(a, 1 - alpha - beta, out=out).add_(b, alpha=alpha).add_(c, alpha=beta)


def sum_twice(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float, beta: float,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - beta) ((1 - alpha) A + alpha B) + beta C (supermerger "sum Twice": two weighted sums in a row)."""
    first = weighted_sum(a, b, alpha, out=out)
    return weighted_sum(first, c, beta, out=first)


# Modes computed in one torch op, which rounds once from float32 even for half-precision inputs (see weighted_sum).
SINGLE_OP_MODES = ("weighted_sum",)


def checkpoint_merge(mode: CheckpointMode, tensors: Sequence[torch.Tensor], alpha: float, beta: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch one of the four checkpoint modes; `tensors` is (A, B) or (A, B, C); `out` may be A's storage."""
    match mode:
        case "weighted_sum":
            return weighted_sum(tensors[0], tensors[1], alpha, out=out)
        case "add_difference":
            return add_difference(tensors[0], tensors[1], tensors[2], alpha, out=out)
        case "triple_sum":
            return triple_sum(tensors[0], tensors[1], tensors[2], alpha, beta, out=out)
        case "sum_twice":
            return sum_twice(tensors[0], tensors[1], tensors[2], alpha, beta, out=out)
        case _:
            raise AssertionError(f"unknown checkpoint merge mode {mode!r}")


def trim_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 ("trim"): keep the round(density * n) largest-magnitude elements of `delta`, zero the rest.

    Per tensor, not over the whole task vector as in the paper: a streaming merge sees one tensor at a time, and
    mergekit's TIES makes the same per-tensor choice. Ties in magnitude are broken by torch.topk.
    """
    n = delta.numel()
    k = int(round(density * n))
    if k >= n:
        return delta.clone()
    out = torch.zeros_like(delta)
    if k <= 0:
        return out
    idx = torch.topk(delta.abs().flatten(), k, sorted=False).indices
    out.view(-1)[idx] = delta.reshape(-1)[idx]
    return out


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each element with probability `density` (Bernoulli, from `generator`), rescale kept ones by
    1 / density so the expected delta is unchanged (Yu et al. 2023, Eq. 1-2)."""
    if density >= 1:
        return delta.clone()
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    return delta.mul(keep).div_(density)


def elect_and_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES steps 2-3: sign gamma = sgn(sum_t w_t d_t); the weighted mean of the d_t whose sign equals gamma.

    With all weights 1 this is the paper's disjoint mean (Algorithm 1); an element no delta agrees on stays 0.
    """
    weighted = [d * w for d, w in zip(deltas, weights)]
    sign = torch.sign(torch.stack(weighted).sum(0))
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, wd, w in zip(deltas, weighted, weights):
        agree = (torch.sign(d) == sign) & (d != 0)
        num += torch.where(agree, wd, 0.0)
        den += agree * float(w)
    return torch.where(den > 0, num / den.clamp_min(1e-12), 0.0)


def task_merge(mode: TaskMode, base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
               density: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """base + scale * merged task vector, the deltas being (model_t - base).

    ties: trim -> elect -> disjoint weighted mean; dare: drop-rescale -> weighted sum; dare_ties: drop-rescale ->
    elect -> disjoint weighted mean. `generator` is used by the DARE modes only.
    """
    deltas = [m - base for m in models]
    match mode:
        case "ties":
            merged = elect_and_merge([trim_top_k(d, density) for d in deltas], weights)
        case "dare":
            merged = torch.zeros_like(base)
            for d, w in zip(deltas, weights):
                merged.add_(dare_drop(d, density, generator), alpha=w)
        case "dare_ties":
            merged = elect_and_merge([dare_drop(d, density, generator) for d in deltas], weights)
        case _:
            raise AssertionError(f"unknown task merge mode {mode!r}")
    return base + scale * merged
