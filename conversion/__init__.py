"""Checkpoint conversion on top of the library: add gates to a checkpoint (streaming, atomic), import and export the
fused gate layouts of other implementations, export to a native architecture, upload to the Hub; and the
``gated-patch-convert`` and ``gated-patch-push`` commands. The library never imports this package."""
