"""Every transformers causal-LM family, on a tiny model: gated with no registration where its attention fits (and
then checked end to end), refused with a reason where it does not, never silently wrong. The table in
docs/families.md is what `benchmarks/family_coverage.py` wrote; a family it lists as supported must stay supported."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import family_coverage  # noqa: E402


def documented_supported() -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \| supported \|", family_coverage.DOC.read_text(), re.MULTILINE))


@pytest.fixture(scope="module")
def rows():
    return {row["model_type"]: row for row in family_coverage.run(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                                                                  progress=False)}


@pytest.mark.slow  # every family: a few minutes
def test_no_family_is_silently_wrong(rows):
    wrong = {name: row["detail"] for name, row in rows.items() if row["outcome"] == "wrong"}
    assert wrong == {}


@pytest.mark.slow
def test_documented_families_stay_supported(rows):
    supported = {name for name, row in rows.items() if row["outcome"] == "supported"}
    assert len(supported) >= 105
    assert documented_supported() - supported == set()  # a family the docs promise broke
    assert documented_supported() >= {"llama", "qwen2", "mistral", "qwen3", "mixtral", "gemma", "olmo2", "granite"}


@pytest.mark.slow
def test_the_families_attention_sink_research_uses_are_supported(rows):
    """GPT-2, Pythia, Falcon, multi-head latent attention and hybrids: every check of a supported family passed."""
    research = ("gpt2", "gpt_neox", "falcon", "deepseek_v2", "deepseek_v3", "jamba", "bamba", "granitemoehybrid",
                "nemotron_h", "minimax")
    assert {name: rows[name]["outcome"] for name in research} == {name: "supported" for name in research}
    assert all(check["passed"] for name in research for check in rows[name]["checks"].values())
    assert set(rows["jamba"]["checks"]) == set(family_coverage.CHECKS)


@pytest.mark.slow
def test_refusals_name_the_reason(rows):
    refused = {name: row["detail"] for name, row in rows.items() if row["outcome"] == "refused"}
    assert "native output gate" in refused["qwen3_next"]  # a hybrid whose softmax attention has its own gate
    assert "native output gate" in refused["laguna"] and "native output gate" in refused["afmoe"]
    assert "cross-attention" in refused["bart"]
    assert "shared by several layers" in refused["zamba2"]
    assert "not the config's" in refused["deepseek_v4"]  # a low-rank output projection: not per head
    # every refusal says what it could not gate, for which model type, and why
    assert all(re.match(r"Cannot gate \S+.*model_type '[^']+'\)?: .{20,}", detail) for detail in refused.values())


def table_transformers() -> str:
    return re.search(r"\(transformers (\S+), torch", family_coverage.DOC.read_text()).group(1)


def test_the_table_covers_the_transformers_it_records():
    """The table's rows are every causal-LM type of the transformers release it names (the results JSON holds that
    release's list); against that release itself, its mapping. A newer release adds rows only when the table is
    regenerated (MAINTAINING.md), so a release cannot turn this test red on its own."""
    documented = set(re.findall(r"^\| `([^`]+)` \|", family_coverage.DOC.read_text(), re.MULTILINE))
    recorded = json.loads(family_coverage.RESULTS.read_text())
    assert recorded["transformers"] == table_transformers()
    assert documented == {row["model_type"] for row in recorded["rows"]}
    if transformers.__version__ == table_transformers():
        assert documented == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_the_table_is_for_the_locked_or_the_installed_transformers():
    """Under the locks (make test) the table is the locked release's; building from the newest releases
    (make test-latest) it may already be regenerated for the new one. `make lock` refuses a table that is not."""
    locked = re.search(r"^transformers==(\S+)$", (ROOT / "locks" / "main.txt").read_text(), re.MULTILINE).group(1)
    assert table_transformers() in {locked, transformers.__version__}
