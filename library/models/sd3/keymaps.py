"""Key maps between our in-memory SD3 (diffusers names) and the released single-file layout, strict both ways.

The single file (Stability's sd3_medium*.safetensors, sd3.5_large.safetensors, sd3.5_medium.safetensors):
- `model.diffusion_model.` the MMDiT in Stability's names (sd3-ref `mmdit.py`: `x_embedder`, `t_embedder`,
  `y_embedder`, `context_embedder`, `joint_blocks.N.{x_block,context_block}.{attn,attn2,mlp,adaLN_modulation}`,
  `final_layer`), q/k/v fused into one `qkv` tensor per stream;
- `first_stage_model.` the VAE in LDM names (no quant convs), as for SD1/SDXL (library/models/keymaps.py);
- optionally `text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.` (transformers' CLIP layout
  with `text_projection`) and `text_encoders.t5xxl.transformer.` (transformers' T5 layout).
The MMDiT rules follow diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py):
q/k/v split along dim 0, and the two places where Stability's AdaLayerNormContinuous orders (shift, scale) while
diffusers orders (scale, shift) -- `final_layer.adaLN_modulation.1` and the last block's context-stream modulation
(`context_pre_only`) -- swap their halves. Rules are generated from the model's config and own key list, so a
full-size model built on the meta device and a tiny test model map the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

from library.models.keymaps import KeyMapError

MMDIT_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
TE_PREFIXES = (CLIP_L_PREFIX, CLIP_G_PREFIX, T5_PREFIX)

# "same": copied; "qkv": (q, k, v) <-> one tensor concatenated on dim 0; "swap": the two halves on dim 0 exchanged
# (its own inverse).
Transform = Literal["same", "qkv", "swap"]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # one diffusers key, or (q, k, v)
    file: str  # key inside the component (no prefix)
    transform: Transform = "same"


@dataclass(frozen=True)
class SD3KeyMap:
    prefix: str
    rules: tuple[Rule, ...]

    def file_keys(self) -> list[str]:
        return [self.prefix + r.file for r in self.rules]


def mmdit_modules(config: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, tuple[str, str]], set[str]]:
    """(module table ours -> file, fused q/k/v groups: first module -> (file module, kind), swapped modules)."""
    n = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    m: dict[str, str] = {
        "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder",
        "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1",
    }
    fused: dict[str, tuple[str, str]] = {}
    swapped = {"norm_out.linear"}
    for i in range(n):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        fused[f"{d}.attn.to_"] = (f"{x}.attn.qkv", "to_")
        fused[f"{d}.attn.add_"] = (f"{c}.attn.qkv", "add_")
        m.update({
            f"{d}.attn.norm_q": f"{x}.attn.ln_q", f"{d}.attn.norm_k": f"{x}.attn.ln_k",
            f"{d}.attn.norm_added_q": f"{c}.attn.ln_q", f"{d}.attn.norm_added_k": f"{c}.attn.ln_k",
            f"{d}.attn.to_out.0": f"{x}.attn.proj", f"{d}.attn.to_add_out": f"{c}.attn.proj",
            f"{d}.norm1.linear": f"{x}.adaLN_modulation.1", f"{d}.norm1_context.linear": f"{c}.adaLN_modulation.1",
            f"{d}.ff.net.0.proj": f"{x}.mlp.fc1", f"{d}.ff.net.2": f"{x}.mlp.fc2",
            f"{d}.ff_context.net.0.proj": f"{c}.mlp.fc1", f"{d}.ff_context.net.2": f"{c}.mlp.fc2",
        })
        if i in dual:
            fused[f"{d}.attn2.to_"] = (f"{x}.attn2.qkv", "to_")
            m.update({f"{d}.attn2.norm_q": f"{x}.attn2.ln_q", f"{d}.attn2.norm_k": f"{x}.attn2.ln_k",
                      f"{d}.attn2.to_out.0": f"{x}.attn2.proj"})
        if i == n - 1:
            swapped.add(f"{d}.norm1_context.linear")  # context_pre_only: AdaLayerNormContinuous
    return m, fused, swapped


def mmdit_keymap(config: Mapping[str, Any], keys: Iterable[str]) -> SD3KeyMap:
    """Rules for every key of a diffusers SD3Transformer2DModel state dict; an unmapped key raises."""
    modules, fused, swapped = mmdit_modules(config)
    keys = list(keys)
    have = set(keys)
    rules: list[Rule] = []
    for key in keys:
        module, _, leaf = key.rpartition(".")
        if key == "pos_embed.pos_embed":
            rules.append(Rule((key,), "pos_embed"))
            continue
        group = next(((g, f) for g, f in fused.items() if module.startswith(g)
                      and module[len(g):] in ("q", "k", "v", "q_proj", "k_proj", "v_proj")), None)
        if group is not None:
            g, (file_module, _) = group
            part = module[len(g):]
            if part in ("q", "q_proj"):
                suffix = part[1:]  # "" or "_proj"
                qkv = tuple(f"{g}{p}{suffix}.{leaf}" for p in "qkv")
                missing = [k for k in qkv if k not in have]
                if missing:
                    raise KeyMapError(f"transformer: '{key}' has no matching '{missing[0]}' to fuse into qkv")
                rules.append(Rule(qkv, f"{file_module}.{leaf}", "qkv"))
            continue
        target = modules.get(module)
        if target is None:
            raise KeyMapError(f"transformer: no single-file key is known for the diffusers key '{key}' "
                              "(not an SD3 / SD3.5 layout)")
        rules.append(Rule((key,), f"{target}.{leaf}", "swap" if module in swapped else "same"))
    _check_reversible(rules, "transformer")
    return SD3KeyMap(MMDIT_PREFIX, tuple(rules))


def identity_keymap(prefix: str, keys: Iterable[str], what: str) -> SD3KeyMap:
    """Text encoders inside the file keep transformers' own layout: one same-named rule per key."""
    rules = tuple(Rule((k,), k) for k in keys)
    _check_reversible(list(rules), what)
    return SD3KeyMap(prefix, rules)


def _check_reversible(rules: list[Rule], what: str) -> None:
    seen: dict[str, Rule] = {}
    for r in rules:
        if r.file in seen:
            raise KeyMapError(f"{what}: '{r.ours[0]}' and '{seen[r.file].ours[0]}' both map to '{r.file}'")
        seen[r.file] = r


def to_file(sd: Mapping[str, Any], keymap: SD3KeyMap) -> dict[str, Any]:
    """Our state dict of one component -> file keys (with the prefix). Every tensor must be used by a rule."""
    import torch

    out: dict[str, Any] = {}
    used: set[str] = set()
    for rule in keymap.rules:
        missing = [k for k in rule.ours if k not in sd]
        if missing:
            raise KeyMapError(f"'{keymap.prefix}': the model has no tensor '{missing[0]}' (expected by the key map)")
        used.update(rule.ours)
        tensors = [sd[k] for k in rule.ours]
        match rule.transform:
            case "same":
                out[keymap.prefix + rule.file] = tensors[0]
            case "qkv":
                out[keymap.prefix + rule.file] = torch.cat(tensors, dim=0)
            case "swap":
                out[keymap.prefix + rule.file] = _swap_halves(tensors[0])
            case other:
                raise AssertionError(f"unknown transform {other!r}")
    extra = [k for k in sd if k not in used]
    if extra:
        raise KeyMapError(f"'{keymap.prefix}': no single-file key for the model tensor '{extra[0]}' "
                          f"({len(extra)} unmapped)")
    return out


def from_file(sd: Mapping[str, Any], keymap: SD3KeyMap) -> dict[str, Any]:
    """File tensors of one component (keys with the prefix; other prefixes ignored) -> our keys. Strict."""
    expected = {keymap.prefix + r.file: r for r in keymap.rules}
    stray = [k for k in sd if k.startswith(keymap.prefix) and k not in expected]
    if stray:
        raise KeyMapError(f"unexpected key '{stray[0]}' ({len(stray)} keys the model built from the config "
                          "does not have: wrong config, variant or family?)")
    out: dict[str, Any] = {}
    for key, rule in expected.items():
        if key not in sd:
            raise KeyMapError(f"missing key '{key}' (the file does not hold a complete model of this layout)")
        tensor = sd[key]
        match rule.transform:
            case "same":
                out[rule.ours[0]] = tensor
            case "qkv":
                if tensor.shape[0] % 3:
                    raise KeyMapError(f"'{key}' of shape {list(tensor.shape)} cannot split into q, k, v")
                for k, part in zip(rule.ours, tensor.chunk(3, dim=0)):
                    out[k] = part.clone()  # own storage: savable as separate tensors
            case "swap":
                out[rule.ours[0]] = _swap_halves(tensor)
    return out


def expected_shapes(sd: Mapping[str, Any], keymap: SD3KeyMap) -> dict[str, tuple[int, ...]]:
    """File key -> shape the model expects (from its tensors, which may live on the meta device)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in keymap.rules:
        first = tuple(sd[rule.ours[0]].shape)
        if rule.transform == "qkv":
            first = (first[0] * 3, *first[1:])
        shapes[keymap.prefix + rule.file] = first
    return shapes


def _swap_halves(t: Any) -> Any:
    import torch

    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)
