"""weft: an encrypted mesh overlay network for containers."""

__version__ = "0.1.0"
