"""User-facing errors.  Every one of them is printed by the CLI as a single line and exits non-zero."""


class BlockFFNError(Exception):
    """Base class: bad input the user can fix (the message says how)."""


class ConfigError(BlockFFNError):
    """A malformed or self-contradicting model config."""


class CheckpointError(BlockFFNError):
    """A checkpoint whose tensors are missing, extra, mis-shaped, corrupt or in a refused format."""


class DataError(BlockFFNError):
    """Training / evaluation data that cannot be read or is too small."""
