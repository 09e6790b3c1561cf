"""sppkit.usecases — what SPP is for, each a library API, a CLI command and a demo part."""

from .checkpoint import checkpoint_guest, open_checkpoint_set, restore_checkpoint  # noqa: F401
