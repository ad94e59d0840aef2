"""The Bigram-Backcopy task: its rule, its statistics (against counts taken here from the text) and its errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from gated_patch.diagnostics import BOS_TOKEN_ID, BigramBackcopy, reference_prose

TEXT = "the cat sat on the mat; a bat ate the hat, then the rat sat at ten.\n" * 20


@pytest.fixture(scope="module")
def task():
    return BigramBackcopy.from_text(TEXT)


def test_triggers_are_the_most_frequent_characters(task):
    counts = Counter(TEXT)
    expected = {char for char, _ in counts.most_common(3)}
    assert {task.alphabet[t - 1] for t in task.triggers} == expected
    assert task.vocab_size == len(counts) + 1


def test_every_sequence_follows_the_rule(task):
    batch = task.sample(64, 40, torch.Generator().manual_seed(0))
    ids = batch.input_ids
    assert ids.shape == (64, 40)
    assert (ids[:, 0] == BOS_TOKEN_ID).all() and (ids[:, 1:] != BOS_TOKEN_ID).all()
    triggers = {task.alphabet.index(c) + 1 for c, _ in Counter(TEXT).most_common(3)}
    assert not any(int(t) in triggers for t in ids[:, 1])  # after BOS comes a character that has one to copy
    copies = 0
    for row in ids.tolist():
        for t in range(2, len(row)):
            if row[t - 1] in triggers:
                assert row[t] == row[t - 2]
                copies += 1
    assert copies > 100
    assert torch.equal(batch.trigger_mask, torch.tensor([[i in triggers for i in row] for row in ids.tolist()]))


def test_other_positions_follow_the_text_bigrams(task):
    """At positions that are not copies, the next character is drawn from the text's bigram frequencies."""
    ids = task.sample(2000, 30, torch.Generator().manual_seed(1)).input_ids
    pairs = Counter(zip(TEXT, TEXT[1:]))
    for previous in "he":  # not triggers in TEXT (those are " ", "t", "a"); frequent enough to test
        token = task.alphabet.index(previous) + 1
        after = ids[:, 2:][ids[:, 1:-1] == token]
        drawn = Counter(task.decode(after))
        total = sum(n for (a, _), n in pairs.items() if a == previous)
        for char, n in pairs.items():
            if char[0] == previous:
                assert drawn[char[1]] / len(after) == pytest.approx(n / total, abs=0.03)
        assert set(drawn) <= {b for a, b in pairs if a == previous}


def test_sampling_is_reproducible_and_fresh(task):
    first = task.sample(4, 20, torch.Generator().manual_seed(3)).input_ids
    again = task.sample(4, 20, torch.Generator().manual_seed(3)).input_ids
    other = task.sample(4, 20, torch.Generator().manual_seed(4)).input_ids
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_default_text_is_the_reference_prose():
    task = BigramBackcopy.from_text()
    assert [task.alphabet[t - 1] for t in task.triggers] == [c for c, _ in Counter(reference_prose()).most_common(3)]


def test_bad_arguments_are_refused(task):
    with pytest.raises(ValueError, match="distinct characters"):
        BigramBackcopy.from_text("abab")
    with pytest.raises(ValueError, match="seq_len must be at least 3"):
        task.sample(2, 2)
