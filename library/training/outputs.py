"""What a training run shows and leaves besides its result: sample images, TensorBoard scalars, the progress bar.

Split from library/training/loop.py, which calls these at its triggers (Trainer.after_step / finish).
"""

from __future__ import annotations

import sys
from pathlib import Path

from library.training import faults


def sample_images(model, modules, s, out_dir: Path, step: int, accelerator, final) -> None:
    from library.training.sample import generate, save_images

    if not accelerator.is_main_process:
        return
    for m in modules:
        m.eval()
    device = next(model.unet.parameters()).device
    for enc in model.text_encoders:
        enc.to(device)  # back from the CPU if text outputs were cached
    try:
        images = generate(model, list(s.prompts), sampler=s.sample.sampler, base_seed=s.train.seed,
                          clip_skip=s.facts.clip_skip)
        faults.kill_point("sample", step)
        save_images(images, list(s.prompts), out_dir / "sample", f"{'final_' if final else ''}step{step:08d}")
    finally:
        for m in modules:
            m.train()
        if s.cache_text and device.type != "cpu":
            for enc in model.text_encoders:
                enc.to("cpu")


def writer_for(s, out_dir: Path):
    if s.log.log_with != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=s.log.logging_dir or str(out_dir / "logs"))


def progress_bar(s, accelerator, start: int, total: int):
    if not (s.log.progress_bar and accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="steps", dynamic_ncols=True, file=sys.stderr)


def log_step(writer, bar, s, step: int, loss: float, lrs: list[float], extra: dict[str, float]) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", refresh=False)
    if writer is not None and step % max(1, s.log.log_every_n_steps) == 0:
        writer.add_scalar("loss/step", loss, step)
        for i, lr in enumerate(lrs):
            writer.add_scalar(f"lr/group{i}", lr, step)
        for k, v in extra.items():
            writer.add_scalar(k, v, step)
