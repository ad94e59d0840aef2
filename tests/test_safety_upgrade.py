"""Upgrade safety: a transformers whose attention code changed shape, or a version outside the supported range, gives
a clear error and leaves the model untouched; never a silently ungated or wrongly gated model."""

from __future__ import annotations

import configparser
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import randomize_gates, tiny_model
from torch import nn
from transformers.models.llama import modeling_llama

import gated_patch
import transformers
from gated_patch import UpstreamStructureError, guards, is_patched, patch_model
from gated_patch.core import versions

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17, 3, 4, 5, 6, 7]])


@pytest.fixture
def fresh_structure_cache():
    caches = (guards.forward_calls_projection_once, guards.forward_source, guards.projection_calls)
    for cached in caches:
        cached.cache_clear()
    yield
    for cached in caches:
        cached.cache_clear()


def _forward_variant(old: str, new: str, directory: Path):
    """LlamaAttention.forward with one source edit, compiled in the upstream module's namespace from a real file (as a
    changed transformers release would ship it, so `inspect.getsource` reads the changed code)."""
    import inspect

    source = textwrap.dedent(inspect.getsource(modeling_llama.LlamaAttention.forward))
    assert old in source, "the upstream forward no longer contains the line this test edits; update the test"
    path = directory / "changed_modeling_llama.py"
    path.write_text(source.replace(old, new))
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), vars(modeling_llama).copy(), namespace)
    return namespace["forward"]


def _assert_refused_untouched(model, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    with pytest.raises(UpstreamStructureError, match=match) as info:
        patch_model(model)
    message = str(info.value)
    assert "LlamaAttention" in message and "transformers>=" in message  # what broke and how to fix it
    assert not is_patched(model) and [type(m) for m in model.modules()] == classes
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "attn_output_gate")
    return message


@pytest.mark.parametrize(
    "old, new, match",
    [
        # the output projection applied through its weight: a pre-hook on o_proj would never see the call
        ("attn_output = self.o_proj(attn_output)",
         "attn_output = torch.nn.functional.linear(attn_output, self.o_proj.weight, self.o_proj.bias)",
         r"calls self\.o_proj\(\.\.\.\) 0 times"),
        # projection called twice (e.g. a new residual path): which call to gate is ambiguous
        ("attn_output = self.o_proj(attn_output)",
         "attn_output = self.o_proj(attn_output) + 0 * self.o_proj(attn_output)",
         r"calls self\.o_proj\(\.\.\.\) 2 times"),
    ],
    ids=["o_proj-bypassed", "o_proj-twice"],
)
def test_changed_attention_forward_is_refused(monkeypatch, fresh_structure_cache, tmp_path, old, new, match):
    model = tiny_model("llama")
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", _forward_variant(old, new, tmp_path))
    _assert_refused_untouched(model, match)


def test_changed_forward_signature_is_refused(monkeypatch, fresh_structure_cache, tmp_path):
    model = tiny_model("llama")
    variant = _forward_variant("hidden_states: torch.Tensor,", "x: torch.Tensor, hidden_states: torch.Tensor = None,",
                               tmp_path)
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", variant)
    _assert_refused_untouched(model, r"forward takes \['self', 'x'\] first")


def test_output_projection_that_is_not_linear_is_refused(fresh_structure_cache):
    model = tiny_model("llama")

    class FusedOutput(nn.Module):  # e.g. a future fused/quantised projection module
        def __init__(self, linear):
            super().__init__()
            self.inner = linear

        def forward(self, x):
            return self.inner(x)

    attention = model.model.layers[1].self_attn
    attention.o_proj = FusedOutput(attention.o_proj)
    _assert_refused_untouched(model, r"no nn\.Linear or Conv1D named 'o_proj'")


def test_an_output_projection_that_does_not_take_every_head_is_refused(fresh_structure_cache):
    """A low-rank or otherwise transformed output projection: the gate could not act per head on its input."""
    model = tiny_model("llama")
    model.model.layers[2].self_attn.o_proj = nn.Linear(32, model.config.hidden_size)
    _assert_refused_untouched(model, r"o_proj takes 32 features, not the config's 4 heads x 16 = 64")


def _gated_reference():
    reference = tiny_model("llama")
    patch_model(reference)
    randomize_gates(reference)
    return reference(IDS).logits


@torch.no_grad()
def test_instance_level_forward_wrapper_does_not_bypass_the_gate(fresh_structure_cache):
    """A forward stored on the instance (a user's wrapper, accelerate's hook, the stale bound method transformers 5.0
    and 5.1 left behind after output_attentions=True) runs inside the module call, where the gate's hooks run."""
    model = tiny_model("llama")
    ungated = model(IDS).logits
    wrapped = model.model.layers[0].self_attn
    original = wrapped.forward
    wrapped.forward = lambda *args, **kwargs: original(*args, **kwargs)
    for layer in model.model.layers[1:]:
        layer.self_attn.forward = layer.self_attn.forward
    patch_model(model)
    randomize_gates(model)
    gated = model(IDS).logits
    assert (gated - ungated).abs().max() > 1e-3 and torch.equal(gated, _gated_reference())


@torch.no_grad()
def test_output_attentions_before_patching_does_not_bypass_the_gate():
    model = tiny_model("llama", attn_implementation="eager")
    model(IDS, output_attentions=True)
    patch_model(model)
    randomize_gates(model)
    gated = model(IDS, output_attentions=True)
    assert gated.attentions is not None and len(gated.attentions) == 3
    assert torch.equal(_gated_reference(), gated.logits)


@pytest.mark.parametrize("version", ["4.57.6", "6.0.0", "7.1.0"])
def test_unsupported_transformers_version_is_refused(monkeypatch, version):
    model = tiny_model("llama")
    # transformers 5.x can replace its own sys.modules entry while it imports lazily: set the version on every object
    for module in {id(m): m for m in (transformers, versions.transformers, sys.modules["transformers"])}.values():
        monkeypatch.setattr(module, "__version__", version)
    with pytest.raises(UpstreamStructureError, match=rf"transformers {re.escape(version)} is installed") as info:
        patch_model(model)
    assert "pip install 'transformers>=" in str(info.value)
    assert not is_patched(model)


def test_supported_range_is_stated_consistently():
    """setup.cfg's requirement and the runtime check name the same range; the installed version is in it."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requirement = next(line.strip() for line in parser["options"]["install_requires"].splitlines()
                       if line.strip().startswith("transformers"))
    assert requirement == f"transformers>={versions.MIN_TRANSFORMERS},<{versions.MAX_TRANSFORMERS}"
    versions.check_transformers_version()  # the installed (newest tested) version is inside the range
    oldest = (ROOT / ".ci" / "oldest-transformers").read_text()
    assert "MIN_TRANSFORMERS" in oldest  # the CI step tests exactly the stated minimum
    assert gated_patch.__version__


# ------------------------------------------------------------------------------------------------------------- PEFT
@pytest.fixture
def fresh_peft_check():
    from gated_patch.adapters import peft_api

    peft_api.check_peft.cache_clear()
    yield peft_api
    peft_api.check_peft.cache_clear()


def test_peft_range_is_stated_consistently(fresh_peft_check):
    """setup.cfg, the runtime check and the oldest suite name the same PEFT range; the installed PEFT passes."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requirement = next(line.strip() for line in parser["options"]["install_requires"].splitlines()
                       if line.strip().startswith("peft"))
    low, high = fresh_peft_check.MIN_PEFT, fresh_peft_check.MAX_PEFT
    assert requirement == f"peft>={'.'.join(low.split('.')[:2])},<{'.'.join(high.split('.')[:2])}"
    fresh_peft_check.check_peft()
    assert "MIN_PEFT" in (ROOT / ".ci" / "oldest-transformers").read_text()


@pytest.mark.parametrize("version", ["0.20.3", "1.0.0"])
def test_peft_outside_the_range_is_refused_before_any_adapter_is_made(fresh_peft_check, monkeypatch, version):
    import peft

    monkeypatch.setattr(peft, "__version__", version)
    model = patch_model(tiny_model("llama"))
    for call in (gated_patch.gate_only_config, lambda: gated_patch.get_gated_peft_model(model, None)):
        with pytest.raises(UpstreamStructureError, match=rf"supports peft>=0\.21\.0,<1\.0\.0; peft {version} is installed"):
            call()
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize("internal", ["LNTuningLayer", "ModulesToSaveWrapper", "DUMMY_TARGET_MODULES", "peft_config",
                                      "is_main_process"])
def test_a_moved_peft_internal_is_refused_naming_it(fresh_peft_check, monkeypatch, internal):
    """A PEFT release that renamed or changed an internal the recipes use: refused, naming it and the fix."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if internal == "peft_config":  # BaseTuner.__init__ no longer hands the configs to the model
        monkeypatch.setattr(BaseTuner, "__init__", lambda self, model, peft_config, adapter_name="default": None)
    elif internal == "is_main_process":
        monkeypatch.setattr(PeftModel, "save_pretrained", lambda self, save_directory, **kwargs: None)
    else:
        monkeypatch.setattr(fresh_peft_check, internal, None)
    with pytest.raises(UpstreamStructureError, match=rf"lacks what gated_patch's gate recipes rely on: .*{internal}") as info:
        gated_patch.gate_only_config()
    assert "pip install 'peft>=0.21.0,<1.0.0'" in str(info.value)
