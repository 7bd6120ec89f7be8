"""Stacking samples into the batch dict that library/data/loader.py documents, for the training loader and the
validation batches (library/data/holdout.py) alike; its own module so neither imports the other for it."""

from __future__ import annotations

import torch


class Collate:
    """Stack samples into the batch dict (a class, so DataLoader workers can pickle it)."""

    def __init__(self, use_masks: bool):
        self.use_masks = use_masks

    def __call__(self, samples: list[dict]) -> dict:
        image_key = "latents" if "latents" in samples[0] else "pixels"
        batch = {
            image_key: torch.stack([s[image_key] for s in samples]),
            "captions": [s["caption"] for s in samples],
            "original_sizes": torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
            "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
            "target_sizes": torch.tensor([s["target_size"] for s in samples], dtype=torch.long),
            "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
            "is_reg": torch.tensor([s["is_reg"] for s in samples], dtype=torch.bool),
            "masks": None,
        }
        if self.use_masks:
            h, w = batch[image_key].shape[-2:]
            if image_key == "pixels":
                h, w = h // 8, w // 8
            batch["masks"] = torch.stack([s["mask"] if s["mask"] is not None else torch.ones(1, h, w) for s in samples])
        return batch
