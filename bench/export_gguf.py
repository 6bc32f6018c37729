"""Benchmark: our GGUF converter against llama.cpp's own convert_hf_to_gguf.py, same model, same run.

    .venv/bin/python -m bench.export_gguf [--outtype f16] [--work /tmp/llamafarm-bench-export]

The model is SmolLM2-135M-shaped (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings), random-initialised from its config and saved in bf16 as SmolLM2 ships,
with the builtin SentencePiece-style tokenizer (llama.cpp's converter reads it through its Llama HF
vocab path). llama.cpp's converter comes from the sdist of the llama-cpp-python version pinned in
requirements/export.txt (downloaded once into --work; nothing of it is kept in this repository) and
runs with its own vendored gguf-py. Each converter runs in a fresh process, twice, alternating; the
table shows wall time and the process's own peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)

# Runs a converter in-process and reports its own wall time and peak RSS (ru_maxrss is KiB on Linux).
_MEASURE = """
import json, resource, runpy, sys, time
t = time.perf_counter()
sys.argv = {argv!r}
{body}
print("MEASURE " + json.dumps({{"seconds": time.perf_counter() - t,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def build_model(folder: Path) -> None:
    if (folder / "model.safetensors").exists():
        return
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.models.builtin import builtin_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_path("builtin:tiny-llama-spm"))
    config = LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (bf16) in {folder}")


def llama_cpp_converter(work: Path) -> Path:
    pin = re.search(r"llama-cpp-python==(\S+)", (ROOT / "requirements" / "export.txt").read_text()).group(1)
    root = work / f"llama_cpp_python-{pin}" / "vendor" / "llama.cpp"
    if not (root / "conversion").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={pin}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(work), "-q"], check=True)
        with tarfile.open(work / f"llama_cpp_python-{pin}.tar.gz") as tar:
            # The converter script, the package it imports (conversion/) and its own gguf-py.
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name
                       and (m.name.endswith(".py") or "/gguf-py/" in m.name)]
            tar.extractall(work, members=members, filter="data")
    try:
        import sentencepiece  # noqa: F401  (llama.cpp's converter imports it before looking at the files)
    except ImportError:
        print("installing sentencepiece, which llama.cpp's converter requires")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "sentencepiece"], check=True)
    return root


def run_measured(argv: list[str], body: str, extra_path: list[Path] | None = None) -> dict:
    env_path = [str(ROOT)] + ([str(p) for p in extra_path] if extra_path else [])
    code = f"import sys; sys.path[:0] = {env_path!r}\n" + _MEASURE.format(argv=argv, body=body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"converter failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("MEASURE "))
    return json.loads(line.removeprefix("MEASURE "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/llamafarm-bench-export"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "smollm2-135m-shape"
    build_model(model)
    converter = llama_cpp_converter(args.work)
    ours_body = (
        "from pathlib import Path\n"
        "from trainer.export.gguf_model import convert\n"
        "from trainer.export.weights import ModelWeights\n"
        f"convert(ModelWeights(Path({str(model)!r})), Path({str(model)!r}), Path({str(args.work / 'ours.gguf')!r}),"
        f" {args.outtype!r}, 'bench', None)\n"
    )
    theirs_body = f"runpy.run_path({str(converter / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    theirs_argv = ["convert_hf_to_gguf.py", str(model), "--outtype", args.outtype, "--outfile", str(args.work / "theirs.gguf")]
    results: dict[str, list[dict]] = {"llamafarm": [], "llama.cpp convert_hf_to_gguf.py": []}
    for _ in range(args.rounds):
        results["llama.cpp convert_hf_to_gguf.py"].append(run_measured(theirs_argv, theirs_body, [converter, converter / "gguf-py"]))
        results["llamafarm"].append(run_measured(["llamafarm"], ours_body))
    best = {name: {"seconds": min(r["seconds"] for r in rs), "peak_rss_mb": min(r["peak_rss_mb"] for r in rs)}
            for name, rs in results.items()}
    sizes = {"llamafarm": (args.work / "ours.gguf").stat().st_size, "llama.cpp convert_hf_to_gguf.py": (args.work / "theirs.gguf").stat().st_size}
    print(f"\nSmolLM2-135M shape, bf16 safetensors -> {args.outtype} GGUF, best of {args.rounds} (fresh process each)")
    print(f"{'converter':<34} {'seconds':>8} {'peak RSS MB':>12} {'file MB':>8}")
    for name, b in best.items():
        print(f"{name:<34} {b['seconds']:>8.2f} {b['peak_rss_mb']:>12.0f} {sizes[name] / 2**20:>8.1f}")
    ours, theirs = best["llamafarm"], best["llama.cpp convert_hf_to_gguf.py"]
    print(f"ratio llamafarm / llama.cpp: time {ours['seconds'] / theirs['seconds']:.2f}, "
          f"peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
