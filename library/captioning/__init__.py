"""Automatic captions for an image folder (caption_images.py): natural-language captioners through transformers
(text.py), WD14-style taggers through onnxruntime (tagger.py), the sidecar files and the resume rule (files.py),
the run itself (run.py)."""
