"""FLOPs of a training step and the time they take on a GPU.

FLOPs are counted by torch's `FlopCounterMode` (matmul, addmm, bmm, convolution and their backward; elementwise ops,
norms and softmax are not counted, which is the usual convention for model FLOPs: they are a few percent of a UNet's
and are memory-bound anyway). On CPU, SDPA dispatches to `_scaled_dot_product_flash_attention_for_cpu`, which the
counter has no formula for; we give it torch's own SDPA formulas (`sdpa_flop_count`, `sdpa_backward_flop_count`:
4·B·H·Lq·Lk·D forward, 2.5x that backward), through the counter's `custom_mapping` so nothing global is changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

aten = torch.ops.aten


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def attention_formulas() -> dict[Any, Any]:
    """Formulas for the attention kernels FlopCounterMode lacks (those it has are left to it)."""
    mapping: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward
    return mapping


def flop_formulas() -> dict[Any, Any]:
    """Overload packet -> formula(*args, out_val=out, **kwargs) -> FLOPs: FlopCounterMode's own table with the
    attention formulas added, for library/estimate/memory.py LiveBytes, which counts in its own dispatch. Unlike
    FlopCounterMode it does not try to decompose ops the table lacks: ops reaching a dispatch mode are already
    decomposed to the kernels the table covers (tests/test_estimate.py checks the totals agree on a model)."""
    return {**flop_registry, **{k: shape_wrapper(v) for k, v in attention_formulas().items()}}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU flash attention."""
    return FlopCounterMode(display=False, custom_mapping=attention_formulas())


def step_seconds(flops: float, peak_tflops: float, utilisation: float) -> float:
    """Time of `flops` on a GPU reaching `utilisation` (0-1] of its peak dense tensor throughput."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1] (got {utilisation})")
    return flops / (peak_tflops * 1e12 * utilisation)
