"""`[network]`: the adapter `train_lora.py` adds (LoRA, LoCon, LoHa, LoKr, DoRA) and how it is trained.

Names follow sd-scripts' `--network_*` arguments and its `network_args` (networks/lora.py `create_network`), so a
kohya config translates key for key (see KOHYA_NAMES). The adapters themselves are peft's (library/networks/lora.py).
The UNet / text-encoder learning rates are `[optimizer]` unet_lr / text_encoder_lr (library/config/optim.py);
library.networks.lora.param_groups() takes them as arguments.
No torch here: config modules stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.errors import ConfigError

NetworkModule = Literal["lora", "locon", "loha", "lokr", "dora", "networks.lora"]
# What the Linear / 1x1-conv adapters target; "+conv" spells out that 3x3 convs are adapted too (needs conv_dim > 0).
#   attn        UNet: to_q/to_k/to_v/to_out.0 of every attention in Transformer2DModel; TE: CLIPAttention q/k/v/out_proj
#   attn_mlp    sd-scripts' default LoRA: every Linear and 1x1 Conv2d inside Transformer2DModel (attention, feed-forward,
#               proj_in/proj_out); TE: CLIPAttention + CLIPMLP (fc1, fc2)
#   all_linear  attn_mlp + the Linear / 1x1 layers of ResnetBlock2D (time_emb_proj, conv_shortcut)
# conv_dim > 0 (LoCon) adds every layer of ResnetBlock2D, Downsample2D and Upsample2D, as sd-scripts does: 3x3 convs at
# conv_dim / conv_alpha, their Linear / 1x1 layers (time_emb_proj, conv_shortcut) at network_dim / network_alpha.
Target = Literal["attn", "attn_mlp", "all_linear", "attn+conv", "attn_mlp+conv", "all_linear+conv"]

# Block counts of sd-scripts' per-block options (networks/lora.py NUM_OF_BLOCKS, SDXL_NUM_OF_BLOCKS):
# SD1/SD2 block_dims has 25 entries (IN00-IN11, M00, OUT00-OUT11), down/up_lr_weight 12 and mid_lr_weight 1;
# SDXL block_dims has 23 (time/label embedding, IN00-IN08, M00-M02, OUT00-OUT08, out), down/up 9 and mid 3.
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

# sd-scripts argument (or network_args entry) -> our "table.key", for the loader's kohya-compatible names.
KOHYA_NAMES: dict[str, str] = {
    "network_module": "network.network_module",
    "network_dim": "network.network_dim",
    "network_alpha": "network.network_alpha",
    "network_dropout": "network.network_dropout",
    "network_weights": "network.network_weights",
    "network_train_unet_only": "network.train_unet_only",
    "network_train_text_encoder_only": "network.train_text_encoder_only",
    "scale_weight_norms": "network.scale_weight_norms",
    "conv_dim": "network.conv_dim",
    "conv_alpha": "network.conv_alpha",
    "block_dims": "network.block_dims",
    "block_alphas": "network.block_alphas",
    "conv_block_dims": "network.conv_block_dims",
    "conv_block_alphas": "network.conv_block_alphas",
    "down_lr_weight": "network.down_lr_weight",
    "mid_lr_weight": "network.mid_lr_weight",
    "up_lr_weight": "network.up_lr_weight",
    "block_lr_zero_threshold": "network.block_lr_zero_threshold",
    "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout",
    "loraplus_lr_ratio": "network.loraplus_lr_ratio",
    "loraplus_unet_lr_ratio": "network.loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio": "network.loraplus_text_encoder_lr_ratio",
}


@dataclass
class NetworkConfig:
    """`[network]`: which adapter is added, where, at what rank, and how its parameters are grouped for the optimizer."""

    network_module: NetworkModule = opt(
        "lora", "adapter type: lora, locon (lora + conv_dim), loha, lokr, dora; 'networks.lora' = sd-scripts' name for "
        "lora. dora is written per output row (LyCORIS wd_on_output): LyCORIS applies the trained weight, ComfyUI and "
        "A1111 compute another weight from that file (merge it with merge_models.py for the exact one)"
    )
    network_dim: int = opt(4, "rank of the Linear / 1x1-conv adapters (sd-scripts default 4)")
    network_alpha: float = opt(1.0, "alpha; the adapter output is scaled by alpha / rank (sd-scripts default 1)")
    conv_dim: int = opt(0, "rank of the 3x3-conv adapters (LoCon); 0 = do not adapt 3x3 convs")
    conv_alpha: float = opt(1.0, "alpha of the 3x3-conv adapters")
    target: Target = opt("attn_mlp", "layers adapted: attn, attn_mlp (sd-scripts default), all_linear; '+conv' variants")
    train_unet_only: bool = opt(False, "adapt the UNet only (sd-scripts network_train_unet_only)")
    train_text_encoder_only: bool = opt(False, "adapt the text encoder(s) only")
    block_dims: list[int] = opt([], "rank per UNet block (25 entries SD1/SD2, 23 SDXL; 0 = no adapter in that block)")
    block_alphas: list[float] = opt([], "alpha per UNet block (same length as block_dims); default network_alpha")
    conv_block_dims: list[int] = opt([], "3x3-conv rank per UNet block (25 SD1/SD2, 23 SDXL)")
    conv_block_alphas: list[float] = opt([], "3x3-conv alpha per UNet block; default conv_alpha")
    down_lr_weight: str | list[float] = opt(
        [], "lr multiplier per down block (12 SD1/SD2, 9 SDXL) or a preset: cosine, sine, linear, reverse_linear, zeros"
        " (optionally '+0.5' added to each)"
    )
    mid_lr_weight: list[float] = opt([], "lr multiplier of the mid block (1 entry SD1/SD2, 3 SDXL)")
    up_lr_weight: str | list[float] = opt([], "lr multiplier per up block (12 SD1/SD2, 9 SDXL) or a preset")
    block_lr_zero_threshold: float = opt(0.0, "block lr weights <= this become 0, and those blocks get no adapter")
    network_dropout: float = opt(
        0.0, "dropout on the adapter input (peft lora_dropout; sd-scripts drops the down output instead); lora/locon/dora"
    )
    rank_dropout: float = opt(0.0, "drop whole output rows of the weight delta while training (peft LoHa/LoKr only)")
    module_dropout: float = opt(0.0, "skip a whole adapter for a step with this probability (peft LoHa/LoKr only)")
    lokr_factor: int = opt(-1, "LoKr Kronecker factor (LyCORIS `factor`); -1 = as square as possible")
    lokr_decompose_both: bool = opt(False, "LoKr: also decompose the left Kronecker factor into two rank-r matrices")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+ (Hayou et al. 2024): the up (B) matrices get lr x this; 0 = off (16 typ.)")
    loraplus_unet_lr_ratio: float = opt(0.0, "LoRA+ ratio for the UNet only; 0 = use loraplus_lr_ratio")
    loraplus_text_encoder_lr_ratio: float = opt(0.0, "LoRA+ ratio for the text encoder(s) only; 0 = loraplus_lr_ratio")
    scale_weight_norms: float = opt(0.0, "max-norm: rescale each adapter so |delta W| <= this after each step; 0 = off")
    network_weights: str = opt("", "a kohya-format LoRA file to start from (same module, ranks and family)")
    sd3_layout: Literal["diffusers", "sd_scripts"] = opt(
        "diffusers", "SD3 LoRA file layout: 'diffusers' (transformer.transformer_blocks.N..., read by diffusers' "
        "load_lora_weights and ComfyUI) or 'sd_scripts' (lora_unet_joint_blocks_N_..., fused qkv; ComfyUI, sd-scripts)")
    train_t5xxl: bool = opt(False, "SD3: adapt the T5-XXL text encoder too (sd-scripts train_t5xxl; large, off)")

    @property
    def module(self) -> str:
        """network_module with sd-scripts' alias resolved: lora, locon, loha, lokr or dora."""
        return "lora" if self.network_module == "networks.lora" else self.network_module

    @property
    def adapts_conv(self) -> bool:
        return self.conv_dim > 0 or any(d > 0 for d in self.conv_block_dims)

    def validate(self) -> None:
        if self.network_dim <= 0:
            raise ConfigError(f"network.network_dim = {self.network_dim} must be > 0")
        if self.network_alpha <= 0 or self.conv_alpha <= 0:
            raise ConfigError("network.network_alpha and network.conv_alpha must be > 0 (scale = alpha / rank)")
        if self.conv_dim < 0:
            raise ConfigError(f"network.conv_dim = {self.conv_dim} must be >= 0 (0 = no 3x3-conv adapters)")
        if self.target.endswith("+conv") and not self.adapts_conv:
            raise ConfigError(f"network.target = '{self.target}' needs network.conv_dim > 0 (the 3x3-conv rank)")
        if self.module == "locon" and not self.adapts_conv:
            raise ConfigError("network.network_module = 'locon' needs network.conv_dim > 0 (LoCon = LoRA on 3x3 convs)")
        if self.train_unet_only and self.train_text_encoder_only:
            raise ConfigError("network.train_unet_only and network.train_text_encoder_only cannot both be true")
        for key in ("network_dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"network.{key} = {getattr(self, key)} must be in [0, 1)")
        if self.module in ("lora", "locon", "dora") and (self.rank_dropout or self.module_dropout):
            raise ConfigError(
                f"network.rank_dropout / network.module_dropout are not supported for network.network_module = "
                f"'{self.network_module}' (peft implements them for loha and lokr only); use network.network_dropout"
            )
        if self.module in ("loha", "lokr") and self.network_dropout:
            raise ConfigError(
                f"network.network_dropout is not supported for network.network_module = '{self.network_module}' "
                "(peft has no input dropout for LoHa/LoKr); use network.rank_dropout or network.module_dropout"
            )
        if self.block_alphas and not self.block_dims:
            raise ConfigError("network.block_alphas needs network.block_dims (one rank per block)")
        if self.conv_block_alphas and not self.conv_block_dims:
            raise ConfigError("network.conv_block_alphas needs network.conv_block_dims")
        for key in ("down_lr_weight", "up_lr_weight"):
            value = getattr(self, key)
            if isinstance(value, str) and value.split("+")[0] not in LR_WEIGHT_PRESETS:
                raise ConfigError(
                    f"network.{key} = '{value}' is not a preset; use one of {', '.join(LR_WEIGHT_PRESETS)} "
                    "(optionally '+<base>', e.g. 'cosine+0.5') or a list of numbers"
                )
            if isinstance(value, str) and "+" in value:
                try:
                    float(value.split("+", 1)[1])
                except ValueError:
                    raise ConfigError(f"network.{key} = '{value}': the part after '+' must be a number") from None
        for key in ("scale_weight_norms", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if getattr(self, key) < 0:
                raise ConfigError(f"network.{key} = {getattr(self, key)} must be >= 0 (0 = off)")
        if (self.loraplus_lr_ratio or self.loraplus_unet_lr_ratio or self.loraplus_text_encoder_lr_ratio) \
                and self.module in ("loha", "lokr"):
            raise ConfigError("network.loraplus_lr_ratio applies to LoRA's up (B) matrices: use it with "
                              "network.network_module = lora, locon or dora, not loha / lokr")
        if self.scale_weight_norms and self.module in ("dora",):
            raise ConfigError("network.scale_weight_norms is not defined for DoRA (network.network_module = 'dora'; its "
                              "magnitude is trained directly): remove one of them")
