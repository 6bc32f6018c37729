"""A GGUF base model (a local `.gguf` file or `ollama:NAME[:TAG]`, found and read by inputs/models/gguf.py)
dequantized once by transformers' GGUF loader into a plain Hugging Face folder in the machine-wide
cache, then checked against llama.cpp on the source file: the rebuilt tokenizer must tokenize probe
text exactly as llama.cpp does, and the next-token choice (top-1) must agree at 99% of the positions
of a probe conversation where the pick is clear (the export check's CLEAR_MARGIN): llama.cpp rounds
activations to 8 bits in its quantized matmuls, and which near-ties flip depends on the CPU's kernels
(measured on the real SmolLM2 Q4_1 file: 100% of clear positions on two CPU kinds, 97.2% of all
positions on one, the two flips at logit gaps of 0.07 and 0.10). A mismatch is an error: training on a model that is not the one the user
has would be worse than not training.
"""

from __future__ import annotations

import json
from pathlib import Path

from contract.errors import UserError
from inputs.models.cache import build_once, file_sha256
from inputs.models.gguf import PROBE_CONVERSATION, folder_for, inspect, source_file

MIN_TOP1_AGREEMENT = 0.99


def dequantized_folder(model_id: str) -> Path:
    """The GGUF base model as a verified Hugging Face folder, built on first use (cached per file)."""
    path = source_file(model_id)
    arch, meta = inspect(path)
    target = folder_for(path)

    def build(tmp: Path) -> None:
        print(f"base model {model_id}: {arch}, {'/'.join(meta['tensor_types'])}; dequantizing once into {target}",
              flush=True)
        dequantize(path, tmp)
        check = verify_against_llamacpp(path, tmp)
        provenance = {"model": model_id, "file": str(path), "file_sha256": file_sha256(path), "architecture": arch,
                      "how": f"dequantized from {'/'.join(meta['tensor_types'])} to float32 by transformers' GGUF loader",
                      "check": check}
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")

    return build_once(target, "model.safetensors", build)


def dequantize(source: Path, out: Path) -> None:
    """A GGUF file to a plain model folder (fp32 safetensors, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): its weights are already
    # plain fp32 tensors, so they move into an ordinary model of the same class and config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)


def verify_against_llamacpp(source: Path, folder: Path) -> dict:
    """Tokenization equal to llama.cpp's on probe text, and top-1 agreement >= 99% at the clear positions
    of a probe conversation; raises UserError otherwise."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export.llamacpp import llama_cpp_module
    from trainer.export.verify import CLEAR_MARGIN, TOKENIZER_PROBES, clear_positions  # as every export is checked

    llama_cpp = llama_cpp_module("checking a GGUF base model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    probe = (tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False) if tokenizer.chat_template
             else " ".join(m["content"] for m in PROBE_CONVERSATION))
    llm = llama_cpp.Llama(model_path=str(source), n_ctx=512, logits_all=True, verbose=False, seed=0)
    for text in [probe, *TOKENIZER_PROBES]:
        ours = tokenizer(text)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise UserError(f"{source}: the dequantized tokenizer differs from llama.cpp's on {text[:40]!r} from "
                            f"token {at} (ours {ours[at:at + 6]}, llama.cpp {theirs[at:at + 6]}); not trained on")
    ids = tokenizer(probe)["input_ids"]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32).argmax(-1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    clear = clear_positions(logits)
    agreement = float((logits.argmax(-1) == theirs)[clear].mean()) if clear.any() else 1.0
    where = f"{int(clear.sum())} of {len(ids)} positions (those where the pick leads by >= {CLEAR_MARGIN} logit)"
    if agreement < MIN_TOP1_AGREEMENT:
        raise UserError(f"{source}: the dequantized model picks the same next token as llama.cpp at only "
                        f"{agreement:.1%} of {where}; at least {MIN_TOP1_AGREEMENT:.0%} needed; not trained on")
    print(f"checked against llama.cpp: tokenizer equal on {1 + len(TOKENIZER_PROBES)} probes, "
          f"top-1 agreement {agreement:.1%} over {where}", flush=True)
    return {"tokenizer_probes_equal": 1 + len(TOKENIZER_PROBES), "top1_agreement": round(agreement, 4),
            "positions": len(ids), "clear_positions": int(clear.sum())}
