"""SD3's text conditioning, exactly as diffusers' `StableDiffusion3Pipeline.encode_prompt` builds it (diffusers
0.42; checked for equality in tests/test_sd3_text.py):

- CLIP-L and CLIP-G: 77 tokens each (padded as their tokenizers say: CLIP-L with <|endoftext|>, CLIP-G with "!"),
  the penultimate hidden state of each (`clip_skip` = k takes hidden_states[-(k + 1)], diffusers' clip_skip=k-1),
  concatenated on the channel axis (768 + 1280 = 2048) and zero-padded to T5's width (4096);
- T5-XXL: `t5xxl_max_token_length` tokens (default 256, sd-scripts' and the pipeline's), its last hidden state;
  without T5 these are zeros of the transformer's joint_attention_dim (SD3 paper sec. 5.3.3, the pipeline's
  `text_encoder_3=None` path);
- the sequence is CLIP's 77 tokens followed by T5's; pooled = concat(CLIP-L projection, CLIP-G projection) [B, 2048].
"""

from __future__ import annotations

import torch

from library.models.cond import TextCond
from library.models.model import SDModel

DEFAULT_T5_TOKENS = 256


def t5_tokens(model: SDModel) -> int:
    return int(model.extra.get("t5xxl_max_token_length", DEFAULT_T5_TOKENS))


def tokenize_sd3(model: SDModel, captions: list[str]) -> list[torch.Tensor]:
    """[B, 77] ids per CLIP tokenizer, and [B, t5 tokens] T5 ids (</s> appended, <pad> after) when T5 is used."""
    out = []
    for i, tokenizer in enumerate(model.tokenizers):
        length = tokenizer.model_max_length if i < 2 else t5_tokens(model)
        out.append(tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids)
    return out


def encode_text_sd3(model: SDModel, token_ids: list[torch.Tensor], clip_skip: int = 1):
    if len(token_ids) != len(model.text_encoders):
        raise ValueError(f"{len(token_ids)} token tensors for {len(model.text_encoders)} text encoders")
    hiddens, pooled = [], []
    for te, ids in zip(model.text_encoders[:2], token_ids[:2]):
        out = te(ids.to(te.device), output_hidden_states=True)
        pooled.append(out[0])  # text_embeds: the projected pooled output
        hiddens.append(out.hidden_states[-(clip_skip + 1)])
    clip = torch.cat(hiddens, dim=-1)
    width = int(model.unet.config.joint_attention_dim)
    if len(model.text_encoders) == 3:
        t5 = model.text_encoders[2]
        t5_hidden = t5(token_ids[2].to(t5.device))[0]
    else:
        t5_hidden = torch.zeros(clip.shape[0], t5_tokens(model), width, device=clip.device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return TextCond(torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1))
