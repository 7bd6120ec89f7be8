"""Turn a freshly initialised tiny `AutoencoderKL` into a colour codec, so that the tiny models can show learning.

Why: a randomly initialised VAE maps red and blue images to nearly the same latents and decodes every latent to
nearly the same colour, so nothing a tiny UNet learns about colour can be seen in its samples (and tests could not
check "a red ... prompt gives redder samples"). Training the VAE at build time costs minutes on a CPU and is not
bit-reproducible across thread counts; the weights below are set by hand instead, in microseconds, exactly.

What the codec does, in the diffusers module layout (so key maps, single-file saving and every loader see an ordinary
`AutoencoderKL`):
- every ResnetBlock2D has `conv2 = 0` (the block passes its input through; a channel-changing block passes it through
  its `conv_shortcut`, set to an identity embedding), and every attention block has `to_out = 0` (its residual passes
  the input through);
- the encoder's `conv_in` writes each colour twice, as (+delta*c, -delta*c), into channels 0-5; each `Downsample2D`
  averages 2x2 pixels; the decoder's `conv_in` writes the colours back from the latents the same way, each
  `Upsample2D` (nearest x2) is followed by an identity convolution: the decoded image is the 8x8-pixel mosaic of the
  latent grid's colours;
- the two places a GroupNorm sits on the path (`conv_norm_out` of encoder and decoder) are made linear: each of their
  groups holds a (+x, -x) pair or zeros, so the group mean is exactly 0, and the signal is so small (delta = 1e-5)
  that the group variance (<= 1e-10) is negligible against the norm's eps (1e-6): GroupNorm(x) = x / sqrt(var + eps)
  = x / sqrt(eps) to a relative 5e-5 (torch.nn.GroupNorm's formula);
- the SiLU after each of those norms is made linear by an offset b = 10: (silu(b + y) - silu(b - y)) / 2 = y to 5e-4
  (the even-order terms of the pair cancel);
- latents are a fixed linear colour transform of the 8x8-averaged RGB (luma and three colour differences), scaled so
  that `latents * scaling_factor` has a standard deviation near 1 on the demo images, as the released VAEs' scaling
  factors are chosen; the log-variance channels are -30, so sampling the latent distribution adds ~1e-7.
Other weights keep their random initialisation (they are multiplied by the zeros above), so models of different
seeds still differ everywhere except on the codec's path.
"""

from __future__ import annotations

import math

import torch

DELTA = 1e-5  # signal size at the group norms (see the module docstring)
SILU_OFFSET = 10.0
LOGVAR = -30.0
LATENT_STD = 0.8  # target std of latents * scaling_factor per unit of colour

# Rows: latent channels; columns: R, G, B in [-1, 1]. Orthonormal rows (luma, red-blue, green-magenta) plus a fourth
# colour difference, so every latent channel carries signal as SD's four do; decoding uses the pseudo-inverse.
_COLOUR_TO_LATENT = torch.tensor([
    [1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)],
    [1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)],
    [1 / math.sqrt(6), -2 / math.sqrt(6), 1 / math.sqrt(6)],
    [0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)],
], dtype=torch.float64)


def colour_to_latent(channels: int) -> torch.Tensor:
    """[channels, 3] colour -> latent matrix. Four channels (SD1/SD2/SDXL): the rows above. More (SD3's 16): the
    four rows repeated with alternating signs, so every channel carries colour with the per-channel spread of the
    4-channel codec (what `scaling_factor` is chosen for), and decoding (the pseudo-inverse) stays exact on the
    colours. Fewer than 4 or not a multiple of 4 is not a layout any family uses."""
    if channels == 4:
        return _COLOUR_TO_LATENT
    if channels < 4 or channels % 4:
        raise ValueError(f"colour codec: {channels} latent channels (expected 4 or a multiple of 4)")
    rows = [_COLOUR_TO_LATENT[j % 4] * (-1.0) ** (j // 4) for j in range(channels)]
    return torch.stack(rows)


@torch.no_grad()
def make_colour_codec(vae) -> None:
    """Set `vae`'s weights (in place) so that it encodes each 8x8 block's mean colour and decodes it back."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            _zero(module.conv2)
            if module.conv_shortcut is not None:
                _identity(module.conv_shortcut, tap=(0, 0))
        elif isinstance(module, Attention):
            _zero(module.to_out[0])
        elif isinstance(module, Downsample2D):
            _identity(module.conv, tap=(0, 0))
            w = module.conv.weight
            w[:, :, :2, :2] = w[:, :, :1, :1] / 4  # 2x2 mean of the pixels at (2i, 2j) .. (2i+1, 2j+1)
        elif isinstance(module, Upsample2D):
            _identity(module.conv, tap=(1, 1))

    sf = float(vae.config.scaling_factor)
    latent = vae.config.latent_channels
    to_latent = colour_to_latent(latent) * (LATENT_STD / sf)  # raw latents; the UNet sees them times sf
    to_colour = torch.linalg.pinv(to_latent)  # 3 x channels

    enc, dec = vae.encoder, vae.decoder
    # Encoder conv_in: pixel colour c -> (+DELTA c, -DELTA c) in channels 2k, 2k+1.
    _zero(enc.conv_in)
    for k in range(3):
        enc.conv_in.weight[2 * k, k, 1, 1] = DELTA
        enc.conv_in.weight[2 * k + 1, k, 1, 1] = -DELTA
    _linear_norm_silu(enc.conv_norm_out)
    # Encoder conv_out: latent means from the pairs; log-variances constant.
    _zero(enc.conv_out)
    pair = _pair_reader()  # silu outputs (y+, y-) -> colour
    for j in range(latent):
        for k in range(3):
            enc.conv_out.weight[j, 2 * k, 1, 1] = float(to_latent[j, k]) * pair
            enc.conv_out.weight[j, 2 * k + 1, 1, 1] = -float(to_latent[j, k]) * pair
    enc.conv_out.bias[latent:] = LOGVAR
    for conv in (vae.quant_conv, vae.post_quant_conv):  # SD3's VAE has neither (use_quant_conv = false)
        if conv is not None:
            _identity(conv, tap=(0, 0))
    # Decoder conv_in: latents -> (+DELTA c, -DELTA c).
    _zero(dec.conv_in)
    for k in range(3):
        for j in range(latent):
            dec.conv_in.weight[2 * k, j, 1, 1] = DELTA * float(to_colour[k, j])
            dec.conv_in.weight[2 * k + 1, j, 1, 1] = -DELTA * float(to_colour[k, j])
    _linear_norm_silu(dec.conv_norm_out)
    _zero(dec.conv_out)
    for k in range(3):
        dec.conv_out.weight[k, 2 * k, 1, 1] = pair
        dec.conv_out.weight[k, 2 * k + 1, 1, 1] = -pair


def _linear_norm_silu(norm: torch.nn.GroupNorm) -> None:
    """Affine of a GroupNorm whose channels 0-5 hold (+DELTA c, -DELTA c) pairs: output SILU_OFFSET +- c there, 0
    elsewhere (silu(0) = 0, so the unused channels contribute nothing)."""
    norm.weight.zero_()
    norm.bias.zero_()
    norm.weight[:6] = math.sqrt(norm.eps) / DELTA
    norm.bias[:6] = SILU_OFFSET


def _pair_reader() -> float:
    """Weight w with w * (silu(b + c) - silu(b - c)) = c for small c: 1 / (2 * d/dc silu(b + c) at c = 0)."""
    b = torch.tensor(SILU_OFFSET, dtype=torch.float64)
    slope = torch.sigmoid(b) * (1 + b * (1 - torch.sigmoid(b)))
    return float(1 / (2 * slope))


def _zero(layer) -> None:
    layer.weight.zero_()
    if layer.bias is not None:
        layer.bias.zero_()


def _identity(conv: torch.nn.Conv2d, tap: tuple[int, int]) -> None:
    """conv(x)[c] = x[c] for the first min(in, out) channels (others 0), read at kernel position `tap`."""
    _zero(conv)
    n = min(conv.in_channels, conv.out_channels)
    idx = torch.arange(n)
    conv.weight[idx, idx, tap[0], tap[1]] = 1.0
