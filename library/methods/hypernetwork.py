"""A1111-style hypernetworks: only the (k, v) modules train; UNet, VAE and text encoder(s) stay unchanged."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from library.config.hypernetwork import HypernetworkConfig, HypernetworkRunConfig
from library.config.optim import OptimizerConfig
from library.errors import ConfigError
from library.methods.base import Method, SaveContext
from library.models.model import SDModel
from library.networks.hypernetwork import (HypernetworkSpec, apply_hypernetwork, attention_widths, create_hypernetwork,
                                           parse_dropout_structure)
from library.networks.hypernetwork_file import HypernetworkInfo, load_hypernetwork, save_hypernetwork
from library.precision import DTYPES

CONFIG_CLASS = HypernetworkRunConfig


class HypernetworkTraining(Method):
    """Only the hypernetwork's (k, v) modules train; UNet, VAE and text encoder(s) are frozen and unchanged."""

    name = "hypernetwork"
    families = ("sd1", "sd2", "sdxl")  # A1111's format hooks UNet cross-attention; SD3's MMDiT has none

    def __init__(self, hypernetwork: HypernetworkConfig, optimizer: OptimizerConfig, save_precision: str = "fp32"):
        self.h, self.optimizer, self.save_precision = hypernetwork, optimizer, save_precision
        self.hn = None
        self.base = HypernetworkInfo()  # name / step / checkpoint of a continued file
        self.checkpoint_hash: str | None = None

    def setup(self, model: SDModel) -> list[dict]:
        h = self.h
        for module in [model.unet, model.vae, *model.text_encoders]:
            module.requires_grad_(False)
        self.checkpoint_hash = _shorthash(self.run.base_model)
        if h.network_weights:
            self.hn, self.base = load_hypernetwork(h.network_weights)
            print(f"continuing {h.network_weights} (step {self.base.step}): its structure is used "
                  f"({self.hn.spec}); the [hypernetwork] structure keys are ignored", file=sys.stderr)
        else:
            self.hn = create_hypernetwork(self._spec(), self._widths(model),
                                          torch.Generator().manual_seed(self.run.seed))
        apply_hypernetwork(model.unet, self.hn, strength=h.sample_strength)  # pairs become UNet sub-modules
        self.hn.requires_grad_(True)
        opt = self.optimizer
        return [{"params": list(self.hn.parameters()), "lr": opt.unet_lr or opt.learning_rate, "name": "hypernetwork"}]

    def _spec(self) -> HypernetworkSpec:
        h = self.h
        dropout = h.dropout_structure or parse_dropout_structure(h.layer_structure, h.use_dropout,
                                                                 h.last_layer_dropout)
        return HypernetworkSpec(tuple(h.layer_structure), h.activation_func, h.add_layer_norm, h.activate_output,
                                tuple(float(p) for p in dropout), h.weight_init, h.use_dropout)

    def _widths(self, model: SDModel) -> list[int]:
        available = attention_widths(model.unet)
        wanted = self.h.enable_sizes or available
        missing = [w for w in wanted if w not in available]
        if missing:
            raise ConfigError(f"hypernetwork.enable_sizes: {missing} is not an attention width of this "
                              f"{model.family} UNet (its widths: {available}); use [] for all of them")
        return list(dict.fromkeys(wanted))

    def modules_to_prepare(self, model: SDModel) -> list[torch.nn.Module]:
        return [model.unet]  # holds the pairs; .train()/.eval() switches dropout and the sampling strength

    def trainable_state(self, model: SDModel) -> dict[str, torch.Tensor]:
        return {f"hypernetwork.{k}": v for k, v in self.hn.state_dict().items()}

    def load_trainable_state(self, model: SDModel, state: dict[str, torch.Tensor]) -> None:
        self.hn.load_state_dict({k.removeprefix("hypernetwork."): v for k, v in state.items()}, strict=True)

    def save_result(self, model: SDModel, stem: Path, ctx: SaveContext) -> Path:
        info = HypernetworkInfo(
            name=self.h.name or self.base.name or ctx.run.output_name, step=self.base.step + ctx.step,
            sd_checkpoint=self.checkpoint_hash, sd_checkpoint_name=Path(ctx.run.base_model).stem,
            metadata=ctx.metadata())
        return save_hypernetwork(stem.parent / f"{stem.name}.pt", self.hn, info, DTYPES[self.save_precision])

    def save_optimizer_sidecar(self, result: Path, optimizer: torch.optim.Optimizer) -> None:
        """A1111's `<file>.pt.optim`: {"hash", "optimizer_name", "optimizer_state_dict"} (plain values and tensors).

        The hash is the sha256 prefix of the saved hypernetwork file, as A1111 checks before reusing the state.
        Exact resume uses our own state folders; this sidecar is for users continuing in A1111.
        """
        from library.fileio import atomic_path

        digest = hashlib.sha256(result.read_bytes()).hexdigest()[:10]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        sidecar = {"hash": digest, "optimizer_name": type(inner).__name__, "optimizer_state_dict": inner.state_dict()}
        with atomic_path(result.parent / f"{result.name}.optim") as tmp:
            torch.save(sidecar, tmp)

    def estimate_kind(self) -> tuple[str, dict]:
        return "hn", {"hn_layer_structure": tuple(self.h.layer_structure)}


def _shorthash(ref: str) -> str | None:
    """A1111's checkpoint short hash (first 10 hex digits of the file's sha256); None for folders and tiny refs."""
    path = Path(ref)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def make_method(cfg: HypernetworkRunConfig) -> HypernetworkTraining:
    return HypernetworkTraining(cfg.hypernetwork, cfg.optimizer, cfg.save.save_precision)
