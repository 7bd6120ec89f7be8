"""The SD3 / SD3.5 family (MMDiT, 16-channel VAE, CLIP-L + CLIP-G + optional T5-XXL) on the shared engine.

Only what differs from the UNet families lives here: tiny models (tiny.py), key maps of the released single files
(keymaps.py), loading and saving (load.py, save.py), text conditioning (text.py) and the denoiser call (forward.py).
The family's facts are a table entry in library/models/families.py.
"""
