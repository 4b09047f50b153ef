"""lorakit's loss masks against TRL's ``SFTTrainer`` (trl 1.16), token for token, on the same examples:
prompt-completion data with ``completion_only_loss`` (SmolLM2's own template, a system turn included) and
multi-turn conversations with ``assistant_only_loss`` (ChatML with TRL's ``{% generation %}`` markers).
The slow test trains the task with both stacks and compares their held-out loss."""

from __future__ import annotations

import pytest
import torch
from chat_tokenizers import CHATML_GENERATION

from lorakit.chat import pad_batch, tokenize_conversation

pytest.importorskip("trl")

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ],
    [
        {"role": "user", "content": "Which book: In the beginning God created the heaven and the earth."},
        {"role": "assistant", "content": "Genesis"},
    ],  # fmt: skip
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a psalm."},
        {"role": "assistant", "content": "The twenty-third."},
    ],
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from lorakit.assets import require

    return AutoTokenizer.from_pretrained(str(require("smollm2-135m-instruct")))


def sft_trainer(tokenizer, records, tmp_path, **config):
    from datasets import Dataset
    from tiny_models import tiny_llama
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None, **config)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)


def test_trl_completion_only_labels_equal_lorakits(smol_tokenizer, tmp_path):
    single = [c for c in CONVERSATIONS if sum(t["role"] == "assistant" for t in c) == 1]
    records = [{"prompt": c[:-1], "completion": c[-1:]} for c in single]
    trainer = sft_trainer(smol_tokenizer, records, tmp_path, completion_only_loss=True)
    rows = list(trainer.train_dataset)
    for conversation, row in zip(single, rows):
        ids, labels = tokenize_conversation(smol_tokenizer, conversation)
        assert row["input_ids"] == ids
        assert row["labels"] == labels  # token for token, the answer's <|im_end|> and newline included
    # TRL's collator pads the batch as lorakit does: the same tensors
    batch = trainer.data_collator(rows)
    ours = pad_batch(*zip(*(tokenize_conversation(smol_tokenizer, c) for c in single)), smol_tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], ours[key]), key


def test_trl_assistant_only_labels_equal_lorakits_on_multi_turn(smol_tokenizer, tmp_path):
    tokenizer = smol_tokenizer.__class__.from_pretrained(smol_tokenizer.name_or_path)
    tokenizer.chat_template = CHATML_GENERATION
    trainer = sft_trainer(tokenizer, [{"messages": c} for c in CONVERSATIONS], tmp_path, assistant_only_loss=True)
    rows = list(trainer.train_dataset)
    for conversation, row in zip(CONVERSATIONS, rows):
        assert (row["input_ids"], row["labels"]) == tokenize_conversation(tokenizer, conversation)
    batch = trainer.data_collator(rows)
    ours = pad_batch(*zip(*(tokenize_conversation(tokenizer, c) for c in CONVERSATIONS)), tokenizer.pad_token_id)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], ours[key]), key
    assert int((ours["labels"] != -100).sum()) > 0


@pytest.mark.slow
@pytest.mark.model
def test_trl_sft_and_lorakit_end_within_2_percent_on_the_task(tmp_path):
    """The task of notebook 07 (its settings: 400 questions, 20 steps of 8, lr 1e-3, rank 8), trained by both
    stacks from the same start, on the same batches, in float32: lorakit's QLoRA (NF4, double quantization,
    LoRA on all projections, train_instruct) against TRL's SFTTrainer (completion_only_loss) on
    transformers + bitsandbytes' 4-bit Linear + peft's LoRA.

    Two of TRL's defaults are not float32: ``SFTConfig.bf16`` defaults to True (bfloat16 autocast, on a CPU
    too), and for a 4-bit model ``SFTTrainer`` stores the LoRA matrices in bfloat16 (QLoRA's recommendation),
    with no switch. With both, TRL ended at 0.2833 against lorakit's 0.2757 (2.7%), its step-1 loss already
    2e-3 off and its gradient norms rounded to bfloat16. So the run sets ``bf16=False`` and puts the matrices
    back in float32 before training, then copies lorakit's matrices in, so both start from the very same
    float32 values: the training losses then agree within 1e-4 at every step, and the held-out losses
    within 0.01% (0.27568 and 0.27569)."""
    from datasets import Dataset
    from tiny_models import copy_lora_into_peft
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig, SFTTrainer

    from lorakit.chat import length_grouped_batches, pad_id_of, tokenize_examples
    from lorakit.finetune import FinetuneConfig, build_model
    from lorakit.instruct import heldout_loss, train_instruct
    from lorakit.instruct_task import bible_book_task

    steps, batch_size, lr, seed = 20, 8, 1e-3, 0
    train, test = bible_book_task(n_test=200, n_train=400, seed=seed)
    torch.manual_seed(seed)
    ours, tokenizer = build_model(FinetuneConfig(method="qlora", rank=8, alpha=16), "cpu", torch.float32)
    theirs, _ = build_model(FinetuneConfig(method="qlora", backend="hf", rank=8, alpha=16), "cpu", torch.float32)
    train_data, test_data = tokenize_examples(tokenizer, train), tokenize_examples(tokenizer, test)
    pad = pad_id_of(tokenizer)

    # the same batches, in the same order: lorakit's first epoch plan, fed to TRL sequentially
    plan = length_grouped_batches([len(x) for x in train_data.input_ids], batch_size, seed=seed * 100_003)
    order = [i for batch in plan[:steps] for i in batch]
    records = [{"prompt": list(train_data.examples[i].prompt), "completion": [train_data.examples[i].messages[-1]]}
               for i in order]  # fmt: skip

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    # warmup 0: lorakit's warmup_cosine and transformers' cosine schedule are then the same function
    args = SFTConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=None, completion_only_loss=True,
        max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=seed, save_strategy="no",
        logging_steps=steps, dataloader_drop_last=False, bf16=False,
    )  # fmt: skip
    trainer = InOrder(model=theirs, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}  # SFTTrainer's cast of a 4-bit model's adapters
    for p in trainable:
        p.data = p.data.float()
    assert copy_lora_into_peft(ours, theirs) == 7 * 30  # the same starting A (and B = 0), in float32

    result = train_instruct(
        ours, train_data, pad, steps=steps, lr=lr, batch_size=batch_size, warmup_steps=0, seed=seed, progress=False
    )
    loss_ours = heldout_loss(ours, test_data, pad)
    trainer.train()
    theirs.eval()
    loss_theirs = heldout_loss(theirs, test_data, pad)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    print(f"mean training loss: lorakit {sum(result.losses) / steps:.4f}, TRL {logged[-1]['loss']:.4f}")
    print(f"held-out loss per answer token: lorakit {loss_ours:.4f}, TRL {loss_theirs:.4f}")
    assert abs(loss_ours / loss_theirs - 1) < 0.02
