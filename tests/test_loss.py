"""lorakit.loss: the chunked next-token loss has transformers' bits, in the loss and in every gradient."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from lorakit import loss as chunked
from lorakit.loss import causal_lm_loss, use_chunked_loss
from tests.tiny_models import tiny_llama


def _both(dtype, labels, vocab=300, **kwargs):
    """(loss, grad) from transformers' loss and from lorakit's, on the same logits."""
    gen = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(*labels.shape, vocab, generator=gen)).to(dtype)
    results = []
    for fn in (ForCausalLMLoss, causal_lm_loss):
        logits = base.clone().requires_grad_()
        loss = fn(logits, labels, vocab, **kwargs)
        (2.5 * loss).backward()  # a gradient other than 1 reaches the loss
        results.append((loss.detach(), logits.grad))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 32, 1000])  # chunks of one row, uneven chunks, one chunk
def test_loss_and_gradient_are_bit_identical_to_transformers(monkeypatch, dtype, rows):
    monkeypatch.setattr(chunked, "CHUNK_ROWS", rows)
    labels = torch.randint(0, 300, (3, 25), generator=torch.Generator().manual_seed(1))
    labels[0, :5] = -100  # a masked prompt
    labels[2, -3:] = -100  # padding
    (ref_loss, ref_grad), (loss, grad) = _both(dtype, labels)
    assert loss.dtype == ref_loss.dtype == torch.float32
    assert torch.equal(loss, ref_loss), (loss.item(), ref_loss.item())
    assert grad.dtype == dtype
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("num_items", [torch.tensor(40), 40])
def test_num_items_in_batch_and_shift_labels_follow_transformers(num_items):
    labels = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(2))
    shifted = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(3))
    shifted[1, 10:] = -100
    for kwargs in ({"num_items_in_batch": num_items}, {"shift_labels": shifted}, {"ignore_index": 7}):
        (ref_loss, ref_grad), (loss, grad) = _both(torch.float32, labels, **kwargs)
        assert torch.equal(loss, ref_loss), kwargs
        assert torch.equal(grad, ref_grad), kwargs


def test_every_target_ignored_gives_nan_as_transformers():
    labels = torch.full((2, 6), -100)
    (ref_loss, _), (loss, grad) = _both(torch.float32, labels)
    assert torch.isnan(ref_loss) and torch.isnan(loss)


def test_a_target_outside_the_vocabulary_raises():
    logits = torch.randn(1, 4, 10, requires_grad=True)
    with pytest.raises((IndexError, RuntimeError)):
        causal_lm_loss(logits, torch.tensor([[1, 2, 10, 3]]), 10)


def test_a_model_with_it_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    grads = []
    for install in (False, True):
        model = tiny_llama(eval_mode=False)
        if install:
            assert use_chunked_loss(model) is model
            assert model.loss_function is causal_lm_loss
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), [p.grad for p in model.parameters()]))
    (ref_loss, ref_grads), (loss, model_grads) = grads
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, model_grads))


def test_use_chunked_loss_leaves_other_losses_alone():
    model = tiny_llama()
    other = lambda *args, **kwargs: torch.tensor(0.0)  # noqa: E731
    model.loss_function = other
    use_chunked_loss(model)
    assert model.loss_function is other
    assert use_chunked_loss(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear  # not a transformers model


def test_load_base_model_installs_it(smollm2):
    model, _ = smollm2
    assert model.loss_function is causal_lm_loss
