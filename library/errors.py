"""One exception type for every mistake a user can fix (bad config, bad file, bad data).

Scripts catch it at the top (see `library.cli.main_guard`) and print one clear line instead of a stack trace.
"""


class UserError(Exception):
    """A problem with the user's input. The message names the file, key or image and says what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or command-line option is wrong (unknown key, wrong type, conflicting options)."""


class ModelFileError(UserError):
    """A model, LoRA, embedding or hypernetwork file cannot be used (unsafe pickle, malformed, wrong family)."""


class DataError(UserError):
    """The dataset cannot be used (no images, unreadable caption file, ...)."""
