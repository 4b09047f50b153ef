"""The next-token loss over a large vocabulary, computed a few rows at a time: the same numbers, less work.

transformers' ``ForCausalLMLoss`` takes the whole ``(tokens, vocab)`` logits at once: it casts them to
float32, takes their log-softmax and keeps it for backward; backward then builds a float32 gradient of the
same size and casts it back. For a batch of 4 x 128 tokens and SmolLM2's 49,152-word vocabulary each of those
tensors is 100 MB (float32), written once and read once; on the 2-core CI machine the loss's forward and
backward took 130-160 ms of a 1.3 s bfloat16 QLoRA step (``benchmarks/bench_qlora.py --profile``).

:func:`causal_lm_loss` computes the same loss in chunks of :data:`CHUNK_ROWS` rows: each chunk's float32
log-softmax lives only while it is used (a few MB, which stay in the CPU's cache), and backward computes it
again instead of keeping it. Autograd then keeps only the logits, which the model returns anyway. It runs the
same torch kernels on the same rows, and each row's result does not depend on the others, so the loss and
every gradient are bit-identical to transformers' (``tests/test_loss.py``). Liger Kernel's fused linear
cross-entropy goes further on GPUs: it chunks the output layer's matrix multiply as well.

``lorakit.load_base_model`` installs it as the model's ``loss_function``, so ``model(input_ids, labels=...).loss``
uses it; a model loaded by transformers directly keeps transformers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.blockwise import scratch_buffer

# Rows of logits per chunk: 16 x 49,152 float32 values = 3 MB for SmolLM2, which stays in the CPU's cache.
# Measured on the 2-core CI machine, 2 threads, forward and backward of 512 rows: float32 60 ms at 16 rows
# against 71-111 ms at 8, 32 and 64; bfloat16 49 ms, where 8 rows took 40 ms (transformers' loss: 126 and 156 ms).
CHUNK_ROWS = 16


class TargetLogProb(torch.autograd.Function):
    """``log_softmax(logits.float())[i, targets[i]]`` for each row ``i``: (N, V), (N,) -> (N,) float32.

    Rows whose target is ``ignore_index`` get 0 and no gradient. Forward keeps only ``logits`` and
    ``targets``; backward recomputes each chunk's log-softmax and applies torch's own log-softmax backward
    to it, so the gradient has the bits of ``log_softmax`` + ``gather`` through autograd. A chunk's float32
    tensors live in buffers reused from chunk to chunk and step to step (:func:`chunk_buffers`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, rows: int) -> torch.Tensor:
        valid = targets != ignore_index
        index = torch.where(valid, targets, 0).unsqueeze(1)  # (N, 1); an ignored row reads column 0, then 0
        picked = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        as_float, logp, _ = chunk_buffers(rows, logits)
        for start in range(0, logits.shape[0], rows):
            part = slice(start, start + rows)
            x = _as_float(logits[part], as_float)  # (rows, V) float32
            torch.log_softmax(x, dim=-1, out=logp[: len(x)])
            picked[part] = logp[: len(x)].gather(1, index[part]).squeeze(1)
        picked.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, index, valid)
        ctx.rows = rows
        return picked

    @staticmethod
    def backward(ctx, grad_picked: torch.Tensor):
        logits, index, valid = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        grad_picked = grad_picked.masked_fill(~valid, 0.0)
        as_float, logp, grad_logp = chunk_buffers(ctx.rows, logits)
        for start in range(0, logits.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            x = _as_float(logits[part], as_float)
            n = len(x)
            torch.log_softmax(x, dim=-1, out=logp[:n])  # recomputed, not kept
            grad_logp[:n].zero_().scatter_(1, index[part], grad_picked[part].unsqueeze(1))
            # d log_softmax: grad_logp - softmax * sum(grad_logp), torch's kernel; then cast as .float()'s backward
            if grad.dtype == torch.float32:
                torch._log_softmax_backward_data(grad_logp[:n], logp[:n], 1, torch.float32, out=grad[part])
            else:
                torch._log_softmax_backward_data(grad_logp[:n], logp[:n], 1, torch.float32, out=as_float[:n])
                grad[part] = as_float[:n]
        return grad, None, None, None


def chunk_buffers(rows: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three ``(rows, V)`` float32 buffers, the same memory at every call on this thread.

    Fresh tensors for each chunk would be fresh memory each time: with the fine-tune command's allocator
    (``lorakit.memory.return_freed_memory``) a 3 MB chunk is a new memory mapping whose pages the kernel
    zeroes, four times a chunk, 64 chunks a step.
    """
    vocab = logits.shape[-1]
    return tuple(
        scratch_buffer(f"loss {name}", rows * vocab, torch.float32, logits.device).view(rows, vocab)
        for name in ("float32 logits", "log-softmax", "gradient")
    )


def _as_float(chunk: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``chunk.float()``: the chunk itself if float32, else its copy in ``buffer``."""
    if chunk.dtype == torch.float32:
        return chunk
    out = buffer[: len(chunk)]
    out.copy_(chunk)
    return out


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same arguments, same numbers), in chunks of rows.

    Token ``t`` predicts token ``t + 1``; targets equal to ``ignore_index`` (-100: padding, a masked prompt)
    count for nothing. The mean is over the counted targets, or the sum is divided by ``num_items_in_batch``
    when a trainer passes it (gradient accumulation over uneven micro-batches), as transformers does.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T): the next token, -100 at the end
    logits = logits.reshape(-1, vocab_size)  # (B * T, V)
    targets = shift_labels.reshape(-1).to(logits.device)  # (B * T,)
    picked = TargetLogProb.apply(logits, targets, ignore_index, CHUNK_ROWS)  # (B * T,) log p(target)
    # The reduction is torch's nll_loss over the picked values (one column, the target's): the same sum,
    # in the same order, as cross_entropy's over the full rows, so the loss has the same bits too.
    column = torch.where(targets == ignore_index, ignore_index, 0)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.nll_loss(picked.unsqueeze(1), column, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def use_chunked_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Make a transformers causal LM compute ``.loss`` with :func:`causal_lm_loss`; returns the model.

    Only a model that uses transformers' ``ForCausalLMLoss`` (its ``loss_type``, with no loss of its own set)
    changes; any other model is returned as it is.
    """
    if getattr(model, "loss_type", None) == "ForCausalLM" and not hasattr(model, "_loss_function"):
        model.loss_function = causal_lm_loss
    return model
