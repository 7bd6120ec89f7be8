"""What `--dry-run` prints: the step's memory and its parts, FLOPs, and per GPU whether it fits, how long the run
takes and what it costs; for a card it does not fit, the cheapest settings change that makes it fit.

The changes are tried cumulatively, cheapest first (`LADDER`), each one re-estimated (re-measured when it changes the
step, recomputed when only optimizer state placement changes, see memory.rederive):
  1. cache latents and (frozen) text-encoder outputs: a one-off caching pass, same steps after;
  2. 8-bit optimizer (AdamW -> AdamW8bit, Lion -> Lion8bit): same speed, state ~1/4 (Dettmers et al. 2022);
  3. gradient checkpointing: recomputes the forward in backward, ~30% more time per step;
  4. half the batch with twice the gradient accumulation, down to batch 1: same effective batch, less parallelism;
  5. DeepSpeed ZeRO-2 with CPU optimizer offload: needs CPU memory and PCIe transfers, the slowest step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from library.estimate.flops import step_seconds
from library.estimate.gpus import (
    CONTEXT_GIB,
    FRAGMENTATION,
    GIB,
    GPU,
    TIGHT_MARGIN_GIB,
    allowance_bytes,
    fits,
    load_gpus,
    needed_bytes,
    tight,
)
from library.estimate.memory import Estimate, EstimateSpec, rederive
from library.estimate.step import estimate_step

_8BIT = {"AdamW": "AdamW8bit", "Lion": "Lion8bit"}


def _cache(spec: EstimateSpec) -> EstimateSpec | None:
    text = not spec.trains_text_encoder()
    if spec.cache_latents and (spec.cache_text_outputs or not text):
        return None
    return replace(spec, cache_latents=True, cache_text_outputs=spec.cache_text_outputs or text)


def _eight_bit(spec: EstimateSpec) -> EstimateSpec | None:
    return replace(spec, optimizer=_8BIT[spec.optimizer]) if spec.optimizer in _8BIT else None


def _checkpointing(spec: EstimateSpec) -> EstimateSpec | None:
    return None if spec.gradient_checkpointing else replace(spec, gradient_checkpointing=True)


def _half_batch(spec: EstimateSpec) -> EstimateSpec | None:
    if spec.batch_size < 2:
        return None
    return replace(spec, batch_size=spec.batch_size // 2,
                   gradient_accumulation_steps=spec.gradient_accumulation_steps * 2)


def _offload(spec: EstimateSpec) -> EstimateSpec | None:
    if spec.offload_optimizer:
        return None
    return replace(spec, deepspeed_stage=2, offload_optimizer=True)


LADDER: list[tuple[str, Callable[[EstimateSpec], EstimateSpec | None]]] = [
    ("cached latents/text", _cache),
    ("8-bit optimizer", _eight_bit),
    ("gradient checkpointing", _checkpointing),
    ("half batch x2 accumulation", _half_batch),
    ("DeepSpeed ZeRO-2 CPU offload", _offload),
]


def ladder(base: Estimate, gpus: list[GPU], context_gib: float = CONTEXT_GIB,
           fragmentation: float = FRAGMENTATION) -> list[Estimate]:
    """`base` then each cumulative change of LADDER, stopping once every card in `gpus` fits one of them."""
    out = [base]
    spec, labels = base.spec, []

    def all_fit() -> bool:
        return all(any(fits(e.peak, g, context_gib, fragmentation) for e in out) for g in gpus)

    for label, change in LADDER:
        if all_fit():
            break
        steps = []
        while (new := change(spec)) is not None:  # batch halving repeats; every other change applies once
            spec = new
            steps.append(spec)
            if change is not _half_batch:
                break
        for s in steps:
            tag = f"{label} (batch {s.batch_size})" if change is _half_batch else label
            full = " + ".join([*labels, tag])
            out.append(rederive(out[-1], s, full) or estimate_step(s, full))
            if all_fit():
                break
        if steps:
            labels.append(label)
    return out


def estimate_run(spec: EstimateSpec, total_steps: int, price_per_hour: float = 0.0, utilisation: float = 0.35,
                 gpu_keys: list[str] | None = None, context_gib: float = CONTEXT_GIB,
                 fragmentation: float = FRAGMENTATION) -> str:
    """The whole dry-run answer for `spec`: estimate, alternatives where a card does not fit, and the report."""
    gpus = load_gpus(keys=gpu_keys)
    estimates = ladder(estimate_step(spec, "as configured"), gpus, context_gib, fragmentation)
    return report(estimates, gpus, price_per_hour, total_steps, utilisation, context_gib, fragmentation)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(spec: EstimateSpec) -> str:
    """One line with the settings that decide the estimate."""
    h, w = spec.resolution
    parts = [f"{spec.family} {spec.method}", f"{w}x{h} px", f"batch {spec.batch_size}"]
    if spec.gradient_accumulation_steps > 1:
        parts.append(f"x{spec.gradient_accumulation_steps} accumulation")
    parts += [f"mixed precision {spec.mixed_precision}", f"frozen weights {spec.frozen_dtype()}".replace("torch.", ""),
              spec.optimizer]
    if spec.method == "lora" and spec.network is not None:
        parts.append(f"rank {spec.network.network_dim} {spec.network.target}")
    flags = [("gradient checkpointing", spec.gradient_checkpointing), ("cached latents", spec.cache_latents),
             ("cached text outputs", spec.cache_text_outputs), ("full bf16", spec.full_bf16),
             (f"DeepSpeed ZeRO-{spec.deepspeed_stage}", spec.deepspeed_stage > 0),
             ("CPU optimizer offload", spec.offload_optimizer), ("text encoder trained", spec.trains_text_encoder())]
    return ", ".join(parts + [name for name, on in flags if on])


def breakdown(e: Estimate, context_gib: float = CONTEXT_GIB, fragmentation: float = FRAGMENTATION) -> list[str]:
    """The memory lines of one estimate."""
    allowance = allowance_bytes(e.peak, context_gib, fragmentation)
    lines = [
        (f"  peak tensor memory   {_gib(e.peak)} = weights {_gib(e.weights)} + gradients {_gib(e.gradients)}"
         f" + optimizer state {_gib(e.optimizer_state)} + activations/temporaries {_gib(e.activations)}"),
        (f"  + allowance          {_gib(allowance)} (CUDA context {context_gib:.2f} GiB + allocator"
         f" {fragmentation:.0%} of the peak)"),
        f"  = GPU memory needed  {_gib(needed_bytes(e.peak, context_gib, fragmentation))}",
        f"  trained parameters   {e.trained_params / 1e6:,.1f} M;  FLOPs per optimizer step {e.flops / 1e12:.2f} TFLOP",
    ]
    if e.cpu_bytes:
        lines.append(f"  CPU memory (offload) {_gib(e.cpu_bytes)}")
    lines += [f"  note: {n}" for n in e.notes]
    return lines


def report(estimates: list[Estimate], gpus: list[GPU], price_per_hour: float, total_steps: int, utilisation: float,
           context_gib: float = CONTEXT_GIB, fragmentation: float = FRAGMENTATION) -> str:
    """The printed report. `estimates[0]` is the run as configured; the others are alternatives (from `ladder`),
    cheapest first: a card the first does not fit gets the first alternative that fits it."""
    base = estimates[0]
    lines = [f"Estimate for: {describe(base.spec)}", *breakdown(base, context_gib, fragmentation)]
    for alt in estimates[1:]:
        lines += [f"With {alt.label}:", *breakdown(alt, context_gib, fragmentation)]
    lines.append(f"Time at {utilisation:.0%} of each card's peak dense FP16/BF16 tensor throughput (set"
                 " [estimate] utilisation); FP32 peak without mixed precision:")
    header = f"  {'GPU':<20} {'memory':>7}  {'s/step':>7}  {f'{total_steps} steps':>12}"
    if price_per_hour > 0:
        header += f"  {f'at ${price_per_hour:.2f}/h':>11}"
    lines.append(header + "  fits")
    for gpu in gpus:
        chosen = next((e for e in estimates if fits(e.peak, gpu, context_gib, fragmentation)), None)
        if chosen is None:
            lines.append(f"  {gpu.name:<20} {gpu.memory_gib:>4.0f} GB  {'-':>7}  {'-':>12}"
                         + (f"  {'-':>11}" if price_per_hour > 0 else "") + "  no, even with every change above")
            continue
        per_step = step_seconds(chosen.flops, gpu.peak_tflops(chosen.spec.mixed_precision), utilisation)
        total = per_step * total_steps
        row = f"  {gpu.name:<20} {gpu.memory_gib:>4.0f} GB  {per_step:>7.2f}  {_duration(total):>12}"
        if price_per_hour > 0:
            row += f"  {'$' + format(total / 3600 * price_per_hour, ',.2f'):>11}"
        row += "  yes" if chosen is base else f"  only with {chosen.label}"
        if tight(chosen.peak, gpu, context_gib, fragmentation):
            row += f" (tight: under {TIGHT_MARGIN_GIB:g} GiB to spare)"
        lines.append(row)
    lines.append(f"Not yet checked against a GPU: cuDNN/cuBLAS workspaces and memory other programs (a desktop) hold"
                 f" on the card are not included, so nvidia-smi shows more; a fit with under {TIGHT_MARGIN_GIB:g}"
                 " GiB to spare may not hold.")
    lines.append("Estimated on fake tensors in " + ", ".join(f"{e.seconds:.0f} s" for e in estimates if e.seconds))
    return "\n".join(lines)


def spec_from_sections(method: str, family: str, config_dir, train, optimizer, data, network=None,
                       ti_vectors: int = 1, hn_layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)) -> EstimateSpec:
    """The EstimateSpec of a run from its resolved tables: `[train]` (TrainConfig, with `deepspeed` when the config
    has it), `[optimizer]`, `[data]` and `[network]`; `family` and `config_dir` as the loaded model says."""
    from library.models.families import native_resolution_of_folder

    side = data.resolution or native_resolution_of_folder(family, config_dir)
    width, height = (side, side) if isinstance(side, int) else (side[0], side[1])
    deepspeed = getattr(train, "deepspeed", None)
    stage = deepspeed.zero_stage if deepspeed is not None else 0
    return EstimateSpec(
        family=family, config_dir=config_dir, method=method, network=network, ti_vectors=ti_vectors,
        hn_layer_structure=tuple(hn_layer_structure), resolution=(height, width), batch_size=data.batch_size,
        mixed_precision=train.mixed_precision, full_bf16=train.full_bf16,
        gradient_checkpointing=train.gradient_checkpointing, train_text_encoder=train.train_text_encoder,
        optimizer=optimizer.optimizer_type, cache_latents=data.cache_latents,
        cache_text_outputs=data.cache_text_encoder_outputs, deepspeed_stage=stage,
        offload_optimizer=stage > 0 and deepspeed.offload_optimizer == "cpu",
        offload_params=stage > 0 and deepspeed.offload_param == "cpu", max_grad_norm=optimizer.max_grad_norm,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
    )
