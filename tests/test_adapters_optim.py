"""`gate_param_groups`: the gates get their own learning rate and weight decay, in plain loops, PEFT and Trainer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import gated_patch
from gated_patch.adapters import GATE_ONLY_ROUTES, gate_param_groups, gates_and_lora_config


def patched():
    return gated_patch.patch_model(tiny_model("llama"), gated_patch.GateConfig(init="paper"))


def ids_of(parameters) -> set[int]:
    return {id(p) for p in parameters}


def test_plain_model_two_groups_partition_the_trainable_parameters():
    model = patched()
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = gate_param_groups(model, lr=1e-4, gate_lr=3e-3, weight_decay=0.1)
    others, gates = groups
    assert (others["lr"], others["weight_decay"], gates["lr"], gates["weight_decay"]) == (1e-4, 0.1, 3e-3, 0.0)
    assert ids_of(gates["params"]) == ids_of(p for _, p in gated_patch.gate_parameters(model))
    trainable = ids_of(p for p in model.parameters() if p.requires_grad)
    assert ids_of(gates["params"]) | ids_of(others["params"]) == trainable
    assert not ids_of(gates["params"]) & ids_of(others["params"])
    assert id(model.model.embed_tokens.weight) not in trainable


@pytest.mark.parametrize("route", GATE_ONLY_ROUTES)
def test_gate_only_peft_model_has_one_group_of_its_trainable_copies(route):
    peft_model = gated_patch.get_gated_peft_model(patched(), gated_patch.gate_only_config(route=route))
    (gates,) = gate_param_groups(peft_model, lr=1e-4, gate_lr=1e-2)
    assert ids_of(gates["params"]) == ids_of(p for p in peft_model.parameters() if p.requires_grad)
    assert len(gates["params"]) == 2 * 3  # weight and bias of the 3 layers' trainable gate copies


def test_lora_parameters_go_with_the_others():
    peft_model = gated_patch.get_gated_peft_model(patched(), gates_and_lora_config(target_modules=["q_proj"]))
    others, gates = gate_param_groups(peft_model, lr=1e-4, gate_lr=1e-2)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert all("lora_" in names[id(p)] for p in others["params"]) and others["params"]
    assert all(".attn_gate." in names[id(p)] for p in gates["params"])


def test_model_without_trainable_gates_is_refused():
    with pytest.raises(gated_patch.NotPatchedError, match="no trainable gate parameter"):
        gate_param_groups(tiny_model("llama"), lr=1e-4, gate_lr=1e-3)
    model = patched()
    for _, parameter in gated_patch.gate_parameters(model):
        parameter.requires_grad_(False)
    with pytest.raises(gated_patch.NotPatchedError, match="leave the gates trainable"):
        gate_param_groups(model, lr=1e-4, gate_lr=1e-3)


class Tokens(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        ids = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("frozen", ["others", "gates"])
def test_trainer_uses_each_groups_learning_rate(tmp_path, frozen):
    """A learning rate of 0 on one group leaves exactly that group's parameters unchanged under Trainer."""
    model = patched()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lrs = {"lr": 0.0, "gate_lr": 1e-2} if frozen == "others" else {"lr": 1e-2, "gate_lr": 0.0}
    optimizer = torch.optim.AdamW(gate_param_groups(model, **lrs))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, None)).train()
    gate_names = {name for name, _ in gated_patch.gate_parameters(model)}
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == (gate_names if frozen == "others" else trainable - gate_names)
