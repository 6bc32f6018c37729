"""What export needs from llama.cpp, through llama-cpp-python: loading a GGUF, tokenizing, logits,
greedy decoding, and K-quant quantization (which the `gguf` package cannot produce)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from contract.errors import UserError
from contract.export_options import K_QUANTIZATIONS

INSTALL_HINT = (
    "install it into the environment that runs the trainer: `.venv/bin/pip install llama-cpp-python` "
    "(it builds llama.cpp from source, about 6 minutes on 2 cores; scripts/install.sh does this)"
)

GGML_F32 = 0  # ggml_type GGML_TYPE_F32



def llama_cpp_module(purpose: str):
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"{purpose} needs llama-cpp-python, which is not installed; {INSTALL_HINT}") from None
    return llama_cpp


def quantize_k(source: Path, out: Path, quantization: str) -> None:
    """Re-quantize a F32/F16 GGUF into a K-quant with llama.cpp's own quantizer."""
    llama_cpp = llama_cpp_module(f"quantization {quantization}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{K_QUANTIZATIONS[quantization]}")  # llama.h's llama_ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {source.name} to {quantization} (return code {rc})")


class GgufModel:
    """A GGUF loaded in llama.cpp with every position's logits kept (for comparison)."""

    def __init__(self, path: Path, n_ctx: int = 512, lora_path: Path | None = None, last_n_tokens: int = 64):
        llama_cpp = llama_cpp_module("loading a GGUF")
        kwargs = {"lora_path": str(lora_path)} if lora_path else {}
        try:
            # An f32 KV cache (llama.cpp's default is f16): the comparison measures the weights, not the cache.
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                       n_threads=os.cpu_count() or 1, seed=0, type_k=GGML_F32, type_v=GGML_F32,
                                       last_n_tokens_size=last_n_tokens, **kwargs)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"llama.cpp cannot load {path}: {exc}") from None
        self.eos = self.llm.token_eos()
        self.bos = self.llm.token_bos()
        self.add_bos = bool(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")

    def tokenize(self, text: str, bos_text: str | None) -> list[int]:
        """Tokens of `text` by the same rule as training: BOS once (the tokenizer's, unless the text opens with it)."""
        add = not (bos_text and text.startswith(bos_text))
        return self.llm.tokenize(text.encode(), add_bos=add, special=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], bool]:
        """Greedy continuation; (new tokens, whether it stopped on a stop token)."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token in stop_ids:
                return out, True
            out.append(token)
            self.llm.eval([token])
        return out, False

    def detokenize_special(self, token: int) -> str:
        """The text of a control token such as BOS ("<|begin_of_text|>")."""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")
