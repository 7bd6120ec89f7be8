"""One training step on fake tensors: the model built on the meta device from its configs, what the method trains,
and the step itself as library/training/loop.py runs it (see library/estimate/memory.py for what is measured)."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from library.config.network import NetworkConfig
from library.estimate.memory import DTYPES, Estimate, EstimateSpec, LiveBytes, finish


@dataclass(frozen=True)
class Phases:
    """The step in three phases (bytes without the optimizer state): the VAE encode, the frozen text encoders' pass
    and the rest. Each phase's peak includes the weights resident then, so caching latents (or frozen text-encoder
    outputs) is the same step less those phases, less the VAE (encoder) weights in the others."""

    vae_peak: int
    text_peak: int  # 0 when the text encoders train (their pass is part of the graph) or are cached
    unet_peak: int
    unet_forward_peak: int
    vae_bytes: int  # resident VAE weights (0 when latents are cached)
    text_bytes: int  # resident frozen text encoders (0 when trained or cached)
    vae_flops: int
    text_flops: int


@dataclass(frozen=True)
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
    phases: Phases | None = None

    def cached(self, latents: bool, text: bool) -> StepMeasure:
        """This step with latents (`latents`) and frozen text-encoder outputs (`text`) read from a cache: the
        encoders' phases, weights and FLOPs removed. Equal to measuring it again up to the conditioning tensors'
        dtype (a few hundred KiB; tests/test_estimate.py compares the two)."""
        ph = self.phases
        if ph is None:
            raise ValueError("no phases recorded: measure the step again")
        drop_vae = ph.vae_bytes if latents else 0
        drop_text = ph.text_bytes if text else 0
        rest = [ph.unet_peak - drop_vae - drop_text]
        firsts = [ph.vae_peak - drop_text] if not latents else []
        if ph.text_bytes and not text:
            firsts.append(ph.text_peak - drop_vae)
        new = Phases(
            vae_peak=0 if latents else ph.vae_peak - drop_text, text_peak=0 if text else ph.text_peak - drop_vae,
            unet_peak=rest[0], unet_forward_peak=ph.unet_forward_peak - drop_vae - drop_text,
            vae_bytes=ph.vae_bytes - drop_vae, text_bytes=ph.text_bytes - drop_text,
            vae_flops=0 if latents else ph.vae_flops, text_flops=0 if text else ph.text_flops)
        return replace(
            self, peak_without_state=max(firsts + rest),
            forward_peak_without_state=max(firsts + [new.unet_forward_peak]),
            weights=self.weights - drop_vae - drop_text,
            flops=self.flops - (ph.vae_flops if latents else 0) - (ph.text_flops if text else 0), phases=new)


# ---------------------------------------------------------------------------------------------------------------
# Model on the meta device, then fake tensors.


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def config_dir_of(spec: EstimateSpec) -> Path:
    from library.models.configs import bundled_config_for

    return Path(spec.config_dir) if spec.config_dir else bundled_config_for(spec.family, "epsilon")


def build_meta_model(spec: EstimateSpec):
    """An SDModel whose UNet, VAE and text encoders live on the meta device (built from configs, no weights): a
    fresh copy of the one built for this family and config folder (building takes seconds, copying a meta model
    tenths; the copy is what the method and fakeify then change)."""
    return copy.deepcopy(_pristine_meta_model(spec.family, config_dir_of(spec)))


@functools.lru_cache(maxsize=4)
def _pristine_meta_model(family: str, folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.model import SDModel

    if family == "sd3":
        return _pristine_meta_sd3(folder)

    names = ["text_encoder", "text_encoder_2"][: 2 if family == "sdxl" else 1]
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
    return SDModel(family=family, prediction_type="epsilon", unet=unet, vae=vae, text_encoders=encoders,
                   tokenizers=[], scheduler_config={}, source=str(folder), config_dir=folder)


def _pristine_meta_sd3(folder: Path):
    """SD3: the MMDiT, the 16-channel VAE, CLIP-L / CLIP-G with projection and T5-XXL (what sd-scripts keeps
    resident unless text-encoder outputs are cached), all on the meta device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from library.models.model import SDModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(_read_json(folder / "transformer" / "config.json"))
        vae = AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json"))
        encoders: list[nn.Module] = [CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / name))
                                     for name in ("text_encoder", "text_encoder_2")]
        if (folder / "text_encoder_3" / "config.json").is_file():
            encoders.append(T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3")))
    for m in (transformer, vae, *encoders):
        m.requires_grad_(False)
    return SDModel(family="sd3", prediction_type="flow", unet=transformer, vae=vae, text_encoders=encoders,
                   tokenizers=[], scheduler_config={}, source=str(folder), config_dir=folder)


def _sd3_cached_cond(model, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached SD3 text outputs: [B, 77 + T5 tokens, joint width] and the pooled [B, CLIP-L + CLIP-G projections]."""
    from library.models.sd3.text import t5_tokens

    cfg = model.unet.config
    return (torch.randn(batch, 77 + t5_tokens(model), cfg.joint_attention_dim, dtype=dtype),
            torch.randn(batch, cfg.pooled_projection_dim, dtype=dtype))


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


# PyTorch AMP docs, "CUDA Ops that can autocast to float32" (https://pytorch.org/docs/stable/amp.html): with fp16 or
# bf16 inputs these run in fp32 under CUDA autocast, so their outputs (and the tensors autograd saves around them)
# are fp32. CPU autocast, which the fake step runs under (fake tensors live on the CPU), leaves most of them in the
# input dtype: group_norm and layer_norm are the ones that matter for SD (every ResNet block, transformer block and
# CLIP layer), roughly doubling those activations.
CUDA_FP32_OPS = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits", "cosh",
    "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum", "dist", "erfinv",
    "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss", "layer_norm", "log", "log_softmax",
    "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss", "multilabel_margin_loss", "multi_margin_loss",
    "nll_loss", "norm", "normalize", "pdist", "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh",
    "smooth_l1_loss", "soft_margin_loss", "softmax", "softmin", "softplus", "sum", "renorm", "tan",
    "triplet_margin_loss",
})


def _to_fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x


class CudaAutocastPolicy(TorchFunctionMode):
    """Under CPU autocast, run CUDA autocast's float32 ops in float32 (inputs cast up, as CUDA autocast casts
    them), so a step on CPU or fake CPU tensors keeps the dtypes, and so the memory, it would have on a GPU. The
    low-precision lists agree where SD uses them (linear, matmul, conv; SDPA gets half-precision q/k/v from
    linear layers either way)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)



def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            seen.setdefault(id(t.untyped_storage()), t.untyped_storage().nbytes())
    return sum(seen.values())


def checkpoint_with_policy(module: nn.Module, *args):
    """diffusers' default gradient-checkpointing function (torch.utils.checkpoint, non-reentrant) with the block run
    under CudaAutocastPolicy: the recomputation in backward runs without the caller's torch-function modes, and its
    norms must come out fp32 as in the forward (torch.utils.checkpoint checks the recomputed dtypes)."""
    def block(*inner):
        with CudaAutocastPolicy():
            return module(*inner)

    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def run_step(model, spec: EstimateSpec, trained: list[nn.Parameter], optimizer,
             live: LiveBytes | None) -> dict[str, int]:
    """One training step under CudaAutocastPolicy (checkpointed blocks: checkpoint_with_policy); see `_run_step`."""
    with CudaAutocastPolicy():
        return _run_step(model, spec, trained, optimizer, live)


def _run_step(model, spec: EstimateSpec, trained: list[nn.Parameter], optimizer,
              live: LiveBytes | None) -> dict[str, int]:
    """One training step as library/training/loop.py runs it. Runs on fake or real tensors alike (tests run it on a
    real tiny model to check the estimate). Returns the gradient bytes and, with `live`, the step's phases: the
    peak of `live` during the VAE encode, the frozen text encoders' pass and the rest (UNet forward, backward and
    optimizer step), the peak up to the end of the UNet forward, and the FLOPs of the first two (the phases are what
    lets memory.rederive drop a cached encoder without measuring again)."""
    from library.models.text import encode_text

    marks: dict[str, int] = {}

    def mark(name: str) -> None:  # the peak since the last mark, then start a new one
        if live is not None:
            marks[name] = live.peak
            marks[f"{name}_flops"] = live.flops - sum(v for k, v in marks.items() if k.endswith("_flops"))
            live.reset_peak()

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
    mark("vae")
    ids = [torch.zeros(batch, 77, dtype=torch.long) for _ in model.text_encoders]
    if spec.family == "sd3" and len(ids) == 3:  # T5's tokens (library/models/sd3/text.py)
        from library.models.sd3.text import t5_tokens

        ids[2] = torch.zeros(batch, t5_tokens(model), dtype=torch.long)
    if spec.trains_text_encoder():
        with autocast:
            cond = encode_text(model, ids)
        hidden, pooled = cond.hidden, cond.pooled
    elif not spec.cache_text_outputs:
        with torch.no_grad(), autocast:
            cond = encode_text(model, ids)
        hidden, pooled = cond.hidden, cond.pooled
        mark("text")
    elif spec.family == "sd3":
        hidden, pooled = _sd3_cached_cond(model, batch, DTYPES.get(spec.mixed_precision, torch.float32))
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
        if spec.family == "sd3":  # library/models/sd3/forward.py predict_sd3
            pred = unet(hidden_states=noisy, timestep=timesteps.float(), encoder_hidden_states=hidden,
                        pooled_projections=pooled, return_dict=False)[0]
        else:
            pred = unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added,
                        return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    if live is not None:
        marks["unet_forward"] = live.peak
    del pred, hidden, pooled, latents, noisy, added
    loss.backward()
    marks["grads"] = _storage_bytes(p.grad for p in trained)
    if spec.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trained, spec.max_grad_norm, foreach=True)  # as on CUDA (foreach default)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark("unet")
    return marks


def set_training_modes(model, spec, resident: list) -> list[torch.nn.Parameter]:
    """Set train/eval modes and gradient checkpointing as the loop does; the trained parameters of `resident`."""
    trained = list({id(p): p for m in resident for p in m.parameters() if p.requires_grad}.values())
    if spec.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_with_policy)
    model.unet.train()
    for te in model.text_encoders:
        te.train(spec.trains_text_encoder())
    return trained


def measure(spec: EstimateSpec) -> StepMeasure:
    """Build `spec`'s model on the meta device, make it fake and run one steady-state training step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from library.estimate.flops import flop_formulas

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
    trained = set_training_modes(model, spec, resident)

    run_adamw = spec.optimizer == "AdamW" and not spec.offload_optimizer
    live = LiveBytes(flop_formulas())
    for m in resident:
        for t in [*m.parameters(), *m.buffers()]:
            live.track(t)
    weights = live.current
    with mode, live:
        if run_adamw:
            optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)  # fused, as build_optimizer picks on CUDA
            for p in trained:  # one step on zero gradients creates the state, as after the first real step
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer = torch.optim.SGD(trained, lr=1e-4, foreach=True)  # no state: other optimizers' state is added analytically
        state = live.current - weights
        live.reset_peak()
        live.count_flops = True  # the step's FLOPs only, not the state-creating step above
        marks = run_step(model, spec, trained, optimizer, live)
    peaks = [marks[k] for k in ("vae", "text", "unet") if k in marks]
    frozen_text = not spec.trains_text_encoder() and not spec.cache_text_outputs
    return StepMeasure(
        peak_without_state=max(peaks) - state,
        forward_peak_without_state=max(peaks[:-1] + [marks["unet_forward"]]) - state, weights=weights,
        gradients=marks["grads"], optimizer="AdamW" if run_adamw else "SGD", measured_state=state,
        trained=[(tuple(p.shape), p.element_size()) for p in trained], flops=int(live.flops),
        phases=Phases(
            vae_peak=marks["vae"] - state, text_peak=marks.get("text", 0) - state, unet_peak=marks["unet"] - state,
            unet_forward_peak=marks["unet_forward"] - state,
            vae_bytes=0 if spec.cache_latents else _module_bytes(model.vae),
            text_bytes=sum(_module_bytes(te) for te in model.text_encoders) if frozen_text else 0,
            vae_flops=marks["vae_flops"], text_flops=marks.get("text_flops", 0)),
    )


def _module_bytes(module: nn.Module) -> int:
    return _storage_bytes([*module.parameters(), *module.buffers()])


def estimate_step(spec: EstimateSpec, label: str = "") -> Estimate:
    """Peak GPU tensor memory, its breakdown and the FLOPs of one steady-state training step of `spec`."""
    start = time.perf_counter()
    key = repr(spec)
    if key not in _MEASURED:
        _MEASURED[key] = measure(spec)
    return finish(_MEASURED[key], spec, label, time.perf_counter() - start)


# repr(spec) -> StepMeasure of this process: the ladder of one run and the README table meet the same settings
# again (a measurement is deterministic: same settings, same ops, same bytes).
_MEASURED: dict[str, Any] = {}
