"""DeepSpeed ZeRO through accelerate, configured from our TOML (`[train.deepspeed]`), never from a DeepSpeed JSON.

    [train.deepspeed]
    zero_stage = 2              # 1, 2 or 3; 0 = off
    offload_optimizer = "cpu"   # optimizer states in CPU memory, stepped by DeepSpeed's CPU Adam

What maps where:
- `train.gradient_accumulation_steps` -> DeepSpeed `gradient_accumulation_steps`; `optimizer.max_grad_norm` ->
  `gradient_clipping`; `train.mixed_precision` -> `bf16` / `fp16` (set by accelerate's plugin); the data's batch
  size -> `train_micro_batch_size_per_gpu` (DeepSpeed refuses to start without it).
- The optimizer is ours, built here and handed to DeepSpeed (so its config has no "optimizer" section): with CPU
  offload it must be DeepSpeed's `DeepSpeedCPUAdam` (DeepSpeed steps offloaded states on the CPU with that op), built
  with our learning rates per group, betas, eps and decoupled weight decay (`adamw_mode=True`, as torch.optim.AdamW).
  Only `optimizer_type = "AdamW"` is accepted there. Without offload the element-wise optimizers (AdamW, Lion, SGD)
  run on ZeRO's flat partitions unchanged; factored or globally-normalised ones (Adafactor, CAME: per-matrix row/column
  statistics; Prodigy: a sum over all parameters, which each rank would see only its partition of) and 8-bit ones
  (untested on flat partitions) are refused.
- The learning-rate schedule stays ours (a LambdaLR over the optimizer's groups, stepped by the loop after each step
  DeepSpeed really applied), so warmup / cosine / restarts behave exactly as without DeepSpeed.

Accumulation, clipping and the optimizer step belong to the DeepSpeed engine (accelerate's `backward` calls
`engine.backward` and, at the accumulation boundary, `engine.step`), so the loop hands them to `EngineSteps`.
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch

from library.config.optim import OptimizerConfig
from library.config.train import DeepSpeedConfig
from library.errors import ConfigError

# Element-wise optimizers: the same update on a flat ZeRO partition as on the original tensors.
PARTITION_SAFE_OPTIMIZERS = ("AdamW", "Lion", "SGD")


def require_deepspeed() -> None:
    """DeepSpeed is an optional extra: imported only when configured, and its absence named with the fix."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError("train.deepspeed.zero_stage > 0 needs the deepspeed package: pip install deepspeed "
                          f"(and ninja, for its CPU Adam op) ({e})") from None


def check_optimizer(ds: DeepSpeedConfig, opt: OptimizerConfig) -> None:
    """Refuse optimizers that DeepSpeed would run wrongly, naming the key."""
    if ds.offload_optimizer != "none" and opt.optimizer_type != "AdamW":
        raise ConfigError(
            f"optimizer.optimizer_type = {opt.optimizer_type!r} with train.deepspeed.offload_optimizer = 'cpu': "
            "offloaded optimizer states are stepped by DeepSpeed's CPU Adam, so use optimizer_type = 'AdamW' "
            "(or offload_optimizer = 'none')")
    if opt.optimizer_type not in PARTITION_SAFE_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.optimizer_type = {opt.optimizer_type!r} with train.deepspeed: DeepSpeed steps flat "
            f"partitions of the weights, which only element-wise optimizers handle unchanged; use one of "
            f"{', '.join(PARTITION_SAFE_OPTIMIZERS)}")


def deepspeed_config(ds: DeepSpeedConfig, *, gradient_accumulation_steps: int, micro_batch_size: int,
                     max_grad_norm: float) -> dict[str, Any]:
    """The DeepSpeed config dict of our tables (precision is added by accelerate's plugin from mixed_precision).

    `zero_force_ds_cpu_optimizer = False`: accelerate would otherwise replace our optimizer by a DeepSpeedCPUAdam of
    its own that keeps only lr and weight decay (accelerate.utils.deepspeed.map_pytorch_optim_to_deepspeed), losing
    betas and eps; ours already is a DeepSpeedCPUAdam on that path.
    """
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param}
    if ds.zero_stage == 3:
        # Saves gather the weights themselves (see EngineSteps.full_weights); DeepSpeed's 16-bit copy is not needed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,  # our progress bar and TensorBoard report; DeepSpeed's own log would repeat them
    }
    return _merge(config, ds.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into `base`, tables recursively (so extra.zero_optimization adds keys, not replaces)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_plugin(config: dict[str, Any]):
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=config)


def single_process_env() -> None:
    """Let `python train_native.py` (no launcher) run DeepSpeed as a world of one.

    accelerate starts DeepSpeed only in a launched process (LOCAL_RANK set; accelerate/state.py), and DeepSpeed's
    process group reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a launcher sets all of them, so this only
    fills in what is missing.
    """
    if "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def build_optimizer(groups: list[dict], ds: DeepSpeedConfig, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """Our optimizer, or DeepSpeed's CPU Adam with the same hyper-parameters when optimizer states are offloaded."""
    from library.training.optim import build_optimizer as build_ours

    check_optimizer(ds, opt)
    if ds.offload_optimizer == "none":
        return build_ours(groups, opt)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{**g, "params": list(g["params"]), "lr": g.get("lr", opt.learning_rate)} for g in groups]
    known = {"bias_correction", "amsgrad", "fp32_optimizer_states"}
    unknown = sorted(set(opt.optimizer_args) - known)
    if unknown:
        raise ConfigError(f"optimizer.optimizer_args {unknown} are not options of DeepSpeed's CPU Adam "
                          f"(train.deepspeed.offload_optimizer = 'cpu'); it takes {sorted(known)}")
    # adamw_mode=True: decoupled weight decay, the update of torch.optim.AdamW (Loshchilov & Hutter, arXiv 1711.05101)
    return DeepSpeedCPUAdam(groups, lr=opt.learning_rate, betas=tuple(opt.betas[:2]), eps=opt.eps,
                            weight_decay=opt.weight_decay, adamw_mode=True, **opt.optimizer_args)


class EngineSteps:
    """Optimizer steps owned by the DeepSpeed engine (ZeRO); same interface as setup.ManualSteps.

    DeepSpeed divides each micro-batch loss by the accumulation count itself, sums gradients into its partitions,
    and at the boundary micro-batch (accelerate's `sync_gradients`) clips, steps and zeroes. It also checks the
    gradients for inf/NaN and skips the step (fp32, bf16 and fp16 alike: DeepSpeedZeroOptimizer.step marks an invalid
    gradient norm as overflow), so a non-finite loss is still handed to it, poisoned to NaN so the engine certainly
    skips (a NaN loss can have finite gradients, e.g. NaN only in a target), and the engine's verdict
    (`was_step_applied`) is what the loop counts.
    """

    resumable = False  # resume states would need DeepSpeed's partitioned checkpoint; refused in config

    def __init__(self, accelerator, engine, accumulation: int, zero_stage: int):
        self.accelerator, self.engine, self.accumulation, self.zero_stage = accelerator, engine, accumulation, zero_stage

    @contextmanager
    def micro(self, index: int) -> Iterator[None]:
        # accelerate passes sync_gradients to the engine as the accumulation boundary (DeepSpeedEngineWrapper)
        self.accelerator.gradient_state._set_sync_gradients(index == self.accumulation - 1)
        try:
            yield
        finally:
            self.accelerator.gradient_state._set_sync_gradients(True)

    def backward(self, loss: torch.Tensor, finite: bool) -> None:
        self.accelerator.backward(loss if finite else loss * math.nan)

    def step(self, all_finite: bool) -> bool:
        return bool(self.engine.was_step_applied())

    def full_weights(self):
        """Context in which the module's parameters are whole (ZeRO-3 partitions them); entered on every rank."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
