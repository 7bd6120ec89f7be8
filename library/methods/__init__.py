"""Training methods: each module holds a script's root config (`CONFIG_CLASS`), its `Method` and `make_method(cfg)`.

A script is `run_script(CONFIG_CLASS, make_method, ...)` (library/training/run.py); no script imports another.
"""
