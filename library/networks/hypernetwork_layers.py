"""The layers of one hypernetwork module, as A1111 builds them and as ComfyUI rebuilds them from a file; no torch.

Pure functions over the structure settings, so config validation (library/config/hypernetwork.py) can say at load
time which settings give a file that ComfyUI builds differently. Layers are described as strings: "linear", the
activation name, "layernorm", "dropout(p)".

A1111 (modules/hypernetworks/hypernetwork.py, `HypernetworkModule.__init__`) is the reference for the format: for each
step i of layer_structure a Linear; the activation unless it is "linear" or (last step and not activate_output); a
LayerNorm with add_layer_norm; Dropout(dropout_structure[i + 1]) when that is > 0. Modules are in eval mode when
generating, so dropout is off there.

ComfyUI (comfy_extras/nodes_hypernetwork.py, `load_hypernetwork_patch`), read from its source:
- it knows only the activations in COMFYUI_ACTIVATIONS; for any other it logs an error and returns no patch, so the
  model is used without the hypernetwork;
- it walks the state dict's `.weight` entries in order, LayerNorm weights included, and decides "last layer" and
  "penultimate layer" by position in that list. With LayerNorm the last Linear is not last in the list, so it gets
  the activation even without activate_output, and with last_layer_dropout a Dropout too;
- its Dropout has p = 0.3 whatever dropout_structure says, placed by use_dropout / last_layer_dropout, and the modules
  are never put in eval mode, so any Dropout stays on when generating (outputs vary from run to run).
"""

from __future__ import annotations

from typing import Sequence

COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
COMFYUI_DROPOUT = 0.3


def parse_dropout_structure(layer_structure: Sequence[float], use_dropout: bool,
                            last_layer_dropout: bool) -> list[float]:
    """A1111's legacy rule for files without `dropout_structure`: 0.3 after every hidden layer but the last one,
    which gets 0.3 only with `last_layer_dropout`; 0 first and last. [1, 2, 2, 1] -> [0, 0.3, 0, 0]."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


def a1111_layers(layer_structure: Sequence[float], activation_func: str, add_layer_norm: bool,
                 activate_output: bool, dropout_structure: Sequence[float]) -> list[str]:
    """The layers of one module in A1111's (and the toolkit's) Sequential order."""
    n = len(layer_structure)
    out: list[str] = []
    for i in range(n - 1):
        out.append("linear")
        if activation_func != "linear" and (i < n - 2 or activate_output):
            out.append(activation_func)
        if add_layer_norm:
            out.append("layernorm")
        if dropout_structure[i + 1] > 0:
            out.append(f"dropout({dropout_structure[i + 1]:g})")
    return out


def comfyui_layers(weights: Sequence[str], activation_func: str, is_layer_norm: bool, use_dropout: bool,
                   last_layer_dropout: bool, activate_output: bool) -> list[str] | None:
    """What ComfyUI builds from a module's weight entries (the layer kind of each `.weight` key, in file order:
    "linear" or "layernorm") and the file's flags; None when it refuses the file (unknown activation)."""
    if activation_func not in COMFYUI_ACTIVATIONS:
        return None
    out: list[str] = []
    i = 0
    while i < len(weights):
        last, penultimate = i == len(weights) - 1, i == len(weights) - 2
        out.append("linear")
        if activation_func != "linear" and (not last or activate_output):
            out.append(activation_func)
        if is_layer_norm:
            i += 1
            out.append("layernorm")
        if use_dropout and not last and (not penultimate or last_layer_dropout):
            out.append(f"dropout({COMFYUI_DROPOUT:g})")
        i += 1
    return out


def comfyui_differences(layer_structure: Sequence[float], activation_func: str, add_layer_norm: bool,
                        activate_output: bool, use_dropout: bool, dropout_structure: Sequence[float]) -> list[str]:
    """Why ComfyUI would apply a file written with these settings differently from A1111 and the toolkit (which
    generate with dropout off): one entry per cause, naming the `hypernetwork.` keys to change; [] = the same."""
    if activation_func not in COMFYUI_ACTIVATIONS:
        return [f"activation_func = '{activation_func}': ComfyUI knows only {', '.join(COMFYUI_ACTIVATIONS)}; it "
                "logs an error and generates without the hypernetwork"]
    last_layer_dropout = len(dropout_structure) > 1 and dropout_structure[-2] != 0  # what the file stores
    weights = ["linear", "layernorm"] * (len(layer_structure) - 1) if add_layer_norm else \
        ["linear"] * (len(layer_structure) - 1)
    theirs = comfyui_layers(weights, activation_func, add_layer_norm, use_dropout, last_layer_dropout,
                            activate_output) or []
    ours = [x for x in a1111_layers(layer_structure, activation_func, add_layer_norm, activate_output,
                                    dropout_structure) if not x.startswith("dropout")]  # eval mode: no dropout
    causes = []
    if [x for x in theirs if not x.startswith("dropout")] != ours:
        causes.append(f"add_layer_norm = true with activation_func = '{activation_func}' and activate_output = "
                      "false: ComfyUI counts LayerNorm weights as layers and adds the activation after the last "
                      "Linear too (set activate_output = true, activation_func = 'linear' or add_layer_norm = false)")
    if any(x.startswith("dropout") for x in theirs):
        causes.append("use_dropout = true: ComfyUI never puts the modules in eval mode, so its dropout (p = 0.3, "
                      "whatever dropout_structure says) stays on when generating (set use_dropout = false)")
    return causes
