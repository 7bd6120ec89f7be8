"""The one training loop every script shares.

One optimizer step:
  method.before_step -> for each of `gradient_accumulation_steps` batches: latents (cached, or encoded by the VAE) ->
  text conditioning (cached while the text encoders are frozen) -> objective.prepare (noise, timesteps, target) ->
  UNet -> objective.loss (per-sample weights, masks, min-SNR, ...) -> backward
  -> non-finite guard -> gradient clipping -> optimizer and LR-scheduler step -> EMA -> method.after_optimizer_step
  -> log -> save (result + resume state) / sample when due.
The noise of each batch comes from a generator seeded by (seed, global batch number), the data order and caption RNG
are keyed by (seed, epoch, index), and the rest (positions, optimizer, torch RNG) is saved in resume states: so a
resumed run continues bit-identically (CPU), and N processes with batch B see the same batches and noise as one
process with batch B and N accumulation steps.

Who runs accumulation, clipping and the optimizer step is a small strategy object chosen once below: `ManualSteps`
(this process: loss / N, no_sync, clip, step) or, with `[train.deepspeed]`, `EngineSteps` (the DeepSpeed engine does
all of it inside accelerate's backward). Both are driven by the same loop, so the data, noise, logging, saving and
NaN handling exist once; only the part DeepSpeed takes over differs.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from library.config.optim import OptimizerConfig, SchedulerConfig
from library.config.train import LogConfig, SampleConfig, SaveConfig, TrainConfig
from library.errors import ConfigError, DataError, UserError
from library.fileio import recover_interrupted_writes
from library.models.model import SDModel
from library.training import faults
from library.training import state as st
from library.training.ema import EMA
from library.training.method import Method
from library.training.saving import USUAL_FIXES, TrainingStopped, save as _save
from library.training.setup import (ManualSteps, configure_unet, effective_precision, make_accelerator, pick_device,
                                    weight_dtype)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean loss of each optimizer step this process ran
    result_path: Path | None
    nan_steps: int
    # seconds: wall; compute (whole steps); model (UNet forward + backward + optimizer step); save; sample
    timings: dict[str, float] = field(default_factory=dict)
    model: SDModel | None = None  # the trained model, as it is in memory after the run


@dataclass
class LoopSettings:
    """What the loop needs besides the model, method and data: the config sections it reads."""

    train: TrainConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    save: SaveConfig
    sample: SampleConfig
    log: LogConfig
    clip_skip: int = 1
    resolution: int = 512
    metadata: dict[str, str] = field(default_factory=dict)  # written into every saved result
    fixed_captions: list[str] | None = None  # data.cache_text_encoder_outputs: encode these once, offload encoders


def batch_seed(seed: int, number: int) -> int:
    """Seed of the noise generator for global batch `number` (0, 1, 2, ... across steps, accumulation, ranks)."""
    return ((seed & 0xFFFFFFFF) << 32) | (number & 0xFFFFFFFF)


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_train_epochs > 0:
        return cfg.max_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    return cfg.max_train_steps


def train(model: SDModel, method: Method, data: Any, objective: Any, s: LoopSettings) -> TrainResult:
    from library.models.text import encode_text, sdxl_time_ids, tokenize
    from library.training.optim import build_optimizer, build_scheduler

    cfg = s.train
    ds = cfg.deepspeed
    device = pick_device(cfg)
    precision = effective_precision(cfg, device)
    plugin = _deepspeed_plugin(s, data) if ds.enabled else None
    accelerator = make_accelerator(cfg, device, precision, plugin)
    torch.manual_seed(cfg.seed)
    out_dir = Path(s.save.output_dir)

    groups = method.setup(model)
    trained = [p for g in groups for p in g["params"]]
    _place(model, device, weight_dtype(precision), trained, full_bf16=cfg.full_bf16)
    configure_unet(model.unet, cfg, device)
    steps_total = total_steps(cfg, data.steps_per_epoch)
    modules = method.modules_to_prepare(model)
    if ds.enabled:
        from library.training import deepspeed as dsp

        if len(modules) != 1:
            raise ConfigError(f"train.deepspeed: the {method.name} method trains {len(modules)} modules, and DeepSpeed "
                              "wraps one; set train.deepspeed.zero_stage = 0")
        optimizer = dsp.build_optimizer(groups, ds, s.optimizer)
        # The schedule acts on the real optimizer's groups (DeepSpeed's ZeRO optimizer steps those), and is stepped
        # by this loop, not by accelerate, so it counts optimizer steps exactly as without DeepSpeed.
        lr_scheduler = build_scheduler(optimizer, s.scheduler, steps_total)
        engine, optimizer = accelerator.prepare(modules[0], optimizer)  # DeepSpeed needs both in one call
        wrapped = [engine]
        steps = dsp.EngineSteps(accelerator, engine, cfg.gradient_accumulation_steps, ds.zero_stage)
    else:
        optimizer = build_optimizer(groups, s.optimizer)
        lr_scheduler = build_scheduler(optimizer, s.scheduler, steps_total)
        if accelerator.num_processes > 1 and model.unet in modules:
            # Only the UNet is wrapped in DDP: the text encoders are called through library.models.text, which
            # needs the bare modules, so their trained gradients are averaged by hand (_average_gradients).
            wrapped = [accelerator.prepare(m) if m is model.unet else m for m in modules]
        else:
            wrapped = modules  # no DDP wrapper; autocast is applied explicitly below
        optimizer = accelerator.prepare(optimizer)
    unet_call = wrapped[[m is model.unet for m in modules].index(True)] if model.unet in modules else model.unet
    if not ds.enabled:
        steps = ManualSteps(accelerator, optimizer, unet_call, trained, cfg.gradient_accumulation_steps,
                            s.optimizer.max_grad_norm)
    unet_ids = {id(p) for p in model.unet.parameters()} if unet_call is not model.unet else set()
    unwrapped_trained = [p for p in trained if id(p) not in unet_ids]  # not all-reduced by DDP
    ema = EMA(trained, cfg.ema_decay, torch.device("cpu") if cfg.ema_on_cpu else None) if cfg.ema else None

    if accelerator.is_main_process:
        for p in recover_interrupted_writes(out_dir):  # what a killed run left half-written
            _say(accelerator, f"cleaned up after an interrupted write: {p}")
    counters = st.Counters()
    resume_dir = st.find_resume_dir(cfg.resume, out_dir)
    if resume_dir is not None:
        counters, trainable, saved = st.load_state(resume_dir)
        method.load_trainable_state(model, trainable)
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["scheduler"])
        data.load_state_dict(saved["data"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        st.set_rng_state(saved["rng"])
        _say(accelerator, f"resumed from {resume_dir} at step {counters.step}")

    prompts = _sample_prompts(s)
    writer = _writer(s, out_dir) if accelerator.is_main_process else None
    text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    autocast = accelerator.autocast if precision != "no" else nullcontext
    losses: list[float] = []
    timings = {"compute": 0.0, "model": 0.0, "save": 0.0, "sample": 0.0}
    consecutive_nan = 0
    result_path: Path | None = None
    batches = _batch_stream(data)
    bar = _progress(s, accelerator, counters.step, steps_total)
    wall0 = time.perf_counter()

    def encode(captions: list[str]):
        return encode_text(model, [t.to(device) for t in tokenize(model, captions)], clip_skip=s.clip_skip)

    def text_cond(captions: list[str], step: int):
        if method.trains_text_encoder(step):
            with autocast():
                c = encode(captions)
            return c.hidden, c.pooled
        missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if len(text_cache) + len(missing) > 50_000:  # bounded: shuffled / dropped captions rarely repeat
            with torch.no_grad(), autocast():
                c = encode(captions)
            return c.hidden, c.pooled
        if missing:
            with torch.no_grad(), autocast():
                c = encode(missing)
            for i, cap in enumerate(missing):
                text_cache[cap] = (c.hidden[i], None if c.pooled is None else c.pooled[i])
        hidden = torch.stack([text_cache[c][0] for c in captions])
        pooled = None if text_cache[captions[0]][1] is None else torch.stack([text_cache[c][1] for c in captions])
        return hidden, pooled

    def micro_step(batch: dict, step: int, micro: int) -> tuple[torch.Tensor, bool]:
        number = (step * cfg.gradient_accumulation_steps + micro) * accelerator.num_processes + accelerator.process_index
        noise_gen = torch.Generator(device=device).manual_seed(batch_seed(cfg.seed, number))
        latents = batch["latents"].to(device) if "latents" in batch else _encode(model, batch["pixels"].to(device),
                                                                                   noise_gen)
        hidden, pooled = text_cond(method.prepare_captions(batch["captions"], number), step)
        prepared = objective.prepare(latents.float(), noise_gen)
        added = None
        if model.family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
            added = {"text_embeds": pooled, "time_ids": time_ids.to(device, hidden.dtype)}
        masks = batch.get("masks")
        t = time.perf_counter()
        with steps.micro(micro):
            with autocast():
                pred = unet_call(prepared.noisy_latents, prepared.timesteps, encoder_hidden_states=hidden,
                                 added_cond_kwargs=added, return_dict=False)[0]
            loss, _ = objective.loss(pred.float(), prepared, masks=None if masks is None else masks.to(device),
                                     weights=batch["loss_weights"].to(device))
            if faults.nan_batch(data.epoch * data.steps_per_epoch + data.position):
                loss = loss * float("nan")
            finite = bool(torch.isfinite(loss))
            steps.backward(loss, finite)
        timings["model"] += time.perf_counter() - t
        return loss.detach(), finite

    if s.fixed_captions:
        _cache_all_captions(s.fixed_captions, method, model, text_cond, device)
    for m in modules:
        m.train()
    try:
        while counters.step < steps_total:
            t0 = time.perf_counter()
            method.before_step(model, counters.step)
            step_losses, all_finite, epoch_end = [], True, False
            for micro in range(cfg.gradient_accumulation_steps):
                counters.epoch, batch, epoch_end = _next_batch(batches)
                loss, finite = micro_step(batch, counters.step, micro)
                step_losses.append(float(loss))
                all_finite &= finite
            faults.kill_point("step", counters.step + 1)
            t = time.perf_counter()
            if accelerator.num_processes > 1 and not ds.enabled:
                _average_gradients(unwrapped_trained)
            stepped = steps.step(all_finite)  # ManualSteps: clip + step; EngineSteps: DeepSpeed already stepped
            timings["model"] += time.perf_counter() - t
            if not stepped:
                counters.nan_steps += 1
                consecutive_nan += 1
                what = "loss" if not all_finite else "gradients"
                _say(accelerator, f"step {counters.step + 1}: non-finite {what}, step skipped "
                                  f"({consecutive_nan} in a row, {counters.nan_steps} in total)")
                if consecutive_nan >= cfg.max_consecutive_nan_steps:
                    what = f"{consecutive_nan} non-finite steps in a row at step {counters.step + 1}; stopped"
                    saved = "nothing is saved (no resume states with DeepSpeed)"
                    if steps.resumable:
                        try:
                            _save(s, method, model, data, optimizer, lr_scheduler, ema, counters, accelerator, steps,
                                  with_result=False)
                        except TrainingStopped as e:  # the weights themselves are no longer finite
                            raise TrainingStopped(f"{what}: {e}") from None
                        saved = (f"the last good state is saved under {st.state_root(out_dir)} "
                                 "(resume with train.resume = 'auto')")
                    raise TrainingStopped(f"{what}, and {saved}. {USUAL_FIXES}")
                continue
            consecutive_nan = 0
            lr_scheduler.step()
            if ema is not None:
                ema.step()
            extra_logs = method.after_optimizer_step(model, counters.step)
            counters.step += 1
            timings["compute"] += time.perf_counter() - t0
            mean_loss = sum(step_losses) / len(step_losses)
            losses.append(mean_loss)
            _log(writer, bar, s, counters.step, mean_loss, lr_scheduler.get_last_lr(), extra_logs)

            done = counters.step >= steps_total
            if not done and _due(counters.step, s.save.save_every_n_steps, epoch_end, counters.epoch,
                                 s.save.save_every_n_epochs):
                t = time.perf_counter()
                _save(s, method, model, data, optimizer, lr_scheduler, ema, counters, accelerator, steps,
                      with_result=True)
                timings["save"] += time.perf_counter() - t
            if prompts and not done and _due(counters.step, s.sample.sample_every_n_steps, epoch_end,
                                             counters.epoch, s.sample.sample_every_n_epochs):
                t = time.perf_counter()
                _sample(model, modules, prompts, s, out_dir, counters.step, accelerator, steps)
                timings["sample"] += time.perf_counter() - t
        t = time.perf_counter()
        result_path = _save(s, method, model, data, optimizer, lr_scheduler, ema, counters, accelerator, steps,
                            with_result=True, final=True)
        timings["save"] += time.perf_counter() - t
        if prompts and s.sample.sample_at_end:
            t = time.perf_counter()
            _sample(model, modules, prompts, s, out_dir, counters.step, accelerator, steps, final=True)
            timings["sample"] += time.perf_counter() - t
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        # torch raises this from its SIGCHLD handler (wherever the main process is, a save included: atomic writes
        # keep the files whole) or when the next batch never comes.
        raise DataError(f"a data loader worker process died ({str(e).splitlines()[0]}). A killed worker is most "
                        "often out of memory: lower data.num_workers or data.batch_size, or set data.num_workers = 0 "
                        "to see any error in the main process. The last complete resume state under "
                        f"{st.state_root(out_dir)} is intact (resume with train.resume = 'auto')") from None
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    timings["wall"] = time.perf_counter() - wall0
    accelerator.end_training()
    return TrainResult(counters.step, losses, result_path, counters.nan_steps, timings, model)


def _cache_all_captions(captions: list[str], method: Method, model: SDModel, text_cond, device) -> None:
    """Encode every caption now; the text encoders then leave the GPU (they come back only to sample)."""
    from library.errors import ConfigError

    if method.trains_text_encoder(0):
        raise ConfigError("data.cache_text_encoder_outputs = true, but this run trains the text encoder(s): "
                          "turn the caching off, or stop training the text encoder(s)")
    for i in range(0, len(captions), 64):
        text_cond(captions[i:i + 64], 0)
    if device.type != "cpu":
        for enc in model.text_encoders:
            enc.to("cpu")


def _average_gradients(params: list) -> None:
    """Mean of each gradient over the processes, for trained parameters outside the DDP-wrapped UNet."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _place(model: SDModel, device: torch.device, dtype: torch.dtype, trained: list, full_bf16: bool) -> None:
    """Frozen weights in the autocast dtype (less memory), trained ones in fp32 (or bf16 with full_bf16)."""
    trained_ids = {id(p) for p in trained}
    for module in [model.unet, *model.text_encoders]:
        module.to(device)
        for p in module.parameters():
            if id(p) in trained_ids:
                p.data = p.data.to(torch.bfloat16 if full_bf16 else torch.float32)
            elif p.dtype != dtype:
                p.data = p.data.to(dtype)
    model.vae.to(device)
    if model.vae.dtype != torch.float32:
        model.vae.to(dtype=torch.float32)  # the SD/SDXL VAEs overflow in fp16; encoding is not the bottleneck
    for enc in model.text_encoders:
        enc.eval()
    model.vae.eval()


@torch.no_grad()
def _encode(model: SDModel, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    dist = model.vae.encode(pixels.to(model.vae.dtype)).latent_dist
    latents = dist.sample(generator=generator)
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * model.vae.config.scaling_factor


def _next_batch(batches: Iterator[tuple[int, dict, bool]]) -> tuple[int, dict, bool]:
    """The next batch; a user error raised in a data loader worker keeps its one-line message."""
    try:
        return next(batches)
    except UserError as e:
        # A DataError raised in a worker comes back re-created with the worker's traceback as its message (torch's
        # ExceptionWrapper); its last line is the original message.
        if "Original Traceback" not in str(e):
            raise
        last = str(e).strip().splitlines()[-1]
        raise type(e)(last.removeprefix(f"{type(e).__module__}.{type(e).__qualname__}: ")) from None


def _batch_stream(data: Any) -> Iterator[tuple[int, dict, bool]]:
    """(epoch, batch, last batch of its epoch) forever, continuing from the data's (possibly restored) position.

    No look-ahead: the data's position always equals the batches really consumed, which resume states record.
    """
    while True:
        for batch in data:
            yield data.epoch, batch, data.position >= data.steps_per_epoch
        data.set_epoch(data.epoch + 1)


def _due(step: int, every_steps: int, epoch_end: bool, epoch: int, every_epochs: int) -> bool:
    """Every N steps, or at the end of every N-th epoch (`epoch` is 0-based, so epoch + 1 epochs are complete)."""
    return (every_steps > 0 and step % every_steps == 0) or (
        epoch_end and every_epochs > 0 and (epoch + 1) % every_epochs == 0)


def _sample_prompts(s: LoopSettings):
    from library.training.sample import SamplePrompt, read_prompts

    side = s.resolution
    defaults = SamplePrompt(prompt="", width=s.sample.width or side, height=s.sample.height or side,
                            seed=s.sample.seed, steps=s.sample.steps, cfg_scale=s.sample.cfg_scale)
    return read_prompts(s.sample.prompts, s.sample.prompts_file, defaults)


def _sample(model, modules, prompts, s: LoopSettings, out_dir: Path, step: int, accelerator, steps,
            final: bool = False) -> None:
    with steps.full_weights():  # entered on every rank (ZeRO-3 gathers collectively); only the main one samples
        _sample_main(model, modules, prompts, s, out_dir, step, accelerator, final)


def _sample_main(model, modules, prompts, s: LoopSettings, out_dir: Path, step: int, accelerator, final) -> None:
    from library.training.sample import generate, save_images

    if not accelerator.is_main_process:
        return
    for m in modules:
        m.eval()
    device = next(model.unet.parameters()).device
    for enc in model.text_encoders:
        enc.to(device)  # back from the CPU if text outputs were cached
    try:
        images = generate(model, prompts, sampler=s.sample.sampler, base_seed=s.train.seed, clip_skip=s.clip_skip)
        faults.kill_point("sample", step)
        save_images(images, prompts, out_dir / "sample", f"{'final_' if final else ''}step{step:08d}")
    finally:
        for m in modules:
            m.train()
        if s.fixed_captions and device.type != "cpu":
            for enc in model.text_encoders:
                enc.to("cpu")


def _deepspeed_plugin(s: LoopSettings, data: Any):
    """accelerate's DeepSpeedPlugin from our tables (library/training/deepspeed.py); refuses what it cannot run."""
    from library.training import deepspeed as dsp

    dsp.require_deepspeed()
    dsp.check_optimizer(s.train.deepspeed, s.optimizer)
    if s.save.save_state:
        raise ConfigError("save.save_state = true with train.deepspeed: resume states are not supported with "
                          "DeepSpeed (its optimizer state is partitioned inside the engine); set save.save_state = "
                          "false (results are still saved)")
    dsp.single_process_env()
    config = dsp.deepspeed_config(s.train.deepspeed, gradient_accumulation_steps=s.train.gradient_accumulation_steps,
                                  micro_batch_size=getattr(data, "batch_size", None) or 1,
                                  max_grad_norm=s.optimizer.max_grad_norm)
    return dsp.make_plugin(config)


def _writer(s: LoopSettings, out_dir: Path):
    if s.log.log_with != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=s.log.logging_dir or str(out_dir / "logs"))


def _progress(s: LoopSettings, accelerator, start: int, total: int):
    if not (s.log.progress_bar and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="steps", dynamic_ncols=True, file=sys.stderr)


def _log(writer, bar, s: LoopSettings, step: int, loss: float, lrs: list[float], extra: dict[str, float]) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", refresh=False)
    if writer is not None and step % max(1, s.log.log_every_n_steps) == 0:
        writer.add_scalar("loss/step", loss, step)
        for i, lr in enumerate(lrs):
            writer.add_scalar(f"lr/group{i}", lr, step)
        for k, v in extra.items():
            writer.add_scalar(k, v, step)


def _say(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr)
