"""Optimizer parameter groups that give the attention gates their own learning rate and weight decay.

Retrofitted gates start at identity; a learning rate of their own, larger than the model's, and no weight decay
(which would pull the gate weights, not the scores, towards zero) let them move further. The groups work with any
torch optimizer, the transformers `Trainer` and PEFT models::

    groups = gate_param_groups(model, lr=1e-4, gate_lr=3e-3, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
"""

from __future__ import annotations

from torch import nn

from ..core.gate import GATE_MODULE_NAME
from ..core.errors import NotPatchedError
from ..gating import gate_parameter_names


def gate_param_groups(model: nn.Module, *, lr: float, gate_lr: float, weight_decay: float = 0.0,
                      gate_weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer groups over `model`'s trainable parameters: the gates' (`gate_lr`, `gate_weight_decay`) and
    everything else (`lr`, `weight_decay`). The second group is left out when only gates train (a gate-only PEFT
    model). Every trainable parameter is in exactly one group; frozen ones are in none. Unlike Trainer's default
    optimizer, `weight_decay` applies to every non-gate parameter, biases and norm weights included: split that
    group further if your recipe exempts them."""
    gate_names = set(gate_parameter_names(model))  # PEFT's copies and adapters of a gate count as the gate's
    gates, others = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (gates if name in gate_names else others).append(parameter)
    if not gates:
        raise NotPatchedError(
            f"{type(model).__name__} has no trainable gate parameter (no trainable parameter under a module named "
            f"{GATE_MODULE_NAME!r}). Patch it first (gated_patch.patch_model) and leave the gates trainable, or wrap "
            "it with a gate-training PEFT config (gated_patch.adapters.gate_only_config)."
        )
    groups = [{"params": gates, "lr": gate_lr, "weight_decay": gate_weight_decay}]
    if others:
        groups.insert(0, {"params": others, "lr": lr, "weight_decay": weight_decay})
    return groups
