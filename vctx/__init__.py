"""vctx: security contexts (guests) on a stock Linux kernel."""

__version__ = "0.1.0"
