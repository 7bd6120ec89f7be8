"""Tiny captioning models built offline for the caption_images.py tests.

- `make_tiny_blip(folder)`: a random BlipForConditionalGeneration from a tiny BlipConfig, with a BlipProcessor (32 px
  images, a 21-word BERT WordPiece vocabulary), saved as a transformers folder. Its init is scaled so that the
  coloured squares of COLOURS get different, non-empty captions (greedy and beam search).
- `make_tiny_blip2(folder)`: a random Blip2ForConditionalGeneration (tiny ViT, Q-Former and OPT decoder, 2 query
  tokens) with a Blip2Processor over a word-level tokenizer; a decoder-only captioner, which repeats its prompt.
- `make_tiny_florence2(folder)`: a random Florence2ForConditionalGeneration (2-stage DaViT, 1-layer BART) with a
  Florence2Processor (CLIP image processor, word-level tokenizer with the <image> token) that takes the task
  prompts '<CAPTION>', '<DETAILED_CAPTION>', '<MORE_DETAILED_CAPTION>'; an encoder-decoder captioner (seed 1 and
  a wide decoder init give non-empty captions for the COLOURS).
- `make_tiny_git(folder)`: a random GitForCausalLM with a GitProcessor (CLIP image processor, the BERT vocabulary
  above); a decoder-only captioner whose processor also returns token_type_ids.
- `make_tiny_tagger(folder)`: a WD14-like ONNX model (NHWC float input [batch, side, side, 3], BGR 0..255, sigmoid
  scores) built with the onnx helper API, plus its selected_tags.csv. It is not random: each score is a fixed
  function of the image's mean B, G and R (mean / 255 -> linear -> sigmoid), so a test knows which tags an image
  gets: a red image scores `red_hair` (0.9975) and rating `sensitive`; green gives `green_eyes` and the character
  `hatsune_miku_(vocaloid)`; blue `blue_sky`; white `white_background`; `^_^` always scores 0.95 and `looking_at_viewer`
  always 0.5. Reading the image as RGB instead of BGR swaps red and blue.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "black": (0, 0, 0), "white": (255, 255, 255)}
WORDS = "a the photo of red blue green square circle triangle on white black background small large picture dog cat"

# name, category, weights on (B, G, R) means in 0..1, bias: score = sigmoid(w . mean + bias)
TAGS = [
    ("general", 9, (0, 0, 0), 1.0),
    ("sensitive", 9, (0, 0, 3), 0.0),
    ("questionable", 9, (0, 0, 0), -1.0),
    ("explicit", 9, (0, 0, 0), -2.0),
    ("red_hair", 0, (0, 0, 12), -6.0),
    ("green_eyes", 0, (0, 12, 0), -6.0),
    ("blue_sky", 0, (12, 0, 0), -6.0),
    ("white_background", 0, (4, 4, 4), -10.0),
    ("^_^", 0, (0, 0, 0), float(np.log(0.95 / 0.05))),
    ("looking_at_viewer", 0, (0, 0, 0), 0.0),
    ("hatsune_miku_(vocaloid)", 4, (0, 12, 0), -6.0),
    ("hakurei_reimu", 4, (0, 0, 12), -6.0),
]


def make_tiny_blip(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS.split())}
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=BertTokenizerFast(vocab=vocab))
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=1.0),
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, sep_token_id=3,
                         pad_token_id=0, eos_token_id=3, initializer_range=0.1),
        projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_blip2(folder: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor,
                              OPTConfig, PreTrainedTokenizerFast)

    words = WORDS.split() + ["question", "answer", ":", "what", "is"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>", bos_token="</s>")
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, num_query_tokens=2)  # adds the <image> token
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=1.0),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, encoder_hidden_size=32),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                              pad_token_id=0, bos_token_id=2, eos_token_id=2, init_std=0.5).to_dict(),
        num_query_tokens=2, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_florence2(folder: Path, seed: int = 1) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, PreTrainedTokenizerFast)

    # the words of Florence-2's task prompts ("What does the image describe?", ...) and of WORDS
    words = set(WORDS.split()) | set("what does describe? in detail is shown with paragraph image.".split())
    words |= {w.capitalize() for w in words}
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>"] + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = 17  # 32 px / stride 8 = 4 x 4 patches, + 1 pooled token
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer)
    torch.manual_seed(seed)
    vision = dict(depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1),
                  patch_prenorm=(False, True), embed_dim=(16, 32), num_heads=(1, 2), num_groups=(1, 2), window_size=2,
                  projection_dim=32, drop_path_rate=0.0, max_position_embeddings=8, max_temporal_embeddings=4,
                  initializer_range=1.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_bos_token_id=1, init_std=0.6)
    config = Florence2Config(vision_config=vision, text_config=text.to_dict(), image_token_id=tokenizer.image_token_id)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_git(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizerFast, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS.split())}
    processor = GitProcessor(image_processor=CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False),
                             tokenizer=BertTokenizerFast(vocab=vocab))
    torch.manual_seed(seed)
    config = GitConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=8, initializer_range=1.0),
                       vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                       pad_token_id=0, initializer_range=0.3)
    GitForCausalLM(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_tagger(folder: Path, side: int = 16, batch: int | str = "batch", tags=TAGS) -> Path:
    """model.onnx + selected_tags.csv in `folder`; `batch` an int makes the model's batch size fixed."""
    import onnx
    from onnx import TensorProto, helper

    weights = np.array([w for _, _, w, _ in tags], dtype=np.float32).T  # [3 (B, G, R), tags]
    bias = np.array([b for _, _, _, b in tags], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1", "axes"], ["mean"], keepdims=0),  # [N, 3]: mean B, G, R
         helper.make_node("Mul", ["mean", "scale"], ["unit"]),
         helper.make_node("MatMul", ["unit", "weights"], ["logits0"]),
         helper.make_node("Add", ["logits0", "bias"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, side, side, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(tags)])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
                     helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255]),
                     helper.make_tensor("weights", TensorProto.FLOAT, list(weights.shape), weights.ravel().tolist()),
                     helper.make_tensor("bias", TensorProto.FLOAT, [len(tags)], bias.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # readable by older onnxruntime releases too
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _, _) in enumerate(tags):
            w.writerow([1000 + i, name, cat, 100 - i])
    return folder


def make_images(folder: Path, names_colours: dict[str, str], size: tuple[int, int] = (24, 24)) -> list[Path]:
    """Solid-colour PNGs `<name>.png` in `folder`; returns their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, colour in names_colours.items():
        path = folder / f"{name}.png"
        Image.new("RGB", size, COLOURS[colour]).save(path)
        paths.append(path)
    return paths
