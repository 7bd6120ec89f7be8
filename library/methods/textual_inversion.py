"""Textual inversion: new token embedding vectors train (SD1.x / SD2.x / SDXL), everything else frozen."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from library.config.embedding import EmbeddingConfig, TextualInversionConfig
from library.errors import ConfigError
from library.methods.base import Method, SaveContext
from library.models.model import SDModel
from library.networks import embeddings as ti
from library.precision import DTYPES

CONFIG_CLASS = TextualInversionConfig


class TextualInversion(Method):
    """Adds `embedding.token_string` to every tokenizer / text encoder; only its rows train (see ti.RowGuard)."""

    name = "textual_inversion"
    families = ("sd1", "sd2", "sdxl")  # A1111 / ComfyUI embeddings are CLIP-token files; none is defined for SD3

    def __init__(self, embedding: EmbeddingConfig, learning_rate: float, save_precision: str = "fp32"):
        self.embedding, self.learning_rate, self.save_precision = embedding, learning_rate, save_precision
        self.guards: list[ti.RowGuard] = []

    def setup(self, model: SDModel) -> list[dict]:
        e = self.embedding
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
        return [{"params": [g.weight for g in self.guards], "lr": self.learning_rate, "name": "embedding"}]

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return list(model.text_encoders)

    def trains_text_encoder(self, step: int) -> bool:
        return True  # the gradient reaches the new rows through the (frozen) text encoder: no cached outputs

    def prepare_captions(self, captions: list[str], batch_number: int) -> list[str]:
        e = self.embedding
        rng = random.Random(f"ti-{self.run.seed}-{batch_number}")  # str seeds hash deterministically
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

    def save_result(self, model: SDModel, stem: Path, ctx: SaveContext) -> Path:
        e = self.embedding
        path = stem.with_suffix("." + e.format)
        return ti.save_embedding(path, [g.rows().to(DTYPES[self.save_precision]) for g in self.guards], model.family,
                                 layout=e.format, name=e.token_string, step=ctx.step,
                                 checkpoint_name=Path(model.source).stem, metadata=ctx.metadata())

    def estimate_kind(self) -> tuple[str, dict]:
        return "ti", {"ti_vectors": self.embedding.num_vectors_per_token}


def make_method(cfg: TextualInversionConfig) -> TextualInversion:
    return TextualInversion(cfg.embedding, cfg.optimizer.learning_rate, cfg.save.save_precision)
