"""The chunked loss: the output layer and cross-entropy computed in chunks of rows over labelled
positions only, with the gradient for the hidden states computed chunk by chunk, so the full
(tokens x vocabulary) logits never exist (with a 49k vocabulary they are the largest tensors of a
small model's step). Whether a model gets it is trainer/performance.py's `choose_chunked_loss`.
"""

from __future__ import annotations

from types import SimpleNamespace

from contract.decisions import chunk_rows


def causal_lm(model):
    """The transformers *ForCausalLM under any PEFT wrapper (LoRA layers live inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_loss(model, input_ids, attention_mask, position_ids, labels):
    """The model's causal-LM loss (mean over labelled next-token positions) via the chunked head.

    Returns an object with `.loss`, like a transformers model output."""
    hidden, weight, targets, _ = _labelled_hidden(model, input_ids, attention_mask, position_ids, labels, -100)
    return SimpleNamespace(loss=linear_cross_entropy(hidden, weight, targets))


def _labelled_hidden(model, input_ids, attention_mask, position_ids, labels, ignore_index: int):
    """The decoder's last hidden states at the positions whose next token is labelled, the output layer's
    weight, those next tokens, and the (rows, length - 1) mask of the positions kept."""
    inner = causal_lm(model)
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != ignore_index
    return hidden[:, :-1][keep], inner.get_output_embeddings().weight, targets[keep], keep


def answer_log_probs(model, input_ids, attention_mask, position_ids, labels, ignore_index: int = -100):
    """(sum of the labelled tokens' log-probs, their count) per row, via the chunked head: preference
    stages' log-probabilities without the (rows x length x vocabulary) float32 logits."""
    import torch

    hidden, weight, targets, keep = _labelled_hidden(model, input_ids, attention_mask, position_ids, labels,
                                                     ignore_index)
    token_logps = linear_log_probs(hidden, weight, targets)
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    sums = torch.zeros(keep.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), keep.sum(-1)


def linear_log_probs(hidden, weight, targets):
    """log_softmax(hidden @ weight.T)[i, targets[i]] for every row i, float32, computed chunk by chunk;
    backward recomputes each chunk's logits (the upstream gradient per row is known only then)."""
    import torch

    dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearLogProbs.apply(hidden.to(dtype), weight, targets, chunk_rows(weight.shape[0]), dtype)


def _compute_dtype(hidden, weight):
    """The products run in the autocast dtype under autocast (as nn.Linear would), else the weight's.

    The functions cast the weight themselves and return its gradient in its own dtype: an autograd cast
    outside would round a trained fp32 weight's float32 gradient to bf16 and back (with tied embeddings
    that is the model's largest matrix, two passes over it each step)."""
    import torch

    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


# Elements per slice of the weight gradient's float32 additions: ~8 MB temporaries, which malloc reuses.
_ADD_SLICE_ELEMENTS = 1 << 21


class _WeightGrad:
    """The output weight's gradient, the sum over chunks of d_logits.T @ h, in float32.

    Without a fresh weight-sized tensor per chunk: each is ~113 MB in float32 for a 49k x 576 head,
    and a fresh one costs its page faults (the 2048x1 full fine-tune profiled at 8 such copies and 6
    such products a step, 1.6 s of a 5.7 s step). The first chunk's product becomes the sum; later
    ones are multiplied into one reused compute-dtype buffer and added to it slice by slice, or
    straight into it by addmm when the compute dtype is float32. One chunk touches the weight-sized gradient once."""

    def __init__(self) -> None:
        self.total = None
        self._product = None

    def add(self, d_logits, h) -> None:
        import torch

        if self.total is None:
            self.total = (d_logits.t() @ h).float()
        elif self.total.dtype == d_logits.dtype:
            self.total.addmm_(d_logits.t(), h)
        else:
            self._product = (torch.mm(d_logits.t(), h, out=self._product) if self._product is not None
                             else d_logits.t() @ h)
            # In slices: a mixed-dtype add_ casts its whole operand into a fresh float32 temporary
            # first (342-403 ms against 205-234 ms for six chunks of a 49k x 576 head, 2 cores).
            rows = max(1, _ADD_SLICE_ELEMENTS // self.total.shape[-1])
            for total, product in zip(self.total.split(rows), self._product.split(rows)):
                total.add_(product)


def linear_cross_entropy(hidden, weight, targets):
    """mean(cross_entropy(hidden @ weight.T, targets)), computed chunk by chunk.

    Under autocast the products run in the autocast dtype (as nn.Linear would); the softmax and the
    loss are always float32."""
    import torch

    dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.to(dtype), weight, targets, chunk_rows(weight.shape[0]), dtype)


def _make_function():
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Forward computes the loss and, when a gradient will be needed, the gradients too, one chunk
        at a time, so only a chunk's logits are ever in memory; backward only scales them."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk, dtype):
            n = hidden.shape[0]
            need_w = weight.requires_grad
            weight_grad = _WeightGrad()
            ctx.weight_dtype = weight.dtype
            weight = weight.to(dtype)
            grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                h, y = hidden[start : start + chunk], targets[start : start + chunk]
                logits = h @ weight.t()
                rows = torch.arange(len(y), device=y.device)
                if logits.dtype == torch.float32 or (grad_h is None and not need_w):
                    # One fused log-softmax pass in float32 (logsumexp would allocate two more
                    # chunk-sized temporaries); evaluation always takes this exact path.
                    log_probs = torch.log_softmax(logits.float(), dim=-1)
                    total -= log_probs[rows, y].sum()
                    if grad_h is None and not need_w:
                        continue
                    probs = log_probs.exp_()
                else:
                    # bf16/fp16 logits: one softmax pass that accumulates in float32 and rounds once to
                    # the compute dtype, which the gradient below is cast to anyway; no float32 copy of
                    # the logits (~4x faster on CPU). The logged loss comes from the rounded
                    # probability of each target (<= 0.4% relative error each, unbiased); clamped at
                    # the dtype's smallest normal so it stays finite.
                    probs = torch.softmax(logits, dim=-1)
                    tiny = torch.finfo(probs.dtype).tiny
                    total -= probs[rows, y].float().clamp_min(tiny).log().sum()
                # d(loss)/d(logits) = softmax - one_hot(target)
                probs[rows, y] -= 1
                d_logits = probs.to(weight.dtype)
                if grad_h is not None:
                    grad_h[start : start + chunk] = d_logits @ weight
                if need_w:
                    weight_grad.add(d_logits, h)
            grad_w = weight_grad.total
            count = max(n, 1)
            ctx.count = count
            ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
            ctx.has = (grad_h is not None, grad_w is not None)
            return total / count

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            scale = grad_out / ctx.count  # a 0-d tensor: the product keeps each gradient's dtype
            grad_h = saved.pop(0) * scale if ctx.has[0] else None
            # In place: the loss is backwarded once, and a new weight-sized tensor would cost its page faults too.
            grad_w = saved.pop(0).mul_(scale).to(ctx.weight_dtype) if ctx.has[1] else None
            return grad_h, grad_w, None, None, None

    return LinearCrossEntropy


def _make_log_probs_function():
    import torch

    class LinearLogProbs(torch.autograd.Function):
        """Forward keeps only the inputs; backward recomputes each chunk's logits and softmax, the
        one extra product of the output layer per chunk that keeps the full logits out of memory."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk, dtype):
            ctx.weight_dtype = weight.dtype
            weight = weight.to(dtype)
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                logits = (hidden[start : start + chunk] @ weight.t()).float()
                y = targets[start : start + chunk]
                out[start : start + chunk] = logits.gather(-1, y[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            ctx.save_for_backward(hidden, weight, targets)
            ctx.chunk = chunk
            return out

        @staticmethod
        def backward(ctx, grad):
            hidden, weight, targets = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(hidden) if need_h else None
            weight_grad = _WeightGrad()
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, y, g = (t[start : start + ctx.chunk] for t in (hidden, targets, grad))
                # d log p(y) / d logits = one_hot(y) - softmax, times each row's upstream gradient
                d_logits = torch.softmax((h @ weight.t()).float(), dim=-1).neg_()
                d_logits[torch.arange(len(y), device=y.device), y] += 1
                d_logits = (d_logits * g[:, None]).to(weight.dtype)
                if need_h:
                    grad_h[start : start + ctx.chunk] = d_logits @ weight
                if need_w:
                    weight_grad.add(d_logits, h)
            grad_w = weight_grad.total
            return grad_h, grad_w.to(ctx.weight_dtype) if grad_w is not None else None, None, None, None

    return LinearLogProbs


class _Lazy:
    """Builds an autograd Function on first use, so importing this module imports no torch."""

    def __init__(self, make) -> None:
        self._make, self._fn = make, None

    def apply(self, *args):
        if self._fn is None:
            self._fn = self._make()
        return self._fn.apply(*args)


_LinearCrossEntropy = _Lazy(_make_function)
_LinearLogProbs = _Lazy(_make_log_probs_function)
