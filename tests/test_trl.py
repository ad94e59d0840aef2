"""TRL: ``SFTTrainer(model=patched_model, peft_config=gate_only_config())`` trains only the gates, and the adapter it
saves loads back with ``load_gated_adapter(base, dir)`` alone (TRL calls PEFT's ``get_peft_model`` itself)."""

from __future__ import annotations

import torch
from conftest import randomize_gates, tiny_model
from datasets import Dataset
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

import gated_patch
from gated_patch import GateConfig


def char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids fit a tiny model's vocabulary (0 pad, 1 bos, 2 eos, 3 unknown)."""
    characters = sorted({c for text in topics.values() for c in text})[: vocab_size - 4]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(characters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_sft_trainer_trains_only_the_gates_and_the_adapter_loads_back(tmp_path):
    model = gated_patch.patch_model(tiny_model("llama"), GateConfig(granularity="headwise"))
    randomize_gates(model, std=0.1)
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    texts = [text[:200] for text in list(topics.values())[:64]]
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
                       max_length=64, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                       bf16=False),  # fp32: accelerate would keep the trained model's forward under bf16 autocast
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=char_tokenizer(97),
        peft_config=gated_patch.gate_only_config(),
    )
    trainable = sorted(name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad)
    assert trainable and all(".attn_gate." in name for name in trainable), trainable
    assert len(trainable) == 2 * 3  # weight and bias of the gate of each of the 3 layers
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    trained = trainer.model.eval()
    changed = [name for name, parameter in trained.named_parameters() if parameter.requires_grad]
    moved = [name for name in changed if not torch.equal(
        trained.get_parameter(name).detach(), base_state[name.replace("base_model.model.", "").replace(
            "ln_tuning_layers.default.", "")])]
    assert moved == changed  # every gate moved ...
    frozen_base = {name: tensor for name, tensor in trained.get_base_model().state_dict().items() if "attn_gate" not in name}
    assert all(torch.equal(tensor, base_state[name]) for name, tensor in frozen_base.items())  # ... and nothing else

    loaded = gated_patch.load_gated_adapter(tiny_model("llama"), tmp_path / "adapter")
    ids = torch.randint(4, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)


def test_reward_model_from_a_gated_causal_lm_trains_saves_and_loads_back(tmp_path):
    """TRL's reward training starts from a causal LM checkpoint: RewardTrainer loads it as a sequence classifier
    (AutoModelForSequenceClassification, with the plugin: gated), trains, saves; the saved reward model loads back
    gated, with and without the plugin, and scores as the trained one does."""
    import json
    import textwrap

    from test_checkpoints_remote import BLOCK_GATED_PATCH, _run
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = gated_patch.patch_model(tiny_model("llama"), GateConfig(granularity="headwise"))
    randomize_gates(model, std=0.1)
    model.save_pretrained(tmp_path / "causal_lm")
    texts = [text[:40] for text in list(topics.values())[:32]]
    pairs = Dataset.from_dict({"chosen": texts[::2], "rejected": texts[1::2]})
    trainer = RewardTrainer(
        model=str(tmp_path / "causal_lm"),
        args=RewardConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                          max_length=48, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                          bf16=False, model_init_kwargs={"attn_implementation": "eager"}),
        train_dataset=pairs,
        processing_class=char_tokenizer(97),
    )
    assert gated_patch.is_patched(trainer.model) and type(trainer.model).__name__ == "GatedLlamaForSequenceClassification"
    before = {name: tensor.detach().clone() for name, tensor in gated_patch.gate_parameters(trainer.model)}
    trainer.train()
    trainer.save_model(str(tmp_path / "reward"))
    trained = trainer.model.eval()
    moved = [name for name, tensor in gated_patch.gate_parameters(trained) if not torch.equal(tensor, before[name])]
    assert len(moved) == len(before)  # the gates trained with the rest
    ids = torch.randint(4, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = trained(ids).logits
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward", attn_implementation="eager")
        assert gated_patch.is_patched(loaded) and torch.equal(loaded.eval()(ids).logits, scores)
    script = BLOCK_GATED_PATCH + textwrap.dedent("""
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True,
                                                                   attn_implementation="eager").eval()
        with torch.no_grad():
            torch.save(model(torch.tensor(json.loads(sys.argv[2]))).logits, sys.argv[3])
        """)
    _run(tmp_path, script, str(tmp_path / "reward"), json.dumps(ids.tolist()), str(tmp_path / "remote.pt"))
    assert (torch.load(tmp_path / "remote.pt") - scores).abs().max() <= 1e-6
