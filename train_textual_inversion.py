#!/usr/bin/env python
"""Textual inversion: train a new token's embedding vectors (SD1.x / SD2.x / SDXL), everything else frozen.

    python train_textual_inversion.py --config configs/quickstart_textual_inversion.toml
    python train_textual_inversion.py --config my.toml --token_string "<my-cat>" --init_word cat
    python train_textual_inversion.py --config my.toml --print-config

Writes an embedding users load in A1111 / ComfyUI / Forge / diffusers (`.safetensors` with the single key
`emb_params`, SDXL `clip_l` + `clip_g`; or A1111's `.pt` with `embedding.format = "pt"`), the resolved config beside
it, samples (prompts may use the token, in `--n` too), logs and resume states.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from library.cli import main_guard
from library.config.embedding import KOHYA_NAMES, TextualInversionConfig
from library.errors import ConfigError
from library.models.model import SDModel
from library.networks import embeddings as ti
from library.training.method import Method
from library.training.run import run_script

CONFIG_CLASS = TextualInversionConfig
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TextualInversion(Method):
    """Adds `embedding.token_string` to every tokenizer / text encoder; only its rows train (see ti.RowGuard)."""

    name = "textual_inversion"

    def __init__(self, cfg: TextualInversionConfig):
        self.cfg = cfg
        self.guards: list[ti.RowGuard] = []

    def setup(self, model: SDModel) -> list[dict]:
        e = self.cfg.embedding
        init = None
        if e.init_from:
            widths = [enc.get_input_embeddings().embedding_dim for enc in model.text_encoders]
            init = ti.embedding_vectors(ti.read_embedding_file(e.init_from), model.family, widths, e.init_from)
            if init[0].shape[0] != e.num_vectors_per_token:
                raise ConfigError(f"embedding.init_from {e.init_from} holds {init[0].shape[0]} vectors but "
                                  f"embedding.num_vectors_per_token = {e.num_vectors_per_token}: set it to "
                                  f"{init[0].shape[0]}")
        model.unet.requires_grad_(False)
        model.vae.requires_grad_(False)
        self.guards = []
        for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
            ids = ti.add_token(tok, enc, e.token_string, e.num_vectors_per_token, e.init_word,
                               None if init is None else init[i])
            if model.family == "sdxl":
                ti.pool_at_end_token(enc, tok.eos_token_id)
            enc.requires_grad_(False)
            weight = enc.get_input_embeddings().weight
            weight.requires_grad_(True)
            ti.match_embedding_dtype(enc)
            self.guards.append(ti.RowGuard(weight, ids))
        lr = self.cfg.optimizer.learning_rate
        return [{"params": [g.weight for g in self.guards], "lr": lr, "name": "embedding"}]

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return list(model.text_encoders)

    def trains_text_encoder(self, step: int) -> bool:
        return True  # the gradient reaches the new rows through the (frozen) text encoder: no cached outputs

    def prepare_captions(self, captions: list[str], batch_number: int) -> list[str]:
        e = self.cfg.embedding
        rng = random.Random(f"ti-{self.cfg.train.seed}-{batch_number}")  # str seeds hash deterministically
        return ti.render_captions(captions, e.captions, e.token_string, e.num_vectors_per_token, e.replace_word, rng)

    def before_step(self, model: SDModel, step: int) -> None:
        for g in self.guards:
            if g.frozen is None:  # first step of this process: the weights now sit on their training device / dtype
                g.snapshot()

    def after_optimizer_step(self, model: SDModel, step: int) -> dict[str, float]:
        logs = {}
        for i, g in enumerate(self.guards):
            g.restore()
            logs[f"embedding/norm_te{i + 1}"] = float(g.rows().float().norm(dim=-1).mean())
        return logs

    def trainable_state(self, model: SDModel) -> dict[str, torch.Tensor]:
        return {f"te{i}.rows": g.rows().float() for i, g in enumerate(self.guards)}

    def load_trainable_state(self, model: SDModel, state: dict[str, torch.Tensor]) -> None:
        for i, g in enumerate(self.guards):
            g.set_rows(state[f"te{i}.rows"])

    def save_result(self, model: SDModel, stem: Path, metadata: dict[str, str]) -> Path:
        e, dtype = self.cfg.embedding, DTYPES[self.cfg.save.save_precision]
        path = stem.with_suffix("." + e.format)
        return ti.save_embedding(path, [g.rows().to(dtype) for g in self.guards], model.family, layout=e.format,
                                 name=e.token_string, step=int(metadata.get("sdtk_step", 0)),
                                 checkpoint_name=Path(model.source).stem, metadata=metadata)


@main_guard
def main(argv: list[str] | None = None) -> int:
    return run_script(CONFIG_CLASS, TextualInversion, argv, prog="train_textual_inversion.py", description=__doc__,
                      aliases=KOHYA_NAMES)


if __name__ == "__main__":
    sys.exit(main())
