"""What an SD3 `SDModel`'s diffusers folder holds (what `StableDiffusion3Pipeline.from_pretrained` loads); written by
library/models/diffusers_folder.py with the rules of every family, through library/models/save.py.

A model without T5 writes `text_encoder_3` / `tokenizer_3` as null, as diffusers saves a pipeline loaded with
`text_encoder_3=None`.
"""

from __future__ import annotations

from typing import Any

from library.models.diffusers_folder import FolderLayout, diffusers_version
from library.models.model import SDModel

TE_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2", "tokenizer_3")


def model_index_sd3(model: SDModel) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", model.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, (te_name, tok_name) in enumerate(zip(TE_NAMES, TOKENIZER_NAMES)):
        if i < len(model.text_encoders):
            index[te_name] = ["transformers", type(model.text_encoders[i]).__name__]
            index[tok_name] = ["transformers", "T5TokenizerFast" if i == 2 else "CLIPTokenizer"]
        else:
            index[te_name] = [None, None]
            index[tok_name] = [None, None]
    return dict(sorted(index.items()))


def folder_layout_sd3(model: SDModel) -> FolderLayout:
    """The SD3 folder: transformer/, two CLIP text encoders and optionally T5, a flow-matching scheduler."""
    n = len(model.text_encoders)
    scheduler = dict(model.scheduler_config)
    scheduler.setdefault("_class_name", "FlowMatchEulerDiscreteScheduler")
    return FolderLayout(index=model_index_sd3(model), denoiser="transformer", text_encoders=TE_NAMES[:n],
                        tokenizers=TOKENIZER_NAMES[:len(model.tokenizers)], scheduler=scheduler)
