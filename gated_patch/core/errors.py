"""Exceptions of gated_patch. Each message says what is wrong and how to fix it."""


class GatedPatchError(Exception):
    """Base class of every gated_patch error."""


class GateConfigError(GatedPatchError, ValueError):
    """An invalid gate config, or one that does not fit the model."""


class UnsupportedModelError(GatedPatchError, ValueError):
    """A model whose family gated_patch cannot gate."""


class UpstreamStructureError(GatedPatchError, RuntimeError):
    """The transformers code the gate hooks into lacks the structure it relies on."""


class AlreadyPatchedError(GatedPatchError, ValueError):
    """`patch_model` with a different gate config on a patched model."""


class NotPatchedError(GatedPatchError, ValueError):
    """An operation that needs a patched model got an unpatched one."""


class GatedCheckpointError(GatedPatchError, ValueError):
    """A gated checkpoint that cannot be saved, loaded or converted faithfully."""
