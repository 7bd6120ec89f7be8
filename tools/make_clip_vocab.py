"""Derive CLIP's `vocab.json` + `merges.txt` (the Hugging Face tokenizer files) from open_clip's BPE merge list.

    python tools/make_clip_vocab.py bpe_simple_vocab_16e6.txt.gz library/models/configs/clip_tokenizer

`bpe_simple_vocab_16e6.txt.gz` ships (MIT licence) in the `open_clip_torch` wheel (`open_clip/`); it is the merge
list of OpenAI's CLIP tokenizer, shared by SD1's CLIP ViT-L and SD2/SDXL's OpenCLIP encoders. The vocabulary order
follows the construction in CLIP's `simple_tokenizer.py` (OpenAI CLIP, MIT): the 256 byte-level symbols, the same
symbols with the end-of-word marker `</w>`, one entry per merge (the merged pair), then `<|startoftext|>` and
`<|endoftext|>` -- 49408 entries, so `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407 as in SD's tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

N_VOCAB = 49408
N_MERGES = N_VOCAB - 2 * 256 - 2  # 48894: CLIP uses only the first merges of the 16e6 list


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in GPT-2 / CLIP order (Radford et al. 2019, byte-level BPE).

    Bytes that are already printable, non-space Latin-1 characters stand for themselves and come first (in byte
    order); the other bytes (controls, space, soft hyphen, ...) get code points 256, 257, ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    others = [b for b in range(256) if b not in kept]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = byte_symbols()
    entries = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    entries += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(entries)}
    if len(vocab) != N_VOCAB:
        raise ValueError(f"expected {N_VOCAB} distinct entries, got {len(vocab)}")
    return vocab


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is the "#version" header; CLIP keeps the next N_MERGES lines.
    pairs = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
    if len(pairs) != N_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{bpe_gz}: not a CLIP BPE merge list")
    return pairs  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bpe_gz", type=Path, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("out_dir", type=Path, help="folder for vocab.json and merges.txt")
    args = ap.parse_args()
    merges = read_merges(args.bpe_gz)
    vocab = build_vocab(merges)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (args.out_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out_dir}")


if __name__ == "__main__":
    main()
