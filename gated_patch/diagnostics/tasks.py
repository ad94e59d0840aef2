"""Bigram-Backcopy: a synthetic task on which a one-layer transformer forms an attention sink in minutes.

From Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs".
Every sequence starts with a fixed BOS token; the next character follows a bigram chain estimated from real text,
except after a *trigger* character (one of the most frequent ones), where it copies the character before the
trigger. Only trigger queries need attention (to the previous token); elsewhere the head has nothing to do, and an
ungated softmax head parks its attention on BOS: the sink. Example::

    task = BigramBackcopy.from_text()
    batch = task.sample(32, 128, torch.Generator().manual_seed(0))
    model(input_ids=batch.input_ids, labels=batch.input_ids)
    batch.trigger_mask  # True at the queries whose next token is a copy
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch

from .measure import reference_prose


BOS_TOKEN_ID = 0


@dataclass(frozen=True)
class TaskBatch:
    input_ids: torch.Tensor  # [batch, seq_len], BOS at position 0
    trigger_mask: torch.Tensor  # [batch, seq_len] bool: the token there is a trigger (the next one is a copy)


@dataclass(frozen=True, eq=False)
class BigramBackcopy:
    """The task's alphabet, bigram transitions and triggers. Token 0 is BOS; token i >= 1 is ``alphabet[i - 1]``."""

    alphabet: str
    transitions: torch.Tensor  # [vocab, vocab]; row t: distribution of the token after t (row BOS: the first token)
    triggers: tuple[int, ...]

    @classmethod
    def from_text(cls, text: Optional[str] = None, num_triggers: int = 3) -> "BigramBackcopy":
        """Estimate the chain from `text` (default: Python's reference prose in `pydoc_data.topics`); the
        `num_triggers` most frequent characters become the triggers."""
        text = reference_prose() if text is None else text
        counts = Counter(text)
        if len(counts) <= num_triggers:
            raise ValueError(
                f"The text has {len(counts)} distinct characters; the task needs more than num_triggers={num_triggers} "
                "of them. Pass a longer text or fewer triggers."
            )
        alphabet = "".join(sorted(counts))
        index = {char: i + 1 for i, char in enumerate(alphabet)}
        ids = torch.tensor([index[char] for char in text])
        vocab = len(alphabet) + 1
        pair_counts = torch.zeros(vocab * vocab, dtype=torch.float64)
        pair_counts.index_add_(0, ids[:-1] * vocab + ids[1:], torch.ones(len(ids) - 1, dtype=torch.float64))
        pair_counts = pair_counts.view(vocab, vocab)
        triggers = tuple(index[char] for char, _ in counts.most_common(num_triggers))
        # After BOS comes a non-trigger character, drawn by frequency (a trigger there would have nothing to copy).
        first = torch.bincount(ids, minlength=vocab).double()
        first[list(triggers)] = 0
        pair_counts[BOS_TOKEN_ID] = first
        empty = pair_counts.sum(dim=1) == 0  # a character seen only at the very end: continue uniformly
        pair_counts[empty, 1:] = 1.0
        transitions = (pair_counts / pair_counts.sum(dim=1, keepdim=True)).float()
        return cls(alphabet=alphabet, transitions=transitions, triggers=triggers)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1

    def is_trigger(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, torch.tensor(self.triggers, device=input_ids.device))

    def sample(self, batch_size: int, seq_len: int, generator: Optional[torch.Generator] = None) -> TaskBatch:
        """Fresh sequences of `seq_len` tokens: BOS, then the chain with backcopy after every trigger."""
        if seq_len < 3:
            raise ValueError(f"seq_len must be at least 3 (BOS, a character, a trigger's copy); got {seq_len}.")
        cumulative = self.transitions.cumsum(dim=1)
        cumulative[:, -1] = 1.0  # no draw can fall past the last token through rounding
        uniform = torch.rand(seq_len, batch_size, 1, generator=generator)
        triggers = torch.tensor(self.triggers)
        ids = torch.empty(batch_size, seq_len, dtype=torch.long)
        ids[:, 0] = BOS_TOKEN_ID
        for t in range(1, seq_len):
            drawn = torch.searchsorted(cumulative[ids[:, t - 1]], uniform[t], right=True).squeeze(1)
            copy = torch.isin(ids[:, t - 1], triggers) & (t >= 2)
            ids[:, t] = torch.where(copy, ids[:, t - 2], drawn)
        return TaskBatch(input_ids=ids, trigger_mask=self.is_trigger(ids))

    def decode(self, input_ids) -> str:
        return "".join("^" if int(i) == BOS_TOKEN_ID else self.alphabet[int(i) - 1] for i in input_ids)
