"""Command-line conversion scripts: ``gated-patch-convert`` and ``gated-patch-push`` (library code lives in
``gated_patch.checkpoints``)."""
