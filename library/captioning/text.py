"""Natural-language captions with a transformers image-to-text model (BLIP, BLIP-2, GIT, Florence-2, ...).

The model is whatever `AutoModelForImageTextToText` loads from a model id or a local folder, with its
`AutoProcessor`: the processor turns the images (and the prompt, if any) into model inputs, `generate` writes the
caption, the processor decodes it. Models that continue their prompt (BLIP, BLIP-2) repeat it at the start of the
output; it is cut off unless `keep_prompt`, by the rule transformers' image-text-to-text pipeline uses
(`ImageTextToTextPipeline.postprocess`: the decoded prompt found within the first 2 characters of the output).
Decoding is deterministic (greedy or beam search, no sampling), so a resumed run writes what one run would have.
"""

from __future__ import annotations

import inspect

from PIL import Image

from library.config.caption import GenerateConfig
from library.errors import ConfigError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def strip_prompt(caption: str, prompt: str) -> str:
    """The caption without the prompt it starts with (within 2 leading characters), else the caption unchanged."""
    if not prompt:
        return caption.strip()
    at = caption.find(prompt)
    return (caption[at + len(prompt):] if 0 <= at <= 2 else caption).strip()


class TextCaptioner:
    """One loaded captioner; `__call__(images, gen)` captions a batch with the settings of one [caption.*] table."""

    def __init__(self, model: str, *, dtype: str, device: str, keep_prompt: bool, progress: bool = True) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        self.device = torch.device(device)
        name = DTYPES.get(dtype, "float16" if device == "cuda" else "float32")  # auto: fp16 on CUDA, else fp32
        self.dtype = getattr(torch, name)
        self.keep_prompt = keep_prompt
        self.ref = model
        bar = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=self.dtype)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise ConfigError(f"caption.model = {model!r} cannot be loaded as an image captioner (a transformers "
                              f"model id or folder that AutoModelForImageTextToText and AutoProcessor load: BLIP, "
                              f"BLIP-2, GIT, Florence-2, ...): {str(e).splitlines()[0][:300]}") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        # The inputs the model names: GIT's processor also returns BERT token_type_ids, which generate refuses.
        self.accepts = set(inspect.signature(self.model.forward).parameters)

    def __call__(self, images: list[Image.Image], gen: GenerateConfig) -> list[str]:
        import torch

        kwargs = {"text": [gen.prompt] * len(images)} if gen.prompt else {}
        try:
            inputs = self.processor(images=images, return_tensors="pt", **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"caption.model = {self.ref!r} does not take images with prompt {gen.prompt!r} "
                              f"({str(e).splitlines()[0][:200]}); Florence-2 needs a task prompt such as "
                              "'<CAPTION>'") from None
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor) and k in self.accepts}
        try:
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=gen.max_new_tokens,
                                          min_new_tokens=gen.min_new_tokens, num_beams=gen.num_beams, do_sample=False)
        except ValueError as e:  # e.g. a chat model whose prompt lacks its image token
            raise ConfigError(f"caption.model = {self.ref!r} cannot caption with prompt {gen.prompt!r}: "
                              f"{str(e).splitlines()[0][:300]}") from None
        captions = self.processor.batch_decode(out, skip_special_tokens=True)
        if gen.prompt and not self.keep_prompt and "input_ids" in inputs:
            prompts = self.processor.batch_decode(inputs["input_ids"], skip_special_tokens=True)
            captions = [strip_prompt(c, p.strip()) for c, p in zip(captions, prompts)]
        return [" ".join(c.split()) for c in captions]  # one line: the loader reads each line as an alternative
