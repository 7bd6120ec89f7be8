"""sdtk: the shared library behind the training and merge scripts.

Heavy packages (torch, diffusers, transformers) are imported by the submodules that need them, never here, so that
`--help` and config errors answer quickly.
"""
