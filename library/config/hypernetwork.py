"""`[hypernetwork]`: the A1111-style hypernetwork `train_hypernetwork.py` trains, and its root config.

Names and defaults follow AUTOMATIC1111's "Create hypernetwork" form and the keys of its `.pt` file
(modules/hypernetworks/hypernetwork.py: `layer_structure`, `activation_func`, `weight_initialization`,
`is_layer_norm`, `use_dropout`, `dropout_structure`, `activate_output`). The modules themselves are in
library/networks/hypernetwork.py. No torch here: config modules stay light.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.config.run import RunConfig
from library.errors import ConfigError
from library.networks.hypernetwork_layers import comfyui_differences, parse_dropout_structure

# A1111 accepts every torch.nn activation by its lower-cased class name, with "swish" meaning nn.Hardswish (sic) and
# "linear" meaning none. These are the ones that take no constructor arguments and keep the width; ComfyUI's loader
# knows only the first nine (library/networks/hypernetwork_layers.py COMFYUI_ACTIVATIONS).
Activation = Literal["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish", "gelu",
                     "silu", "softplus", "selu", "celu", "hardswish", "relu6"]
# "comfyui_compatible": only settings that ComfyUI's loader builds as A1111 and the toolkit do; others are errors.
Preset = Literal["a1111", "comfyui_compatible"]
WeightInit = Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"]


def check_layer_structure(layer_structure: list[float], dropout_structure: list[float], where: str) -> None:
    """A1111's rules: structure starts and ends with 1; dropout has one entry per layer, 0 first and last, p in [0, 1)."""
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise ConfigError(f"{where}layer_structure = {layer_structure}: needs at least two entries, the first and "
                          "the last equal to 1 (width multipliers of the context width), e.g. [1, 2, 1]")
    if any(m <= 0 for m in layer_structure):
        raise ConfigError(f"{where}layer_structure = {layer_structure}: every multiplier must be > 0")
    if dropout_structure:
        if len(dropout_structure) != len(layer_structure):
            raise ConfigError(f"{where}dropout_structure = {dropout_structure}: needs one entry per layer_structure "
                              f"entry ({len(layer_structure)}), e.g. [0, 0.3, 0] for [1, 2, 1]")
        if dropout_structure[0] != 0 or dropout_structure[-1] != 0:
            raise ConfigError(f"{where}dropout_structure = {dropout_structure}: the first and last entries must be 0 "
                              "(A1111 puts dropout only after hidden layers)")
        if any(not 0 <= p < 1 for p in dropout_structure):
            raise ConfigError(f"{where}dropout_structure = {dropout_structure}: probabilities must be in [0, 1)")


@dataclass
class HypernetworkConfig:
    preset: Preset = opt("a1111", "'a1111': any A1111 structure (a warning names the keys ComfyUI builds differently); "
                         "'comfyui_compatible': those keys are errors, so the file gives the same result in ComfyUI.")
    layer_structure: list[float] = opt([1.0, 2.0, 1.0], "Width multipliers of each k/v module's layers; first and last are 1 (A1111 'Modules layer structure').")
    activation_func: Activation = opt("linear", "Activation after each Linear except the last (A1111 names; 'swish' is nn.Hardswish as in A1111).")
    weight_init: WeightInit = opt("Normal", "Initialisation of new Linear layers (Normal: std 0.01, zero bias, as A1111).")
    add_layer_norm: bool = opt(False, "Add a LayerNorm after every Linear (A1111 'Add layer normalization').")
    use_dropout: bool = opt(False, "Use dropout between layers (A1111 'Use dropout').")
    dropout_structure: list[float] = opt([], "Dropout probability after each layer, e.g. [0, 0.3, 0]; [] = A1111's rule from use_dropout/last_layer_dropout.")
    last_layer_dropout: bool = opt(False, "With use_dropout and no dropout_structure: also drop out after the last hidden layer (A1111 legacy rule).")
    activate_output: bool = opt(False, "Also apply the activation after the last Linear (A1111 'activate_output').")
    enable_sizes: list[int] = opt([], "Context widths that get a (k, v) module pair; [] = every attention width of the UNet.")
    network_weights: str = opt("", "Continue training an existing A1111 hypernetwork .pt (its structure and step count are used).")
    sample_strength: float = opt(1.0, "Strength of the hypernetwork in sample images (A1111 multiplier; training always uses 1).")
    name: str = opt("", "The 'name' stored in the .pt file (default: save.output_name).")

    def validate(self) -> None:
        check_layer_structure(self.layer_structure, self.dropout_structure, "hypernetwork.")
        if self.dropout_structure and any(self.dropout_structure) and not self.use_dropout:
            raise ConfigError("hypernetwork.dropout_structure has non-zero entries but hypernetwork.use_dropout = "
                              "false; set use_dropout = true (or dropout_structure = [])")
        if any(w <= 0 for w in self.enable_sizes):
            raise ConfigError(f"hypernetwork.enable_sizes = {self.enable_sizes}: widths must be positive, e.g. "
                              "[768, 320, 640, 1280] for SD1.x")
        self.check_comfyui()

    def check_comfyui(self) -> list[str]:
        """Causes (naming keys) for which ComfyUI would build the file differently; an error with the
        comfyui_compatible preset, else one warning. Skipped when continuing a file (its structure is used)."""
        if self.network_weights:
            return []
        dropout = self.dropout_structure or parse_dropout_structure(self.layer_structure, self.use_dropout,
                                                                    self.last_layer_dropout)
        causes = comfyui_differences(self.layer_structure, self.activation_func, self.add_layer_norm,
                                     self.activate_output, self.use_dropout, dropout)
        if causes and self.preset == "comfyui_compatible":
            raise ConfigError("hypernetwork.preset = 'comfyui_compatible', but ComfyUI would build this file "
                              "differently: " + "; ".join(f"hypernetwork.{c}" for c in causes))
        if causes:
            print("warning: ComfyUI builds this hypernetwork differently from A1111 and the toolkit: "
                  + "; ".join(f"hypernetwork.{c}" for c in causes)
                  + ". Set hypernetwork.preset = 'comfyui_compatible' to make this an error.", file=sys.stderr)
        return causes


@dataclass
class HypernetworkRunConfig(RunConfig):
    hypernetwork: HypernetworkConfig = opt(HypernetworkConfig(), "The A1111-style hypernetwork to train.")

    def validate(self) -> None:
        super().validate()
        if self.train.attention == "xformers":
            raise ConfigError("train.attention = 'xformers' would replace the hypernetwork's attention processors; "
                              "use 'sdpa' (the hypernetwork processor uses PyTorch SDPA, fast on CUDA too)")
        if self.train.train_text_encoder:
            raise ConfigError("train.train_text_encoder = true: hypernetwork training keeps the text encoder(s) "
                              "frozen; set it to false")
