"""How `generate` and `evaluate` pick tokens: the strategy's `export.ollama` settings (Ollama's own
defaults, from the schema), the same ones the Modelfile carries, so an answer seen here is one Ollama
could give. Greedy only on request; seedable, else a fresh seed each time as Ollama does.

Greedy decoding of a small real model loops ("inner ear infections, inner ear tumors, inner ear
infections, ..."); Ollama's repeat penalty over the last 64 tokens is what stops that.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from contract.strategy import OllamaSpec


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    greedy: bool

    @classmethod
    def from_spec(cls, spec: OllamaSpec, greedy: bool = False, seed: int | None = None) -> "Sampling":
        chosen = seed if seed is not None else spec.seed
        return cls(spec.temperature, spec.top_p, spec.top_k, spec.repeat_penalty, spec.repeat_last_n,
                   chosen if chosen is not None else random.randrange(2**31), greedy or spec.temperature == 0)

    def describe(self) -> str:
        pick = "greedy" if self.greedy else f"temperature {self.temperature}, top_k {self.top_k}, top_p {self.top_p}"
        return f"sampling: {pick}, repeat_penalty {self.repeat_penalty} over {self.repeat_last_n} tokens, seed {self.seed}"


def hf_generate_kwargs(sampling: Sampling) -> dict:
    """Arguments for transformers' generate(); the caller seeds torch with `sampling.seed` first."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    class RecentRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
        # transformers penalises every earlier token; Ollama (llama.cpp's sampler) only the last n.
        def __call__(self, input_ids, scores):
            return super().__call__(input_ids[:, -sampling.repeat_last_n:], scores)

    processors = LogitsProcessorList()
    if sampling.repeat_penalty != 1.0:
        processors.append(RecentRepetitionPenalty(sampling.repeat_penalty))
    if sampling.greedy:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "logits_processor": processors}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "logits_processor": processors}


def llamacpp_kwargs(sampling: Sampling) -> dict:
    """Arguments for llama-cpp-python's create_completion (repeat_last_n is set when the model loads)."""
    return {"temperature": 0.0 if sampling.greedy else sampling.temperature, "top_p": sampling.top_p,
            "top_k": 1 if sampling.greedy else sampling.top_k, "repeat_penalty": sampling.repeat_penalty,
            "seed": sampling.seed}
