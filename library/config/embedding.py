"""`[embedding]`: the placeholder token `train_textual_inversion.py` adds, how it starts, how captions use it.

Names follow sd-scripts' train_textual_inversion.py (`--token_string`, `--init_word`, `--num_vectors_per_token`,
`--use_object_template`, `--use_style_template`, `--weights`); see KOHYA_NAMES. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from library.config.fields import opt
from library.config.run import RunConfig
from library.errors import ConfigError

CaptionMode = Literal["caption", "object", "style"]
EmbeddingFormat = Literal["safetensors", "pt"]

# sd-scripts argument -> our "table.key" (use_object_template / use_style_template become embedding.captions).
KOHYA_NAMES: dict[str, str] = {
    "token_string": "embedding.token_string",
    "init_word": "embedding.init_word",
    "num_vectors_per_token": "embedding.num_vectors_per_token",
    "weights": "embedding.init_from",
}


@dataclass
class EmbeddingConfig:
    """`[embedding]`: the new token (one or more vectors), its initialisation, the captions it is trained with."""

    token_string: str = opt("<sks>", "placeholder added to the tokenizer(s) and used in captions / prompts, e.g. '<my-cat>'")
    init_word: str = opt("*", "word whose token embedding(s) start the vectors (cycled if it has several tokens)")
    num_vectors_per_token: int = opt(1, "vectors the token stands for (names '<tok>', '<tok>_1', ... as diffusers)")
    init_from: str = opt("", "start from an embedding file (.safetensors or A1111 .pt) instead of init_word")
    captions: CaptionMode = opt(
        "caption", "caption: the image captions with the token put in; object / style: random prompt templates "
                   "('a photo of a <tok>', 'a painting in the style of <tok>', ...), image captions ignored")
    replace_word: str = opt(
        "", "word of the captions that stands for the concept and is replaced by the token ('' = captions "
            "without the token get it in front: '<tok>, a cat on a sofa')")
    format: EmbeddingFormat = opt(
        "safetensors", "safetensors: single key 'emb_params' (SDXL: 'clip_l' + 'clip_g'); pt: A1111's "
                       "string_to_param layout (SDXL: 'clip_l' + 'clip_g')")

    def validate(self) -> None:
        token = self.token_string
        if not token or token != token.strip() or any(c.isspace() for c in token):
            raise ConfigError(f"embedding.token_string must be one word without spaces, e.g. '<my-cat>' "
                              f"(got {token!r})")
        if not 1 <= self.num_vectors_per_token <= 75:
            # 75 = the tokens of one 77-token CLIP window between start and end tokens.
            raise ConfigError(f"embedding.num_vectors_per_token must be 1..75 (got {self.num_vectors_per_token})")
        if not self.init_word.strip() and not self.init_from:
            raise ConfigError("embedding.init_word is empty: name a word close to the concept (e.g. 'cat'), "
                              "or set embedding.init_from to an embedding file")
        if self.replace_word and token in self.replace_word:
            raise ConfigError(f"embedding.replace_word {self.replace_word!r} contains the token string {token!r} (embedding.token_string): "
                              "captions would be rewritten endlessly; choose another replace_word")
        if self.replace_word and self.captions != "caption":
            raise ConfigError(f"embedding.replace_word is only used with embedding.captions = 'caption' "
                              f"(got captions = {self.captions!r}); remove one of them")


@dataclass
class TextualInversionConfig(RunConfig):
    """The root config of train_textual_inversion.py: every shared table plus `[embedding]`."""

    embedding: EmbeddingConfig = opt(EmbeddingConfig(), "The placeholder token and how it is trained.")

    def validate(self) -> None:
        super().validate()
        if self.train.train_text_encoder:
            raise ConfigError("train.train_text_encoder = true fine-tunes the whole text encoder; textual inversion "
                              "trains only the new token's vectors: remove train.train_text_encoder")
