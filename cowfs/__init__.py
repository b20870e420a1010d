"""cowfs: copy-on-write template filesystem (Linux-VServer's unification, on FUSE)."""

__version__ = "0.1.0"
