"""Textual inversion (Gal et al., arXiv 2208.01618): new token rows in the text encoders' input embeddings.

In memory, the placeholder ("<tok>", and "<tok>_1", ... for a multi-vector token, named as diffusers'
`load_textual_inversion` names them) is added to each tokenizer as new tokens, the encoders' embedding matrices grow
by those rows, and only those rows train (see `RowGuard`). Captions spell the token once; `expand_token` writes out the
extra vector names, as diffusers' `maybe_convert_prompt` does for prompts.

Files (DESIGN.md "Textual inversion"): `.safetensors` with the single key `emb_params` -> [n, width] (SD1/SD2) or
`clip_l` [n, 768] + `clip_g` [n, 1280] (SDXL); the A1111 `.pt` layout `{"string_to_token": {"*": 265},
"string_to_param": {"*": tensor}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}`, pickled with tensors and
plain values only (read back with `torch.load(weights_only=True)`). A1111 refuses a file with more than one term (its
"single-key rule"), so nothing else is ever stored as a tensor.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from library.errors import ConfigError, ModelFileError
from library.fileio import atomic_path

# Prompt templates of the textual-inversion paper's code (rinongal/textual_inversion, ldm/data/personalized.py and
# personalized_style.py, themselves after CLIP's ImageNet prompts); sd-scripts uses the same lists.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
A1111_STAR_TOKEN = 265  # CLIP's id of "*": A1111 writes string_to_token = {"*": 265} in every embedding
SDXL_KEYS = ("clip_l", "clip_g")  # text encoder 1 (CLIP ViT-L), text encoder 2 (OpenCLIP bigG)
RELEASED_WIDTHS = {768: "SD1.x (or SDXL's clip_l)", 1024: "SD2.x", 1280: "SDXL's clip_g"}


# ---- names and captions (pure) ----

def token_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of an n-vector token: '<tok>', '<tok>_1', ..., '<tok>_{n-1}' (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_token(text: str, token: str, n: int) -> str:
    """Write each standalone `token` out as its n vector names (an occurrence already followed by '_<digit>' is one
    of those names and is left alone)."""
    if n == 1:
        return text
    return re.sub(re.escape(token) + r"(?!_\d)", " ".join(token_names(token, n)), text)


def caption_with_token(caption: str, token: str, replace_word: str) -> str:
    """The image's caption with the token in it: `replace_word` (a whole word) replaced by the token; else the
    caption as is if it already has the token; else the token put in front ('<tok>, a cat')."""
    if replace_word:
        replaced, count = re.subn(r"(?<!\w)" + re.escape(replace_word) + r"(?!\w)", token, caption)
        if count:
            return replaced
    if token in caption:
        return caption
    return f"{token}, {caption}" if caption.strip() else token


def render_captions(captions: list[str], mode: str, token: str, n: int, replace_word: str,
                    rng: random.Random) -> list[str]:
    """A batch's training prompts: per caption, the caption with the token (mode 'caption') or a template drawn from
    `rng` (modes 'object' / 'style'); the token written out for n vectors."""
    out = []
    for caption in captions:
        match mode:
            case "caption":
                text = caption_with_token(caption, token, replace_word)
            case "object":
                text = rng.choice(OBJECT_TEMPLATES).format(token)
            case "style":
                text = rng.choice(STYLE_TEMPLATES).format(token)
            case _:
                raise ValueError(f"unknown caption mode {mode!r}")
        out.append(expand_token(text, token, n))
    return out


def cycled_rows(weight: torch.Tensor, init_ids: list[int], n: int) -> torch.Tensor:
    """n rows copied from `weight` at `init_ids`, cycling through the ids (sd-scripts repeats or truncates an init
    word whose token count differs from num_vectors_per_token)."""
    if not init_ids:
        raise ValueError("init_ids is empty")
    return weight[[init_ids[i % len(init_ids)] for i in range(n)]].clone()


# ---- adding the token to a model ----

def add_token(tokenizer: Any, text_encoder: Any, token: str, n: int, init_word: str,
              init_vectors: torch.Tensor | None = None) -> list[int]:
    """Add the n token names to `tokenizer`, grow `text_encoder`'s input embeddings to hold them and initialise their
    rows from `init_vectors` [n, width] or else from `init_word`. Returns the new token ids."""
    names = token_names(token, n)
    vocab = tokenizer.get_vocab()
    taken = [t for t in names if t in vocab]
    if taken:
        raise ConfigError(f"embedding.token_string: {', '.join(taken)} is already a token of the tokenizer; choose "
                          f"a new string such as '<{token.strip('<>')}-emb>'")
    if tokenizer.add_tokens(names) != n:
        raise ConfigError(f"embedding.token_string: the tokenizer did not add all of {names}; choose another string")
    ids = tokenizer.convert_tokens_to_ids(names)
    for name, i in zip(names, ids):
        got = tokenizer(name, add_special_tokens=False).input_ids
        if got != [i]:
            raise ConfigError(f"embedding.token_string: {name!r} does not tokenize as one token (got {got})")
    emb = text_encoder.get_input_embeddings()
    if max(ids) >= emb.num_embeddings:
        text_encoder.resize_token_embeddings(max(max(ids) + 1, len(tokenizer)), mean_resizing=False)
        emb = text_encoder.get_input_embeddings()
    with torch.no_grad():
        if init_vectors is None:
            init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
            if not init_ids:
                raise ConfigError(f"embedding.init_word {init_word!r} has no tokens; name a real word such as 'cat'")
            emb.weight[ids] = cycled_rows(emb.weight, init_ids, n)
        else:
            emb.weight[ids] = init_vectors.to(emb.weight.dtype)
    return ids


def pool_at_end_token(text_encoder: Any, eos_id: int) -> None:
    """Make the encoder's pooled output read the first end-of-text token, not the highest token id.

    Released SDXL encoder configs say eos_token_id = 2, which makes transformers pool at `input_ids.argmax()`
    (modeling_clip.py, "The `eos_token_id` was incorrect before PR #24773"): with new tokens (ids > 49407) in a
    prompt it would pool at the placeholder. A1111 and ComfyUI pool at the end token, and sd-scripts corrects the
    same bug (library/train_util.py `pool_workaround`), so training and sampling here do too. Prompts without new
    tokens give the same result either way (the end token is then the highest id, first occurrence).
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    inner.eos_token_id = eos_id


def match_embedding_dtype(text_encoder: Any) -> None:
    """Cast the token embeddings' output to the dtype of the rest of the encoder.

    The loop keeps trained weights (this embedding matrix) in fp32 and frozen ones in the mixed-precision dtype, and
    a text encoder that trains runs outside autocast; without the cast, fp32 token embeddings would meet fp16 / bf16
    LayerNorm weights. The cast is differentiable, so the gradient still reaches the fp32 rows.
    """
    token_embedding = text_encoder.get_input_embeddings()

    def cast(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        dtype = _frozen_dtype(text_encoder)
        return output if output.dtype == dtype else output.to(dtype)

    token_embedding.register_forward_hook(cast)


def _frozen_dtype(text_encoder: Any) -> torch.dtype:
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.embeddings.position_embedding.weight.dtype


class RowGuard:
    """Trains only the rows `ids` of an embedding weight; every other row stays bit-identical.

    Two parts, each needed: (1) a gradient hook zeroes the other rows' gradient, so gradient clipping, the
    optimizer's moments and its step see only the new rows (the caption's other tokens do get gradients);
    (2) `restore()` after each optimizer step copies the other rows back from a snapshot, because decoupled weight
    decay (AdamW, Lion, Adafactor, Prodigy) moves rows whose gradient is zero. The snapshot is taken on the
    weight's training device and dtype by `snapshot()` (the loop moves and casts weights after `setup`).
    """

    def __init__(self, weight: torch.nn.Parameter, ids: list[int]):
        self.weight = weight
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.frozen: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        weight.register_hook(self._mask_grad)

    def _keep(self, device: torch.device) -> torch.Tensor:
        if self._mask is None or self._mask.device != device:
            mask = torch.ones(self.weight.shape[0], dtype=torch.bool)
            mask[self.ids] = False
            self._mask = mask.to(device)
        return self._mask

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self._keep(grad.device)[:, None], 0)

    def snapshot(self) -> None:
        self.frozen = self.weight.detach()[self._keep(self.weight.device)].clone()

    @torch.no_grad()
    def restore(self) -> None:
        if self.frozen is None:
            raise RuntimeError("RowGuard.restore before snapshot")
        self.weight[self._keep(self.weight.device)] = self.frozen

    def rows(self) -> torch.Tensor:
        return self.weight.detach()[self.ids.to(self.weight.device)]

    @torch.no_grad()
    def set_rows(self, values: torch.Tensor) -> None:
        self.weight[self.ids.to(self.weight.device)] = values.to(self.weight.device, self.weight.dtype)


# ---- files ----

def save_embedding(path: Path, vectors: list[torch.Tensor], family: str, *, layout: str, name: str, step: int,
                   checkpoint_name: str = "", metadata: dict[str, str] | None = None) -> Path:
    """Write an embedding: `vectors` = one [n, width] tensor per text encoder. layout 'safetensors' or 'pt'."""
    vecs = [v.detach().to("cpu").contiguous() for v in vectors]
    if family == "sdxl":
        if len(vecs) != 2:
            raise ValueError("an SDXL embedding needs two tensors (clip_l, clip_g)")
        tensors = dict(zip(SDXL_KEYS, vecs))
    else:
        (vec,) = vecs
        tensors = {"emb_params": vec}
    match layout:
        case "safetensors":
            from safetensors.torch import save_file

            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=metadata or {})
        case "pt":
            # A1111 (modules/textual_inversion/textual_inversion.py, Embedding.save) layout; SDXL embeddings have no
            # A1111 .pt layout of their own, and A1111 reads a clip_l + clip_g dict from any file type.
            payload: dict[str, Any] = dict(tensors) if family == "sdxl" else {
                "string_to_token": {"*": A1111_STAR_TOKEN}, "string_to_param": {"*": tensors["emb_params"]},
                "name": name, "step": int(step), "sd_checkpoint": None, "sd_checkpoint_name": checkpoint_name or None}
            with atomic_path(path) as tmp:
                torch.save(payload, tmp)
        case _:
            raise ValueError(f"unknown embedding layout {layout!r}")
    return path


def read_embedding_file(path: str | Path) -> dict[str, Any]:
    """The raw content of an embedding file; pickles only through torch's weights-only unpickler."""
    from library.models.safe_load import PICKLE_SUFFIXES, open_tensor_file

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"embedding.init_from: {path} does not exist")
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        f = open_tensor_file(path)  # checks the safetensors header; other suffixes get a clear error
        return {k: f[k] for k in f}
    from library.models.safe_load import read_pickle_dict

    return read_pickle_dict(path, "embedding file")


def embedding_vectors(data: Mapping[str, Any], family: str, widths: list[int], source: str) -> list[torch.Tensor]:
    """One [n, width] fp32 tensor per text encoder from a file's content, checked against the model's family and
    encoder widths (ModelFileError naming the mismatch)."""
    def as_rows(t: Any, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
            raise ModelFileError(f"{source}: {what} is not a [vectors, width] float tensor")
        return (t[None] if t.ndim == 1 else t).float()

    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelFileError(f"{source}: string_to_param must hold exactly one term (A1111's rule)")
        found, kind = [as_rows(next(iter(params.values())), "string_to_param")], "SD1/SD2 (one tensor)"
    elif all(k in data for k in SDXL_KEYS):
        found, kind = [as_rows(data[k], k) for k in SDXL_KEYS], "SDXL (clip_l + clip_g)"
    elif len(data) == 1:
        key = next(iter(data))
        found, kind = [as_rows(data[key], repr(key))], "SD1/SD2 (one tensor)"
    else:
        raise ModelFileError(f"{source}: not an embedding: expected one tensor (emb_params), clip_l + clip_g, or "
                             f"A1111's string_to_param; found keys {sorted(map(str, data))}")
    if len(found) != len(widths):
        raise ModelFileError(f"{source}: holds an {kind} embedding but the model is {family} with {len(widths)} text "
                             f"encoder(s); use an embedding made for {family}")
    for i, (t, w) in enumerate(zip(found, widths)):
        if t.shape[1] != w:
            made = RELEASED_WIDTHS.get(t.shape[1], "another model")
            label = SDXL_KEYS[i] if len(found) == 2 else "its vectors"
            raise ModelFileError(f"{source}: {label} are {t.shape[1]} wide but the model's text encoder {i + 1} "
                                 f"({family}) is {w} wide; this embedding was made for {made}")
    if len({t.shape[0] for t in found}) != 1:
        raise ModelFileError(f"{source}: clip_l and clip_g hold different vector counts "
                             f"({found[0].shape[0]} and {found[1].shape[0]})")
    return found
