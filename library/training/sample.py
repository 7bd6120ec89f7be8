"""Sample images during training from prompts in sd-scripts syntax, with diffusers pipelines.

A prompt line is `prompt text --n negative --w 512 --h 512 --d seed --s steps --l cfg_scale` (the options of
sd-scripts' `sample_image_inference`; any order, each optional). Images are written as PNG plus one grid per call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from library.errors import ConfigError
from library.fileio import atomic_path
from library.models.model import SDModel

_OPTION = re.compile(r"\s--([a-z]+)\s")


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0


def parse_prompt_line(line: str, defaults: SamplePrompt, source: str = "sample prompt") -> SamplePrompt:
    """Parse one sd-scripts prompt line. Unknown options are an error naming the line."""
    parts = _OPTION.split(" " + line.strip() + " ")
    prompt, options = parts[0].strip(), parts[1:]
    fields: dict = {"prompt": prompt}
    names = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
             "s": ("steps", int), "l": ("cfg_scale", float)}
    for flag, value in zip(options[0::2], options[1::2]):
        if flag not in names:
            raise ConfigError(f"{source}: unknown option --{flag} in {line!r} (known: --n --w --h --d --s --l)")
        name, cast = names[flag]
        try:
            fields[name] = cast(value.strip())
        except ValueError:
            raise ConfigError(f"{source}: --{flag} needs a {cast.__name__}, got {value.strip()!r} in {line!r}") from None
    return replace(defaults, **fields)


def read_prompts(inline: list[str], prompts_file: str, defaults: SamplePrompt) -> list[SamplePrompt]:
    lines = list(inline)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(f"sample.prompts_file: {path} does not exist")
        lines += path.read_text(encoding="utf-8").splitlines()
    lines = [ln for ln in (x.strip() for x in lines) if ln and not ln.startswith("#")]
    return [parse_prompt_line(ln, defaults) for ln in lines]


def make_scheduler(name: str, scheduler_config: dict):
    import diffusers

    if scheduler_config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        # Flow models (SD3) sample with the flow-match Euler scheduler they ship; the DDPM samplers do not apply.
        # 'euler_a' (the sample.sampler default) is read as this same Euler: diffusers has no ancestral flow sampler.
        if name not in ("euler", "euler_a"):
            raise ConfigError(f"sample.sampler = {name!r}: SD3 (a rectified-flow model) samples with 'euler' "
                              "(FlowMatchEulerDiscreteScheduler)")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    match name:
        case "euler_a":
            cls = diffusers.EulerAncestralDiscreteScheduler
        case "euler":
            cls = diffusers.EulerDiscreteScheduler
        case "ddim":
            cls = diffusers.DDIMScheduler
        case "dpmsolver++":
            cls = diffusers.DPMSolverMultistepScheduler
        case "pndm":
            cls = diffusers.PNDMScheduler
        case _:
            raise ConfigError(f"sample.sampler: unknown sampler {name!r}")
    return cls.from_config(scheduler_config)


def pipeline_class(family: str) -> type:
    """diffusers' StableDiffusionXLPipeline or StableDiffusionPipeline, imported with transformers' "requires
    torchvision, falling back to the PIL image processor" warnings silenced: the pipeline modules import CLIP and
    SigLIP image processors for the safety checker and IP-adapter feature extractors, which sampling never builds,
    and without torchvision (not a dependency) transformers printed two such lines on every run's first sample."""
    import logging

    quiet = logging.getLogger("transformers.utils.import_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import diffusers

        if family == "sd3":
            return diffusers.StableDiffusion3Pipeline
        return diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    finally:
        quiet.setLevel(level)


def build_pipeline(model: SDModel, sampler: str):
    """A diffusers pipeline over the live (training) modules: adapters and hooks apply as they are."""
    scheduler = make_scheduler(sampler, model.scheduler_config)
    cls = pipeline_class(model.family)
    if model.family == "sd3":  # T5 may be dropped (model.use_t5 = false): the pipeline then zeroes its tokens
        tes, toks = model.text_encoders, model.tokenizers
        pipe = cls(
            transformer=model.unet, scheduler=scheduler, vae=model.vae, text_encoder=tes[0], tokenizer=toks[0],
            text_encoder_2=tes[1], tokenizer_2=toks[1], text_encoder_3=tes[2] if len(tes) > 2 else None,
            tokenizer_3=toks[2] if len(toks) > 2 else None)
    elif model.family == "sdxl":
        pipe = cls(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=scheduler)
    else:
        pipe = cls(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(model: SDModel, prompts: list[SamplePrompt], *, sampler: str, base_seed: int, clip_skip: int = 1):
    """Generate one PIL image per prompt. Seeds: the prompt's --d, else base_seed + index (reproducible)."""
    pipe = build_pipeline(model, sampler)
    device = next(model.unet.parameters()).device
    images = []
    for i, p in enumerate(prompts):
        seed = p.seed if p.seed >= 0 else base_seed + i
        gen = torch.Generator(device="cpu").manual_seed(seed)
        kwargs = dict(prompt=p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                      num_inference_steps=p.steps, guidance_scale=p.cfg_scale, generator=gen)
        if clip_skip > 1:
            kwargs["clip_skip"] = clip_skip - 1  # diffusers counts skipped layers; sd-scripts counts from 1
        if model.family == "sd3":  # the T5 length the model is trained with (library/models/sd3/text.py)
            from library.models.sd3.text import t5_tokens

            kwargs["max_sequence_length"] = t5_tokens(model)
        # Half-precision frozen weights with fp32 trained parts (adapters, embeddings): autocast, as in training,
        # so the pipeline's fp32 latents and embeddings meet the UNet in one dtype.
        halves = {p.dtype for m in (model.unet, *model.text_encoders) for p in m.parameters()} - {torch.float32}
        dtype = min(halves, key=str) if halves else torch.float32
        with torch.autocast(device.type, dtype=dtype, enabled=bool(halves)):
            images.append(pipe(**kwargs).images[0])
    return images


def save_images(images, prompts: list[SamplePrompt], out_dir: Path, tag: str) -> list[Path]:
    """Write `<tag>_<i>.png` for each image and `<tag>_grid.png` (atomically)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, p) in enumerate(zip(images, prompts)):
        path = out_dir / f"{tag}_{i:02d}.png"
        with atomic_path(path) as tmp:
            img.save(tmp, format="PNG", pnginfo=_pnginfo(p))
        paths.append(path)
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * cell_w, (i // cols) * cell_h))
    with atomic_path(out_dir / f"{tag}_grid.png") as tmp:
        grid.save(tmp, format="PNG")
    return paths


def _pnginfo(p: SamplePrompt):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", f"{p.prompt}\nNegative prompt: {p.negative}\nSteps: {p.steps}, CFG scale: "
                                f"{p.cfg_scale}, Seed: {p.seed}, Size: {p.width}x{p.height}")
    return info
