"""`tiny:sd3`: a tiny, randomly initialised SD3.5-style model for tests, demos and the quickstart.

The layout is SD3.5 Medium's (q/k RMS norm, a dual-attention MMDiT-X block, the last block's context stream
"pre only"), so key maps, LoRA naming and block-weighted merges see every kind of released module path; widths are
small. The VAE is the colour codec of library/models/tiny_vae.py with SD3's 16 latent channels and shift/scale
factors. Text encoders: CLIP-L and CLIP-G with projection (real CLIP vocabulary) and a T5 encoder whose tokenizer is
a small SentencePiece-style Unigram model built here from the bundled CLIP vocabulary's most frequent words (no
model hub: the real T5 SentencePiece vocabulary is not redistributable offline).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from library.models.configs import CONFIGS_ROOT, bundled_config_dir
from library.models.model import SDModel

# Widths apart from each other (32 / 48 / 96) so that a mixed-up tensor shows as a shape error. The joint attention
# width equals T5's d_model, as on the released models (4096): CLIP-L + CLIP-G hidden states (80) are zero-padded to
# it and concatenated with T5's tokens along the sequence (StableDiffusion3Pipeline.encode_prompt).
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 32, 48, 96
TEXT_LAYERS = 3  # enough for the penultimate CLIP layer to differ from the last one
T5_WORDS = 2000  # word pieces of the tiny T5 vocabulary (plus characters and specials)


# Bump when the tiny SD3 layout or its initialisation changes: its cached folders are kept apart by this number
# (library/models/tiny.py), so stale ones are not reused. v2: 2 heads of 32 (was 2 of 8): on the native quickstart
# (demo:shapes, 300 steps, 64 px) the loss went 1.55 -> 0.43 (was 1.66 -> 0.98) and samples took the prompted
# colours, at 57 s instead of 44 s of training on 2 shared cores.
SD3_TINY_VERSION = 2


def tiny_transformer_config() -> dict[str, Any]:
    """SD3.5 Medium's transformer config with small widths: 3 blocks (0 dual-attention, 2 context-pre-only), two
    32-wide heads (inner and caption width 64; released: 24 or 38 heads of 64)."""
    cfg = _read_json(bundled_config_dir("sd35_medium") / "transformer" / "config.json")
    cfg.update(
        sample_size=8, num_layers=3, attention_head_dim=32, num_attention_heads=2, caption_projection_dim=64,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        # 32 x 32 patches = 512 px at patch 2 and a /8 VAE: room for every bucket the demo configs use.
        pos_embed_max_size=32, dual_attention_layers=[0],
    )
    return cfg


def tiny_vae_config() -> dict[str, Any]:
    """SD3's VAE (16 latent channels, shift 0.0609, scale 1.5305, no quant convs) with 16-32 channels."""
    cfg = _read_json(bundled_config_dir("sd35_medium") / "vae" / "config.json")
    cfg.update(block_out_channels=[16, 32, 32, 32], norm_num_groups=8, sample_size=64)
    return cfg


def tiny_clip_configs() -> list[dict[str, Any]]:
    out = []
    for width, act in ((CLIP_L_WIDTH, "quick_gelu"), (CLIP_G_WIDTH, "gelu")):
        out.append(dict(
            architectures=["CLIPTextModelWithProjection"], vocab_size=49408, max_position_embeddings=77,
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
            hidden_act=act, projection_dim=width, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ))
    return out


def tiny_t5_config(vocab_size: int) -> dict[str, Any]:
    """T5 v1.1's encoder layout (gated-GELU, relative attention buckets 32 / distance 128) with small widths."""
    cfg = _read_json(bundled_config_dir("sd35_medium") / "text_encoder_3" / "config.json")
    cfg.update(d_model=T5_WIDTH, d_kv=16, num_heads=2, d_ff=2 * T5_WIDTH, num_layers=2, num_decoder_layers=2,
               vocab_size=vocab_size, dropout_rate=0.0)
    cfg.pop("torch_dtype", None)
    return cfg


def tiny_t5_tokenizer() -> Any:
    """A T5TokenizerFast over a Unigram model (SentencePiece's algorithm, as T5's own tokenizer): <pad> 0, </s> 1,
    <unk> 2 as in T5; every lower-case character alone or word-initial, and the 2000 most frequent whole words of
    the CLIP vocabulary (its BPE merge order) word-initially, scored so whole words win. Lower-cases its input."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.:;!?'\"()-_/&+#@%*=":
        vocab += [(ch, -10.0), ("\u2581" + ch, -10.5)]
    clip = json.loads((CONFIGS_ROOT / "clip_tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    seen = {piece for piece, _ in vocab}
    words = []
    for token, _ in sorted(clip.items(), key=lambda kv: kv[1]):
        word = token[:-4]
        if token.endswith("</w>") and len(word) > 1 and word.isalpha() and word.isascii():
            if "\u2581" + word not in seen:
                words.append(word)
                seen.add("\u2581" + word)
        if len(words) == T5_WORDS:
            break
    vocab += [("\u2581" + w, -3.0 - i * 1e-4) for i, w in enumerate(words)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_tiny_sd3(seed: int = 0) -> SDModel:
    """The tiny SD3 model with weights drawn from `seed` (same seed -> bit-identical weights), caller's RNG kept."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from library.models.tiny_vae import make_colour_codec

    bundled = bundled_config_dir("sd35_medium")
    t5_tokenizer = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel.from_config(tiny_transformer_config())
        vae = AutoencoderKL.from_config(tiny_vae_config())
        make_colour_codec(vae)
        clips = [CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in c.items() if k != "architectures"}))
                 for c in tiny_clip_configs()]
        t5 = T5EncoderModel(T5Config(**tiny_t5_config(len(t5_tokenizer))))
    tokenizers = [CLIPTokenizer.from_pretrained(bundled / d) for d in ("tokenizer", "tokenizer_2")] + [t5_tokenizer]
    scheduler_config = _read_json(bundled / "scheduler" / "scheduler_config.json")
    for m in (transformer, vae, *clips, t5):
        m.eval().requires_grad_(False)
    return SDModel(
        family="sd3", prediction_type="flow", unet=transformer, vae=vae, text_encoders=[*clips, t5],
        tokenizers=tokenizers, scheduler_config=scheduler_config, source="tiny:sd3", config_dir=bundled,
        extra={"tiny": "sd3", "sd3_variant": "sd35_medium"},
    )


def _read_json(path: Path) -> dict[str, Any]:
    return copy.deepcopy(json.loads(Path(path).read_text(encoding="utf-8")))
