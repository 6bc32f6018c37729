"""Generation from a fine-tuned job (or a saved folder) with the template it was trained with.

    python -m trainer generate <folder> --prompt "..." [--max-new-tokens N] [--temperature T] [--greedy] [--seed N]

<folder> is a job's final/ or checkpoints/checkpoint-N/ folder: it holds the adapter (or full
weights), the tokenizer carrying the training chat template, and the strategy that made it. Any
Hugging Face causal-LM folder works too (inputs/models/plain_folder.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path



def quiet_libraries() -> None:
    """The answer is the output: no loading bars or library chatter around it."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def load_base(cfg):
    """The strategy's base model, fp32, as training started from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.models import source

    return AutoModelForCausalLM.from_pretrained(
        source.resolve(cfg.base_model), revision=cfg.base_model.revision,
        trust_remote_code=cfg.base_model.trust_remote_code, dtype=torch.float32, use_safetensors=True,
    )


def load_for_inference(folder: Path):
    """(model, tokenizer, encoder, strategy) for an artifact folder written by trainer.saving."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.tokenize import ConversationEncoder, choose_template
    from inputs.models.plain_folder import folder_strategy

    quiet_libraries()
    strategy, _ = folder_strategy(folder)
    cfg = strategy.cfg
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template, _ = choose_template(cfg.dataset.template, tokenizer)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(cfg), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    # Inference uses the best device present (cuda, then mps, then cpu), wherever training ran.
    from contract.decisions import choose_device
    from trainer.devices import available

    model.to(choose_device("auto", None, available()).value)
    model.eval()
    encoder = ConversationEncoder(tokenizer, template, cfg.training_args.max_seq_length, False, "truncate")
    return model, tokenizer, encoder, strategy


def _streamer(tokenizer, emitter):
    """A transformers streamer that hands each newly decoded piece of the answer to `emitter`."""
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        def __init__(self):
            self.ids: list[int] | None = None  # None until the prompt has gone by
            self.shown = ""

        def put(self, value):
            if self.ids is None:
                self.ids = []
                return
            self.ids.extend(value.reshape(-1).tolist())
            text = tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd") or not text.startswith(self.shown):
                return  # half a character, or a re-spacing: wait for the next token
            emitter.feed(text[len(self.shown):])
            self.shown = text

        def end(self):
            pass

    return Streamer()


def complete(model, tokenizer, encoder, messages, max_new_tokens: int, sampling, on_text=None) -> str:
    """The assistant's next turn for `messages`, stopping at EOS or a template stop string; with
    `on_text`, each piece of it is handed over as it is generated (trainer.streaming).

    `sampling` (trainer.sampling.Sampling) seeds torch itself, so each answer is reproducible alone."""
    import torch

    from trainer.sampling import hf_generate_kwargs
    from trainer.streaming import StopAwareEmitter

    ids = encoder.prompt_ids(messages)
    stop = [s for s in encoder.template.stop_strings if s and s != tokenizer.eos_token]
    emitter = StopAwareEmitter(on_text, stop)
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            stop_strings=stop or None,
            tokenizer=tokenizer if stop else None,
            streamer=_streamer(tokenizer, emitter) if on_text else None,
            **hf_generate_kwargs(sampling),
        )
    emitter.feed(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)[len(emitter.text):])
    return emitter.finish()  # stop_strings end generation after the string; the emitter cuts it off


def generate(folder: Path, prompt: str, max_new_tokens: int = 128, greedy: bool = False, seed: int | None = None,
             temperature: float | None = None, on_text=None) -> str:
    import sys

    from trainer.sampling import Sampling

    model, tokenizer, encoder, strategy = load_for_inference(Path(folder))
    spec = strategy.cfg.export.ollama
    if temperature is not None:
        spec = spec.model_copy(update={"temperature": temperature})
    sampling = Sampling.from_spec(spec, greedy, seed)
    print(sampling.describe(), file=sys.stderr, flush=True)  # stdout is the answer alone
    return complete(model, tokenizer, encoder, [{"role": "user", "content": prompt}], max_new_tokens, sampling, on_text)
