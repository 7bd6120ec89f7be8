"""One training step on fake tensors: the model built on the meta device from its configs, what the method trains,
and the step itself as library/training/loop.py runs it (see library/estimate/memory.py for what is measured)."""

from __future__ import annotations

import itertools
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.config.network import NetworkConfig
from library.estimate.memory import DTYPES, EstimateSpec, LiveBytes


@dataclass
class StepMeasure:
    """What one fake step measured; library/estimate/memory.py `finish` turns it into an Estimate."""

    peak_without_state: int  # bytes: the step's peak less the (resident, constant) optimizer state
    forward_peak_without_state: int  # the same, up to the end of the forward pass (before any gradient exists)
    weights: int
    gradients: int
    optimizer: str  # the optimizer that ran ("AdamW" or "SGD")
    measured_state: int  # bytes of its state
    trained: list[tuple[tuple[int, ...], int]]  # (shape, bytes per element) of each trained parameter
    flops: int


# ---------------------------------------------------------------------------------------------------------------
# Model on the meta device, then fake tensors.


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def config_dir_of(spec: EstimateSpec) -> Path:
    from library.models.configs import bundled_config_for

    return Path(spec.config_dir) if spec.config_dir else bundled_config_for(spec.family, "epsilon")


def build_meta_model(spec: EstimateSpec):
    """An SDModel whose UNet, VAE and text encoders live on the meta device (built from configs, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.model import SDModel

    folder = config_dir_of(spec)
    names = ["text_encoder", "text_encoder_2"][: 2 if spec.family == "sdxl" else 1]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"))
        encoders = []
        for name in names:
            cfg = _read_json(folder / name / "config.json")
            with_projection = cfg.get("architectures", [""])[0] == "CLIPTextModelWithProjection"
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})))
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
    return SDModel(family=spec.family, prediction_type="epsilon", unet=unet, vae=vae, text_encoders=encoders,
                   tokenizers=[], scheduler_config={}, source=str(folder), config_dir=folder)


def fakeify(modules: list[nn.Module], trained_dtype: torch.dtype, frozen_dtype: torch.dtype,
            fixed: dict[int, torch.dtype] | None = None) -> None:
    """Replace every parameter and buffer with an empty tensor made under the active FakeTensorMode, on the CPU:
    trained parameters (requires_grad) in `trained_dtype`, frozen ones in `frozen_dtype` (or `fixed[id(module)]`).
    A parameter shared by two modules stays shared."""
    done: dict[int, torch.Tensor] = {}
    for root in modules:
        root_dtype = (fixed or {}).get(id(root))
        for module in root.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    dtype = p.dtype if not p.is_floating_point() else (
                        trained_dtype if p.requires_grad else root_dtype or frozen_dtype)
                    done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="cpu"),
                                               requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# What each method trains.


def setup_method(model, spec: EstimateSpec) -> list[nn.Module]:
    """Mark what `spec.method` trains (requires_grad) on the meta model; returns extra modules it adds (HN)."""
    match spec.method:
        case "full":
            model.unet.requires_grad_(True)
            for te in model.text_encoders if spec.train_text_encoder else []:
                te.requires_grad_(True)
            return []
        case "lora":
            from library.networks.lora import inject_network

            network = inject_network(model, spec.network or NetworkConfig())
            for p in network.parameters():
                p.requires_grad_(True)
            return []
        case "ti":
            # The new rows are appended to each encoder's token embedding. sd-scripts (train_textual_inversion.py)
            # gives the whole embedding matrix to the optimizer and restores the old rows after each step, so the
            # whole matrix has a gradient and optimizer state: that is what is modelled (an upper bound for a
            # trainer that trains the new rows only).
            for te in model.text_encoders:
                old = te.get_input_embeddings()
                with torch.device("meta"):
                    new = nn.Embedding(old.num_embeddings + spec.ti_vectors, old.embedding_dim)
                te.set_input_embeddings(new)
                new.weight.requires_grad_(True)
            return []
        case "hn":
            return [add_hypernetwork(model.unet, spec.hn_layer_structure)]
        case other:
            raise ValueError(f"unknown method {other!r}")


def add_hypernetwork(unet: nn.Module, layer_structure: tuple[float, ...]) -> nn.Module:
    """A1111-style hypernetwork stand-in: per context width one (k, v) pair of MLPs (plain Linear layers sized
    width x layer_structure, as A1111 `HypernetworkModule` with the default linear activation), applied as
    x + mlp(x) to the input of every attention's to_k / to_v of that width. Every width present gets modules
    (A1111's enable_sizes default covers 320, 640, 768, 1024, 1280: all SD1/SD2 widths)."""
    from diffusers.models.attention_processor import Attention

    with torch.device("meta"):
        attentions = [m for m in unet.modules() if isinstance(m, Attention)]
        widths = sorted({a.to_k.in_features for a in attentions})
        pairs = nn.ModuleDict()
        for width in widths:
            sizes = [int(width * f) for f in layer_structure]
            pairs[str(width)] = nn.ModuleList(
                [nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))) for _ in range(2)])
    pairs.requires_grad_(True)

    def hook(mlp: nn.Module):
        return lambda _module, args: (args[0] + mlp(args[0]), *args[1:])

    for a in attentions:
        k, v = pairs[str(a.to_k.in_features)]
        a.to_k.register_forward_pre_hook(hook(k))
        a.to_v.register_forward_pre_hook(hook(v))
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# The step.


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen.setdefault(id(t.untyped_storage()), t.untyped_storage().nbytes())
    return sum(seen.values())


def run_step(model, spec: EstimateSpec, trained: list[nn.Parameter], optimizer,
             live: LiveBytes | None) -> tuple[int, int]:
    """One training step as library/training/loop.py runs it; returns (gradient bytes, `live`'s peak after the
    forward pass). Runs on fake or real tensors alike (tests run it on a real tiny model to check the estimate)."""
    from library.models.text import encode_text

    batch, (height, width) = spec.batch_size, spec.resolution
    unet, vae = model.unet, model.vae
    autocast = (torch.autocast("cpu", dtype=DTYPES[spec.mixed_precision]) if spec.mixed_precision != "no"
                else nullcontext())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if spec.cache_latents:
        latents = torch.randn(batch, unet.config.in_channels, height // factor, width // factor)
    else:
        with torch.no_grad():  # loop._encode: fp32 VAE, no grad
            latents = vae.encode(torch.randn(batch, 3, height, width)).latent_dist.sample()
    ids = [torch.zeros(batch, 77, dtype=torch.long) for _ in model.text_encoders]
    if spec.trains_text_encoder():
        with autocast:
            cond = encode_text(model, ids)
        hidden, pooled = cond.hidden, cond.pooled
    elif not spec.cache_text_outputs:
        with torch.no_grad(), autocast:
            cond = encode_text(model, ids)
        hidden, pooled = cond.hidden, cond.pooled
    else:
        dtype = DTYPES[spec.mixed_precision] if spec.mixed_precision != "no" else torch.float32
        hidden = torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=dtype)
        pooled_dim = unet.config.projection_class_embeddings_input_dim
        pooled = torch.randn(batch, pooled_dim - 6 * unet.config.addition_time_embed_dim,
                             dtype=dtype) if spec.family == "sdxl" else None
    added = None
    if spec.family == "sdxl":
        added = {"text_embeds": pooled, "time_ids": torch.zeros(batch, 6, dtype=hidden.dtype)}
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,))
    noisy = latents * 0.5 + noise * 0.5  # objective.prepare: sqrt(abar)·x0 + sqrt(1-abar)·eps (values irrelevant)
    with autocast:
        pred = unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    forward_peak = live.peak if live is not None else 0
    del pred, hidden, pooled, latents, noisy, added
    loss.backward()
    grads = _storage_bytes(p.grad for p in trained)
    if spec.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trained, spec.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grads, forward_peak




def measure(spec: EstimateSpec) -> StepMeasure:
    """Build `spec`'s model on the meta device, make it fake and run one steady-state training step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from library.estimate.flops import flop_counter

    model = build_meta_model(spec)
    extra = setup_method(model, spec)
    encoders_resident = spec.trains_text_encoder() or not spec.cache_text_outputs
    resident = [model.unet, *(model.text_encoders if encoders_resident else []), *extra]
    if not spec.cache_latents:
        resident.append(model.vae)
    mode = FakeTensorMode()
    with mode:
        # loop._place keeps the VAE in fp32 (the SD/SDXL VAEs overflow in fp16).
        fakeify(resident, spec.trained_dtype(), spec.frozen_dtype(), fixed={id(model.vae): torch.float32})
    trained = list({id(p): p for m in resident for p in m.parameters() if p.requires_grad}.values())
    if spec.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.unet.train()
    for te in model.text_encoders:
        te.train(spec.trains_text_encoder())

    run_adamw = spec.optimizer == "AdamW" and not spec.offload_optimizer
    live = LiveBytes()
    for m in resident:
        for t in [*m.parameters(), *m.buffers()]:
            live.track(t)
    weights = live.current
    counter = flop_counter()
    with mode, live:
        if run_adamw:
            optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)  # fused, as build_optimizer picks on CUDA
            for p in trained:  # one step on zero gradients creates the state, as after the first real step
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer = torch.optim.SGD(trained, lr=1e-4)  # no state: other optimizers' state is added analytically
        state = live.current - weights
        live.reset_peak()
        with counter:
            grads, forward_peak = run_step(model, spec, trained, optimizer, live)
    return StepMeasure(
        peak_without_state=live.peak - state, forward_peak_without_state=forward_peak - state, weights=weights,
        gradients=grads, optimizer="AdamW" if run_adamw else "SGD", measured_state=state,
        trained=[(tuple(p.shape), p.element_size()) for p in trained], flops=int(counter.get_total_flops()),
    )
