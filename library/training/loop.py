"""The one training loop every script shares.

One optimizer step (`Trainer.train_step`):
  method.before_step -> for each of `gradient_accumulation_steps` batches (`forward_backward`): method.batch_loss,
  by default `loss_of`: latents (cached, or encoded by the VAE) -> text conditioning (cached while the text encoders
  are frozen) -> objective.prepare (noise, timesteps, target) -> the denoiser (library/models/forward.py) ->
  objective.loss (per-sample weights, masks, min-SNR, ...); then backward
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
from library.methods.base import Method, RunFacts, SaveContext
from library.models.forward import predict
from library.models.model import SDModel
from library.training import faults
from library.training import state as st
from library.training.conditioning import TextConditioner
from library.training.ema import EMA
from library.training.outputs import log_step, progress_bar, sample_images, writer_for
from library.training.saving import USUAL_FIXES, TrainingStopped, save as _save
from library.training.validation import validation_due, validation_loss
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
    validation: dict[int, float] = field(default_factory=dict)  # step -> held-out loss (data validation_split)


@dataclass
class LoopSettings:
    """What the loop needs besides the model, method and data: its config sections and the resolved run facts."""

    train: TrainConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    save: SaveConfig
    sample: SampleConfig
    log: LogConfig
    facts: RunFacts
    batch_size: int = 1  # micro-batch size (the first dataset's): DeepSpeed's train_micro_batch_size_per_gpu
    prompts: tuple = ()  # parsed sample prompts
    cache_text: bool = False  # data.cache_text_encoder_outputs: encode every caption once, offload the encoders


def batch_seed(seed: int, number: int) -> int:
    """Seed of the noise generator for global batch `number` (0, 1, 2, ... across steps, accumulation, ranks)."""
    return ((seed & 0xFFFFFFFF) << 32) | (number & 0xFFFFFFFF)


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    if cfg.max_train_epochs > 0:
        return cfg.max_train_epochs * math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    return cfg.max_train_steps


def train(model: SDModel, method: Method, data: Any, objective: Any, s: LoopSettings) -> TrainResult:
    """Set up, resume if asked, run every step; see `Trainer` for the phases."""
    trainer = Trainer(model, method, data, objective, s)
    trainer.setup()
    trainer.resume()
    return trainer.run()


class Trainer:
    """The one training loop, in named phases: `setup`, `resume`, `run` -> `train_step` (`forward_backward` of each
    micro-batch, `optimizer_step`) -> `after_step` (log, and the save / sample triggers) -> `finish`."""

    def __init__(self, model: SDModel, method: Method, data: Any, objective: Any, s: LoopSettings):
        self.model, self.method, self.data, self.objective, self.s = model, method, data, objective, s
        self.save = s.save  # what library.training.saving reads
        self.out_dir = Path(s.save.output_dir)
        self.counters = st.Counters()
        self.losses: list[float] = []
        self.timings = {"compute": 0.0, "model": 0.0, "save": 0.0, "sample": 0.0, "validation": 0.0}
        self.validation: dict[int, float] = {}
        self.consecutive_nan = 0

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        cfg, model = self.s.train, self.model
        self.device = pick_device(cfg)
        self.precision = effective_precision(cfg, self.device)
        plugin = _deepspeed_plugin(self.s) if cfg.deepspeed.enabled else None
        self.accelerator = make_accelerator(cfg, self.device, self.precision, plugin)
        torch.manual_seed(cfg.seed)
        groups = self.method.setup(model)
        self.trained = [p for g in groups for p in g["params"]]
        _place(model, self.device, weight_dtype(self.precision), self.trained, full_bf16=cfg.full_bf16)
        configure_unet(model.unet, cfg, self.device)
        self.steps_total = total_steps(cfg, self.data.steps_per_epoch)
        self.modules = self.method.modules_to_prepare(model)
        self._prepare(groups)
        unet_ids = {id(p) for p in model.unet.parameters()} if self.denoiser is not model.unet else set()
        self.unwrapped_trained = [p for p in self.trained if id(p) not in unet_ids]  # not all-reduced by DDP
        self.ema = EMA(self.trained, cfg.ema_decay, torch.device("cpu") if cfg.ema_on_cpu else None) \
            if cfg.ema else None
        self.autocast = self.accelerator.autocast if self.precision != "no" else nullcontext
        self.text = TextConditioner(model, self.device, self.s.facts.clip_skip, self.autocast)

    def _prepare(self, groups: list[dict]) -> None:
        """Optimizer, schedule and the strategy that runs accumulation / clipping / steps (ManualSteps or, with
        `[train.deepspeed]`, the DeepSpeed engine's EngineSteps)."""
        from library.training.optim import build_optimizer, build_scheduler

        cfg, model, modules = self.s.train, self.model, self.modules
        if cfg.deepspeed.enabled:
            from library.training import deepspeed as dsp

            if len(modules) != 1:
                raise ConfigError(f"train.deepspeed: the {self.method.name} method trains {len(modules)} modules, and "
                                  "DeepSpeed wraps one; set train.deepspeed.zero_stage = 0")
            self.optimizer = dsp.build_optimizer(groups, cfg.deepspeed, self.s.optimizer)
            # The schedule acts on the real optimizer's groups (DeepSpeed's ZeRO optimizer steps those), and is
            # stepped by this loop, not by accelerate, so it counts optimizer steps exactly as without DeepSpeed.
            self.lr_scheduler = build_scheduler(self.optimizer, self.s.scheduler, self.steps_total)
            engine, self.optimizer = self.accelerator.prepare(modules[0], self.optimizer)  # one call, both
            wrapped = [engine]
            self.steps = dsp.EngineSteps(self.accelerator, engine, cfg.gradient_accumulation_steps,
                                         cfg.deepspeed.zero_stage)
        else:
            self.optimizer = build_optimizer(groups, self.s.optimizer)
            self.lr_scheduler = build_scheduler(self.optimizer, self.s.scheduler, self.steps_total)
            if self.accelerator.num_processes > 1 and model.unet in modules:
                # Only the UNet is wrapped in DDP: the text encoders are called through library.models.text, which
                # needs the bare modules, so their trained gradients are averaged by hand (_average_gradients).
                wrapped = [self.accelerator.prepare(m) if m is model.unet else m for m in modules]
            else:
                wrapped = modules  # no DDP wrapper; autocast is applied explicitly
            self.optimizer = self.accelerator.prepare(self.optimizer)
        self.denoiser = wrapped[[m is model.unet for m in modules].index(True)] if model.unet in modules \
            else model.unet
        if not cfg.deepspeed.enabled:
            self.steps = ManualSteps(self.accelerator, self.optimizer, self.denoiser, self.trained,
                                     cfg.gradient_accumulation_steps, self.s.optimizer.max_grad_norm)

    def resume(self) -> None:
        """Clean up after a killed write; with train.resume, continue exactly where the state was saved."""
        if self.accelerator.is_main_process:
            for p in recover_interrupted_writes(self.out_dir):  # what a killed run left half-written
                _say(self.accelerator, f"cleaned up after an interrupted write: {p}")
        resume_dir = st.find_resume_dir(self.s.train.resume, self.out_dir)
        if resume_dir is None:
            return
        self.counters, trainable, saved = st.load_state(resume_dir)
        st.check_made_with(saved.get("made_with"), self.made_with(), resume_dir)
        self.method.load_trainable_state(self.model, trainable)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr_scheduler.load_state_dict(saved["scheduler"])
        self.data.load_state_dict(saved["data"])
        self.method.load_extra_state(saved.get("method"))
        if self.ema is not None and saved.get("ema") is not None:
            self.ema.load_state_dict(saved["ema"])
        st.set_rng_state(saved["rng"])
        _say(self.accelerator, f"resumed from {resume_dir} at step {self.counters.step}")

    def made_with(self) -> dict:
        """What a resume state must have been made with to continue this run exactly (checked on resume)."""
        o = self.s.optimizer
        return {"optimizer.optimizer_type": o.optimizer_type, "optimizer.learning_rate": o.learning_rate,
                "optimizer.unet_lr": o.unet_lr, "optimizer.text_encoder_lr": o.text_encoder_lr,
                "trained": {k: list(v.shape) for k, v in self.method.trainable_state(self.model).items()}}

    # ------------------------------------------------------------------ the steps

    def run(self) -> TrainResult:
        result_path = None
        if self.s.cache_text:
            self.text.cache_all(sorted(set(self.data.fixed_captions()) | set(self.method.fixed_captions())),
                                cache_dir=getattr(self.data, "text_cache_dir", None), precision=self.precision)
        for m in self.modules:
            m.train()
        self.batches = _batch_stream(self.data)
        self.bar = progress_bar(self.s, self.accelerator, self.counters.step, self.steps_total)
        self.writer = writer_for(self.s, self.out_dir) if self.accelerator.is_main_process else None
        wall0 = time.perf_counter()
        try:
            while self.counters.step < self.steps_total:
                epoch_end = self.train_step()
                if epoch_end is not None:
                    self.after_step(epoch_end)
            result_path = self.finish()
        except RuntimeError as e:
            raise _worker_error(e, self.out_dir) from None
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()
        self.timings["wall"] = time.perf_counter() - wall0
        self.accelerator.end_training()
        return TrainResult(self.counters.step, self.losses, result_path, self.counters.nan_steps, self.timings,
                           self.model, self.validation)

    def train_step(self) -> bool | None:
        """One optimizer step over `gradient_accumulation_steps` batches. Returns whether the last batch ended its
        epoch, or None when the step was dropped (non-finite loss or gradients)."""
        t0 = time.perf_counter()
        step, accumulation = self.counters.step, self.s.train.gradient_accumulation_steps
        self.method.before_step(self.model, step)
        step_losses, all_finite, epoch_end = [], True, False
        for micro in range(accumulation):
            self.counters.epoch, batch, epoch_end = _next_batch(self.batches)
            loss, finite = self.forward_backward(batch, step, micro)
            step_losses.append(float(loss))
            all_finite &= finite
        faults.kill_point("step", step + 1)
        if not self.optimizer_step(all_finite):
            return None
        self.timings["compute"] += time.perf_counter() - t0
        self.step_loss = sum(step_losses) / len(step_losses)
        self.losses.append(self.step_loss)
        return epoch_end

    def batch_number(self, step: int, micro: int) -> int:
        """Global batch number: across steps, accumulation and ranks (seeds the noise and caption randomness)."""
        acc = self.accelerator
        return (step * self.s.train.gradient_accumulation_steps + micro) * acc.num_processes + acc.process_index

    def forward_backward(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, bool]:
        """Loss of one batch (the method's `batch_loss`, by default `loss_of`) and its backward pass."""
        number = self.batch_number(step, micro)
        noise_gen = torch.Generator(device=self.device).manual_seed(batch_seed(self.s.train.seed, number))
        t = time.perf_counter()
        with self.steps.micro(micro):
            loss = self.method.batch_loss(batch, number, lambda b: self.loss_of(b, step, number, noise_gen))
            data = self.data
            if faults.nan_batch(data.epoch * data.steps_per_epoch + data.position):
                loss = loss * float("nan")
            finite = bool(torch.isfinite(loss))
            self.steps.backward(loss, finite)
        self.timings["model"] += time.perf_counter() - t
        return loss.detach(), finite

    def loss_of(self, batch: dict, step: int, number: int, noise_gen: torch.Generator) -> torch.Tensor:
        """Latents (cached or encoded) -> text conditioning -> noise and target -> denoiser -> weighted loss."""
        model, device = self.model, self.device
        latents = batch["latents"].to(device) if "latents" in batch else _encode(model, batch["pixels"].to(device),
                                                                                   noise_gen)
        captions = self.method.prepare_captions(batch["captions"], number)
        cond = self.text.cond(captions, live=self.method.trains_text_encoder(step))
        prepared = self.objective.prepare(latents.float(), noise_gen)
        masks = batch.get("masks")
        with self.autocast():
            pred = predict(model, self.denoiser, prepared.noisy_latents, prepared.timesteps, cond, batch)
        loss, _ = self.objective.loss(pred.float(), prepared, masks=None if masks is None else masks.to(device),
                                      weights=batch["loss_weights"].to(device))
        return loss

    def optimizer_step(self, all_finite: bool) -> bool:
        """Average, clip, step, schedule, EMA; a non-finite step is dropped (and too many in a row stop the run)."""
        t = time.perf_counter()
        if self.accelerator.num_processes > 1 and not self.s.train.deepspeed.enabled:
            _average_gradients(self.unwrapped_trained)
        stepped = self.steps.step(all_finite)  # ManualSteps: clip + step; EngineSteps: DeepSpeed already stepped
        self.timings["model"] += time.perf_counter() - t
        if not stepped:
            self._dropped_step("loss" if not all_finite else "gradients")
            return False
        self.consecutive_nan = 0
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step()
        self.extra_logs = self.method.after_optimizer_step(self.model, self.counters.step)
        self.counters.step += 1
        return True

    def _dropped_step(self, what: str) -> None:
        c = self.counters
        c.nan_steps += 1
        self.consecutive_nan += 1
        _say(self.accelerator, f"step {c.step + 1}: non-finite {what}, step skipped "
                               f"({self.consecutive_nan} in a row, {c.nan_steps} in total)")
        if self.consecutive_nan < self.s.train.max_consecutive_nan_steps:
            return
        stopped = f"{self.consecutive_nan} non-finite steps in a row at step {c.step + 1}; stopped"
        saved = "nothing is saved (no resume states with DeepSpeed)"
        if self.steps.resumable:
            try:
                self.save_now(with_result=False)
            except TrainingStopped as e:  # the weights themselves are no longer finite
                raise TrainingStopped(f"{stopped}: {e}") from None
            saved = (f"the last good state is saved under {st.state_root(self.out_dir)} "
                     "(resume with train.resume = 'auto')")
        raise TrainingStopped(f"{stopped}, and {saved}. {USUAL_FIXES}")

    # ------------------------------------------------------------------ triggers

    def after_step(self, epoch_end: bool) -> None:
        """Log the step; save and sample when due (the final save and sample belong to `finish`)."""
        s, c = self.s, self.counters
        log_step(self.writer, self.bar, s, c.step, self.step_loss, self.lr_scheduler.get_last_lr(), self.extra_logs)
        if getattr(self.data, "validation", None) is not None and validation_due(
                c.step, epoch_end, c.epoch, s.train.validate_every_n_steps, s.train.validate_every_n_epochs):
            self.timed("validation", self.validate_now)
        if c.step >= self.steps_total:
            return
        if _due(c.step, s.save.save_every_n_steps, epoch_end, c.epoch, s.save.save_every_n_epochs):
            self.timed("save", self.save_now, with_result=True)
        if s.prompts and _due(c.step, s.sample.sample_every_n_steps, epoch_end, c.epoch,
                              s.sample.sample_every_n_epochs):
            self.timed("sample", self.sample_now)

    def finish(self) -> Path | None:
        path = self.timed("save", self.save_now, with_result=True, final=True)
        if self.s.prompts and self.s.sample.sample_at_end:
            self.timed("sample", self.sample_now, final=True)
        return path

    def timed(self, what: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[what] += time.perf_counter() - t

    def save_now(self, *, with_result: bool, final: bool = False) -> Path | None:
        return _save(self, self.method, self.model, self.data, self.optimizer, self.lr_scheduler, self.ema,
                     self.counters, self.accelerator, self.steps, with_result=with_result, final=final)

    def save_context(self, counters: st.Counters) -> SaveContext:
        """What a saved result is told about the run (library.training.saving calls it)."""
        return SaveContext(counters.step, counters.epoch, self.s.facts, self.method.data)

    def validate_now(self) -> None:
        """The held-out loss (library/training/validation.py: fixed timesteps and noise per sample), logged as
        loss/validation beside loss/step. Every rank computes it (a ZeRO-3 forward needs all); the main one logs."""
        step = self.counters.step

        def denoise(batch, noisy, timesteps):
            captions = self.method.prepare_captions(batch["captions"], 0)
            cond = self.text.cond(captions, live=self.method.trains_text_encoder(step))
            with self.autocast():
                return predict(self.model, self.denoiser, noisy, timesteps, cond, batch)

        for m in self.modules:
            m.eval()
        try:
            with torch.no_grad():
                r = validation_loss(self.data.validation.batches(self.s.train.max_validation_steps), denoise,
                                    self.objective, seed=self.data.validation.seed,
                                    encode=lambda px, g: _encode(self.model, px, g), device=self.device)
        finally:
            for m in self.modules:
                m.train()
        self.validation[step] = r.loss
        if self.writer is not None:
            self.writer.add_scalar("loss/validation", r.loss, step)
            for t, v in r.per_timestep.items():
                self.writer.add_scalar(f"loss/validation_t{t}", v, step)

    def sample_now(self, final: bool = False) -> None:
        with self.steps.full_weights():  # entered on every rank (ZeRO-3 gathers collectively); the main one samples
            sample_images(self.model, self.modules, self.s, self.out_dir, self.counters.step, self.accelerator,
                         final)


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


def _worker_error(e: RuntimeError, out_dir: Path) -> Exception:
    """torch raises "DataLoader worker ..." from its SIGCHLD handler (wherever the main process is, a save included:
    atomic writes keep the files whole) or when the next batch never comes; anything else is re-raised as it is."""
    if "DataLoader worker" not in str(e):
        return e
    return DataError(f"a data loader worker process died ({str(e).splitlines()[0]}). A killed worker is most often "
                     "out of memory: lower data.num_workers or data.batch_size, or set data.num_workers = 0 to see "
                     f"any error in the main process. The last complete resume state under {st.state_root(out_dir)} "
                     "is intact (resume with train.resume = 'auto')")


def _deepspeed_plugin(s: LoopSettings):
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
                                  micro_batch_size=s.batch_size,
                                  max_grad_norm=s.optimizer.max_grad_norm)
    return dsp.make_plugin(config)


def _say(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr)
