"""Generation settings: Ollama's defaults from the schema, one Sampling for generate, evaluate and the
GGUF path, a repeat penalty over the last n tokens only, and the Modelfile's values read back."""

from __future__ import annotations

import pytest
import torch

from contract.strategy import OllamaSpec
from trainer.export.generate_gguf import sampling_for
from trainer.sampling import Sampling, hf_generate_kwargs, llamacpp_kwargs


def test_defaults_are_ollamas_and_sampling_unless_greedy_is_asked():
    s = Sampling.from_spec(OllamaSpec(), seed=7)
    assert (s.temperature, s.top_p, s.top_k, s.repeat_penalty, s.repeat_last_n, s.seed, s.greedy) == (
        0.8, 0.9, 40, 1.1, 64, 7, False)
    assert hf_generate_kwargs(s)["do_sample"] is True
    assert Sampling.from_spec(OllamaSpec(), greedy=True).greedy
    assert Sampling.from_spec(OllamaSpec(temperature=0)).greedy  # temperature 0 means greedy, as in Ollama
    assert llamacpp_kwargs(Sampling.from_spec(OllamaSpec(), greedy=True, seed=1))["top_k"] == 1


def test_seed_from_the_flag_then_the_strategy_then_fresh():
    assert Sampling.from_spec(OllamaSpec(seed=3)).seed == 3
    assert Sampling.from_spec(OllamaSpec(seed=3), seed=5).seed == 5
    fresh = {Sampling.from_spec(OllamaSpec()).seed for _ in range(5)}
    assert len(fresh) > 1


def test_repeat_penalty_reaches_back_only_repeat_last_n_tokens():
    sampling = Sampling.from_spec(OllamaSpec(repeat_penalty=2.0, repeat_last_n=3), greedy=True, seed=0)
    (penalty,) = hf_generate_kwargs(sampling)["logits_processor"]
    ids = torch.tensor([[5, 1, 2, 3]])  # token 5 is four back: outside the window of 3
    scores = penalty(ids, torch.full((1, 8), 4.0))
    assert scores[0].tolist() == [4.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_an_ollama_folder_answers_with_its_modelfile_settings(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "Modelfile").write_text(
        'FROM ./model.gguf\nPARAMETER stop "<|im_end|>"\nPARAMETER num_ctx 512\n'
        "PARAMETER temperature 0.3\nPARAMETER top_k 12\nPARAMETER repeat_penalty 1.3\n")
    s = sampling_for(tmp_path / "model.gguf", greedy=False, seed=4, temperature=None)
    assert (s.temperature, s.top_k, s.repeat_penalty, s.top_p, s.seed) == (0.3, 12, 1.3, 0.9, 4)
    assert sampling_for(tmp_path / "model.gguf", False, 4, temperature=1.5).temperature == 1.5
    bare = tmp_path / "bare" / "x.gguf"
    assert sampling_for(bare, False, 4, None).temperature == 0.8  # no Modelfile: the schema's defaults


@pytest.fixture(scope="module")
def tiny_chat():
    """(model, tokenizer, encoder) of the bpe builtin with the llama3 template, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from contract.chat_templates import get_template
    from trainer.data.tokenize import ConversationEncoder
    from trainer.models.builtin import builtin_path

    folder = builtin_path("builtin:tiny-llama-bpe")
    tok = AutoTokenizer.from_pretrained(folder)
    return (AutoModelForCausalLM.from_pretrained(folder).eval(), tok,
            ConversationEncoder(tok, get_template("llama3"), 128, False, "truncate"))


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_on_a_tiny_builtin_is_reproducible_with_a_seed(tiny_chat, greedy):
    from trainer.generate import complete

    model, tok, encoder = tiny_chat
    messages = [{"role": "user", "content": "What is a fever?"}]
    sampling = Sampling.from_spec(OllamaSpec(), greedy=greedy, seed=11)
    first = complete(model, tok, encoder, messages, 12, sampling)
    assert first and complete(model, tok, encoder, messages, 12, sampling) == first


def test_a_strategy_resolved_before_the_defaults_still_loads():
    # strategy.yaml written by older jobs says null for these, which meant Ollama's default then too.
    old = OllamaSpec.model_validate({"temperature": None, "top_p": None, "top_k": None, "repeat_penalty": None})
    assert (old.temperature, old.top_p, old.top_k, old.repeat_penalty) == (0.8, 0.9, 40, 1.1)


@pytest.mark.parametrize("pieces, stops, shown", [
    (["  Hel", "lo wor", "ld <|im", "_end|> more"], ["<|im_end|>"], ["Hel", "lo wor", "ld"]),
    (["A", " ", " B", " <", "x"], ["<|im_end|>"], ["A", "  B", " <x"]),  # a stop string's start, then not
    (["\n", "ok\n\n"], [], ["ok"]),
])
def test_a_streamed_answer_reads_exactly_as_the_finished_one(pieces, stops, shown):
    from trainer.streaming import StopAwareEmitter

    out: list[str] = []
    emitter = StopAwareEmitter(out.append, stops)
    for piece in pieces:
        emitter.feed(piece)
    assert emitter.finish() == "".join(out) and out == shown


def test_generation_streams_the_same_answer_token_by_token(tiny_chat):
    from trainer.generate import complete

    model, tok, encoder = tiny_chat
    messages = [{"role": "user", "content": "What is a fever?"}]
    sampling = Sampling.from_spec(OllamaSpec(), greedy=True, seed=11)
    pieces: list[str] = []
    streamed = complete(model, tok, encoder, messages, 24, sampling, on_text=pieces.append)
    assert streamed == complete(model, tok, encoder, messages, 24, sampling) == "".join(pieces)
    assert len(pieces) > 3, pieces
