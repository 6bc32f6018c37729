"""LlamaFactory's managed environment: a venv of its own, created on first use.

    python -m trainer.llamafactory.env     # create it now (scripts/test.sh does, for CI)

LlamaFactory pins older transformers, peft, accelerate and datasets than llamafarm, so it cannot
share our venv. Its venv lives in the machine-wide cache ($LLAMAFARM_CACHE/envs/llamafactory-<version>)
and is built once: about 2 minutes and 2 GB here. torch is held to the version our own venv runs, so
pip takes the same (CPU) wheel instead of pulling a multi-GB CUDA build.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

from contract.errors import UserError
from contract.llamafactory import LLAMAFACTORY_VERSION, READY, TORCH_PIN, env_dir, is_ready

def _fix_torch_extras(folder: Path) -> None:
    """On a CPU-only host: PyPI's torchvision and torchaudio wheels are CUDA builds that fail to load
    next to the CPU torch.
    LlamaFactory needs neither for text: torchvision goes, and torchaudio (imported at start-up by
    LlamaFactory's multimodal code) loses its compiled extension, so it imports in pure-Python mode."""
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "uninstall", "--yes", "--quiet", "torchvision"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for lib in folder.glob("lib/python*/site-packages/torchaudio/lib/*.so"):
        lib.unlink()


def ensure_env(echo=print) -> Path:
    """The environment's folder, created first when missing (one builder at a time)."""
    if is_ready():
        return env_dir()
    folder = env_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job waits for the first one's build
        if is_ready():
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        echo(f"llamafactory: creating its environment in {folder} (first use: LlamaFactory {LLAMAFACTORY_VERSION} "
             f"with {TORCH_PIN}; about 2 minutes and 2 GB, later jobs reuse it)")
        from contract.platform import has_cuda

        cuda = has_cuda()
        # On a CUDA host, bitsandbytes too: LlamaFactory's QLoRA (quantization_bit: 4) needs it.
        packages = [f"llamafactory=={LLAMAFACTORY_VERSION}", TORCH_PIN, *(["bitsandbytes"] if cuda else [])]
        steps = [
            [sys.executable, "-m", "venv", str(folder)],
            [str(folder / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", *packages],
        ]
        for argv in steps:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode:
                tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
                shutil.rmtree(folder, ignore_errors=True)
                raise UserError(f"could not create LlamaFactory's environment ({' '.join(argv[:4])} ... failed):\n{tail}\n"
                                "check that pip can reach the package index, then start the job again")
        if not cuda:
            _fix_torch_extras(folder)
        (folder / READY).write_text("\n".join(packages) + "\n")
        echo(f"llamafactory: environment ready ({folder})")
    return folder


if __name__ == "__main__":
    try:
        ensure_env()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"llamafactory environment: {env_dir()}")
