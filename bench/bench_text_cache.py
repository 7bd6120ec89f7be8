"""Text-encoder output cache benchmark: a second run reading the disk cache vs encoding every caption again.

    python bench/bench_text_cache.py [--captions 256] [--repeat 3]

SD 1.5's text encoder at full size (CLIP ViT-L/14, 123 M parameters, built from the bundled config with random
weights: the timing does not depend on the values), fp32 on CPU, `--captions` distinct captions of ~20 tokens.
Measured in one run, medians of `--repeat`:
  encode   - what every run paid before data.cache_text_encoder_outputs_to_disk: tokenize + encode all captions
  reuse    - a second run: hash the encoder's weights (stale detection) and read every caption's outputs from disk
  identity - the weight hash alone (text_cache_record), part of `reuse`
Printed as ratios and written to bench/results/text_cache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from library.data import text_cache as T
    from library.models.configs import bundled_config_dir
    from library.models.model import SDModel
    from library.models.text import encode_text, tokenize

    root = bundled_config_dir("sd15")
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")).eval()
    model = SDModel(family="sd1", prediction_type="epsilon", unet=None, vae=None, text_encoders=[te],
                    tokenizers=[CLIPTokenizer.from_pretrained(root / "tokenizer")], scheduler_config={},
                    source="bench", config_dir=root)
    colours = ["red", "blue", "green", "yellow", "white", "black", "gray", "orange"]
    shapes = ["circle", "square", "star", "triangle", "diamond", "heart", "cross", "moon"]
    captions = [f"a {c} {s} on a {b} background, photo {i}, high quality, detailed, studio light"
                for i, (c, s, b) in enumerate((c, s, b) for c in colours for s in shapes for b in colours)]
    captions = captions[: args.captions]

    def encode(caps: list[str]):
        with torch.no_grad():
            c = encode_text(model, tokenize(model, caps))
        return c.hidden, c.pooled

    times = {"encode": [], "reuse": [], "identity": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            record = T.text_cache_record(model, 1, "no")
            times["identity"].append(time.perf_counter() - t)
            t = time.perf_counter()
            T.load_or_encode(captions, encode, Path(d), record)  # first run: encode and write
            times["encode"].append(time.perf_counter() - t - times["identity"][-1])
            t = time.perf_counter()
            again = T.text_cache_record(model, 1, "no")
            hashed = time.perf_counter()
            T.load_or_encode(captions, lambda c: 1 / 0, Path(d), again)
            times["reuse"].append(time.perf_counter() - t)
            times["identity"][-1] = hashed - t  # the second hash: the first one also paid for cold caches
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"captions": len(captions), "threads": torch.get_num_threads(), "seconds": med,
              "encode_over_reuse": med["encode"] / med["reuse"],
              "identity_share_of_reuse": med["identity"] / med["reuse"]}
    out = REPO / "bench" / "results" / "text_cache.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"text-encoder cache, {len(captions)} captions, CLIP ViT-L fp32 on CPU ({result['threads']} threads): "
          f"a second run reading the cache takes 1/{result['encode_over_reuse']:.1f} of encoding again; "
          f"the weight hash is {100 * result['identity_share_of_reuse']:.0f} % of the reuse time")


if __name__ == "__main__":
    main()
