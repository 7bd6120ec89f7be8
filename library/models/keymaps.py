"""Key maps between diffusers state dicts (our in-memory naming) and the original single-file layouts.

The single-file layouts are CompVis LDM (SD1/SD2) and Stability SGM (SDXL). A map is a list of `KeyRule`s, each
naming the diffusers key(s), the LDM/SGM key and a tensor transform. Rules are generated from the model config
(block structure) and the model's own key list, so a full-size model and a tiny test model map the same way.

Both directions are strict: a diffusers key no rule covers, a file key no rule expects (and that is not a listed
non-weight extra), or a rule whose tensor is missing, is a `KeyMapError` naming the key. `from_ldm(to_ldm(sd)) == sd`.

Layout facts follow the original model code: LDM `openaimodel.py` (UNetModel: input_blocks / middle_block /
output_blocks, ResBlock in_layers / emb_layers / out_layers / skip_connection), LDM `model.py` (VAE Encoder/Decoder:
down.i.block.j, mid.block_1 / attn_1 / block_2, up blocks stored in reverse order, attention q/k/v/proj_out as 1x1
convolutions) and OpenCLIP `transformer.py` (resblocks with a fused `in_proj`, `text_projection` applied as
`x @ text_projection`, i.e. the transpose of a torch Linear weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

from library.errors import ModelFileError

# "same": tensor copied; "conv1x1": diffusers Linear [o, i] <-> LDM 1x1 conv [o, i, 1, 1];
# "transpose": diffusers Linear weight [o, i] <-> OpenCLIP matrix [i, o]; "qkv": three diffusers tensors
# (q, k, v) <-> one OpenCLIP `in_proj` tensor concatenated along dim 0 (torch.nn.MultiheadAttention layout).
Transform = Literal["same", "conv1x1", "transpose", "qkv"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class KeyMapError(ModelFileError):
    """A state dict does not match the key map (unmapped, unexpected or missing key, or wrong shape)."""


@dataclass(frozen=True)
class KeyRule:
    diffusers: tuple[str, ...]  # one key, or (q, k, v) for "qkv"
    ldm: str  # key inside the component (no component prefix)
    transform: Transform = "same"


@dataclass(frozen=True)
class KeyMap:
    """The rules of one component (UNet, VAE or one text encoder) and its prefix in the single file."""

    prefix: str
    rules: tuple[KeyRule, ...]

    def ldm_keys(self) -> list[str]:
        return [self.prefix + r.ldm for r in self.rules]


# ---------------------------------------------------------------------------------------------------------------
# Generic machinery: module-path rules -> key rules, and the two conversions.


def _lookup(key: str, modules: Mapping[str, str]) -> str | None:
    """Map `key` by its longest dotted prefix found in `modules` (diffusers module path -> LDM module path)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        hit = modules.get(".".join(parts[:n]))
        if hit is not None:
            return ".".join([hit, *parts[n:]])
    return None


def expand_rules(
    keys: Iterable[str],
    modules: Mapping[str, str],
    *,
    conv1x1: Iterable[str] = (),
    what: str,
) -> tuple[KeyRule, ...]:
    """One `KeyRule` per diffusers key, mapped through the module table; `conv1x1` lists keys needing that reshape.

    An unmapped key raises (strict). Two keys landing on the same LDM key raise (the map must be reversible).
    """
    conv = set(conv1x1)
    rules: list[KeyRule] = []
    seen: dict[str, str] = {}
    for key in keys:
        ldm = _lookup(key, modules)
        if ldm is None:
            raise KeyMapError(f"{what}: no single-file key is known for the diffusers key '{key}' (unsupported model)")
        if ldm in seen:
            raise KeyMapError(f"{what}: '{key}' and '{seen[ldm]}' both map to '{ldm}' (key map is not reversible)")
        seen[ldm] = key
        rules.append(KeyRule((key,), ldm, "conv1x1" if key in conv else "same"))
    return tuple(rules)


def to_ldm(sd: Mapping[str, Any], keymap: KeyMap) -> dict[str, Any]:
    """diffusers state dict of one component -> single-file keys (with the component prefix). Strict both ways."""
    used: set[str] = set()
    out: dict[str, Any] = {}
    for rule in keymap.rules:
        for k in rule.diffusers:
            if k not in sd:
                raise KeyMapError(f"'{keymap.prefix}': the model has no tensor '{k}' (expected by the key map)")
        used.update(rule.diffusers)
        tensors = [sd[k] for k in rule.diffusers]
        out[keymap.prefix + rule.ldm] = _forward(rule.transform, tensors)
    extra = [k for k in sd if k not in used]
    if extra:
        raise KeyMapError(f"'{keymap.prefix}': no single-file key for the model tensor '{extra[0]}' "
                          f"({len(extra)} unmapped)")
    return out


def from_ldm(sd: Mapping[str, Any], keymap: KeyMap) -> dict[str, Any]:
    """Single-file tensors of one component (keys with the prefix; other keys are ignored) -> diffusers keys.

    Every key under the component prefix must be covered by a rule: the caller removes known extras first.
    """
    out: dict[str, Any] = {}
    expected = {keymap.prefix + r.ldm: r for r in keymap.rules}
    for key in sd:
        if key.startswith(keymap.prefix) and key not in expected:
            raise KeyMapError(f"unexpected key '{key}': the model built from the config has no such weight "
                              "(wrong family or config?)")
    for key, rule in expected.items():
        if key not in sd:
            raise KeyMapError(f"missing key '{key}' (the file does not hold a complete model of this family)")
        for k, t in zip(rule.diffusers, _backward(rule.transform, sd[key], len(rule.diffusers))):
            out[k] = t
    return out


def _forward(transform: Transform, tensors: list[Any]) -> Any:
    match transform:
        case "same":
            return tensors[0]
        case "conv1x1":
            return tensors[0].reshape(*tensors[0].shape, 1, 1)
        case "transpose":
            return tensors[0].T.contiguous()
        case "qkv":
            import torch

            return torch.cat(tensors, dim=0)
        case _:
            raise AssertionError(f"unknown transform {transform!r}")


def _backward(transform: Transform, tensor: Any, n: int) -> list[Any]:
    match transform:
        case "same":
            return [tensor]
        case "conv1x1":
            if tensor.dim() == 4:
                return [tensor.reshape(tensor.shape[0], tensor.shape[1])]
            return [tensor]  # some files store these as linear weights already (diffusers-converted VAEs)
        case "transpose":
            return [tensor.T.contiguous()]
        case "qkv":
            if tensor.shape[0] % n:
                raise KeyMapError(f"fused in_proj tensor of shape {list(tensor.shape)} cannot split into {n} parts")
            return [t.clone() for t in tensor.chunk(n, dim=0)]  # own storage: savable as separate tensors
        case _:
            raise AssertionError(f"unknown transform {transform!r}")


# ---------------------------------------------------------------------------------------------------------------
# UNet (LDM openaimodel.UNetModel / SGM same layout).


def _resnet(d: str, l: str, names: Mapping[str, str]) -> dict[str, str]:
    return {f"{d}.{a}": f"{l}.{b}" for a, b in names.items()}


# diffusers ResnetBlock2D -> LDM ResBlock: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU, Linear],
# out_layers = [GroupNorm, SiLU, Dropout, conv] (openaimodel.py), hence the indices.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_modules(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module path -> LDM/SGM module path (no `model.diffusion_model.` prefix), from the UNet config.

    Transformer2DModel internals (norm, proj_in, transformer_blocks.*, proj_out) carry the same names in both.
    """
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise KeyMapError(f"unet config: layers_per_block={lpb!r} per block is not a Stable Diffusion layout")
    for k in ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type", "time_embedding_type"):
        if config.get(k) not in (None, "positional"):
            raise KeyMapError(f"unet config: {k}={config.get(k)!r} is not a Stable Diffusion layout")
    m: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    match config.get("addition_embed_type"):
        case None:
            pass
        case "text_time":  # SGM label_emb = Sequential(Sequential(Linear, SiLU, Linear))
            m["add_embedding.linear_1"] = "label_emb.0.0"
            m["add_embedding.linear_2"] = "label_emb.0.2"
        case other:
            raise KeyMapError(f"unet config: addition_embed_type={other!r} is not a Stable Diffusion layout")

    downs, ups = config["down_block_types"], config["up_block_types"]
    for i, kind in enumerate(downs):
        attn = _block_has_attention(kind, ("CrossAttnDownBlock2D", "DownBlock2D"))
        for j in range(lpb):
            n = 1 + i * (lpb + 1) + j
            m.update(_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", _UNET_RESNET))
            if attn:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < len(downs) - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op"

    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise KeyMapError(f"unet config: mid_block_type={mid!r} is not a Stable Diffusion layout")
    m.update(_resnet("mid_block.resnets.0", "middle_block.0", _UNET_RESNET))
    m["mid_block.attentions.0"] = "middle_block.1"
    m.update(_resnet("mid_block.resnets.1", "middle_block.2", _UNET_RESNET))

    for i, kind in enumerate(ups):
        attn = _block_has_attention(kind, ("CrossAttnUpBlock2D", "UpBlock2D"))
        for j in range(lpb + 1):
            n = i * (lpb + 1) + j
            m.update(_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", _UNET_RESNET))
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < len(ups) - 1:  # the upsampler follows the attention layer when the block has one
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if attn else 1}.conv"
    return m


def _block_has_attention(kind: str, known: tuple[str, str]) -> bool:
    if kind not in known:
        raise KeyMapError(f"unet config: block type {kind!r} is not a Stable Diffusion layout (known: {known})")
    return kind == known[0]


def unet_keymap(config: Mapping[str, Any], keys: Iterable[str]) -> KeyMap:
    return KeyMap(UNET_PREFIX, expand_rules(keys, unet_modules(config), what="unet"))


def unet_key_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """EVERY diffusers UNet state-dict key -> its LDM/SGM key without `model.diffusion_model.`.

    e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight` ->
    `input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`. Builds the UNet on the meta device to list its keys
    (about a second for SDXL); callers that map many keys should keep the result.
    """
    keys = meta_state_dict_keys("unet", unet_config)
    return {r.diffusers[0]: r.ldm for r in unet_keymap(unet_config, keys).rules}


def meta_state_dict_keys(component: Literal["unet", "vae"], config: Mapping[str, Any]) -> list[str]:
    """State-dict keys of a diffusers UNet / VAE built from `config` on the meta device (no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[component]
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(cfg)
    return list(model.state_dict().keys())


# ---------------------------------------------------------------------------------------------------------------
# VAE (LDM model.py Encoder / Decoder).

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_modules(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> LDM path (no `first_stage_model.` prefix), from the VAE config."""
    n_blocks = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    m: dict[str, str] = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        m[f"{side}.conv_in"] = f"{side}.conv_in"
        m[f"{side}.conv_out"] = f"{side}.conv_out"
        m[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        m.update(_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET))
        m.update(_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET))
        m.update(_resnet(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTN))
    for i in range(n_blocks):
        for j in range(lpb):
            m.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < n_blocks - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        # LDM builds the decoder's up blocks from the lowest resolution and stores them reversed: up.{n-1} runs first.
        u = n_blocks - 1 - i
        for j in range(lpb + 1):
            m.update(_resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{u}.block.{j}", _VAE_RESNET))
        if i < n_blocks - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{u}.upsample.conv"
    return m


def vae_keymap(config: Mapping[str, Any], keys: Iterable[str]) -> KeyMap:
    keys = list(keys)
    # LDM mid-block attention projections are 1x1 convs; diffusers uses Linear layers.
    conv = [k for k in keys if ".mid_block.attentions.0.to_" in k and k.endswith(".weight")]
    return KeyMap(VAE_PREFIX, expand_rules(keys, vae_modules(config), conv1x1=conv, what="vae"))
