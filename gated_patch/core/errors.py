"""Exceptions raised by gated_patch. Each message says what is wrong and how to fix it."""


class GatedPatchError(Exception):
    """Base class of every gated_patch error."""


class GateConfigError(GatedPatchError, ValueError):
    """An invalid `GateConfig` value or a gate config that does not fit the model."""


class UnsupportedModelError(GatedPatchError, ValueError):
    """The model's `config.model_type` has no registry entry."""


class UpstreamStructureError(GatedPatchError, RuntimeError):
    """The transformers code the plugin hooks into does not have the structure it relies on."""


class AlreadyPatchedError(GatedPatchError, ValueError):
    """`patch_model` was called with a different config on a model that is already patched."""


class NotPatchedError(GatedPatchError, ValueError):
    """An operation that needs a patched model got an unpatched one."""


class GatedCheckpointError(GatedPatchError, ValueError):
    """A gated checkpoint that cannot be saved, loaded or converted faithfully (e.g. gate tensors missing)."""
