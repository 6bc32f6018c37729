"""`python -m trainer export`: one trained model folder to merged weights, GGUF, GGUF LoRA or Ollama.

Everything is written into a temporary folder beside the destination and renamed into place only
after verification passes, so an export is either complete and verified or absent; a failed one
is kept as `<name>.failed/` with its report, for inspection.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contract.errors import UserError
from contract.export_options import (FORMATS, GENERAL_VERIFY_PROMPTS, K_QUANTIZATIONS, MERGED_PRECISIONS, QUANTIZATIONS,
                                     VERIFY_PROMPTS_FROM_DATA)
from contract.job_folder import FINAL_DIR
from trainer.export import gguf_model
REPORT_FILE = "export_report.json"


def _log(msg: str) -> None:
    print(msg, flush=True)


def _progress(label: str):
    from tqdm import tqdm

    # A bar on a terminal; nothing when the output is a pipe or a log (the summary line says it all).
    bar = tqdm(total=None, desc=label, unit="tensor", file=sys.stdout, leave=False, disable=not sys.stdout.isatty())

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def default_output(folder: Path, fmt: str, quantization: str) -> Path:
    """<job>/exports/<format>-<quantization> for a job's final/ folder; beside the folder otherwise."""
    root = folder.parent if folder.name == FINAL_DIR else folder
    return root / "exports" / f"{fmt}-{quantization}"


def _resolve(folder: Path, fmt: str | None, quantization: str | None):
    from inputs.models.plain_folder import folder_strategy

    strategy, _ = folder_strategy(folder)  # a llamafarm folder, or any Hugging Face causal-LM folder
    spec = strategy.cfg.export
    fmt = fmt or spec.format
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    is_adapter = (folder / "adapter_config.json").exists()
    if fmt == "merged":
        quantization = quantization or spec.merged_precision
        if quantization not in MERGED_PRECISIONS:
            raise UserError(f"merged weights are saved as {', '.join(MERGED_PRECISIONS)}; {quantization!r} is a GGUF "
                            "quantization (use --format gguf)")
    elif fmt == "adapter-gguf":
        if not is_adapter:
            raise UserError(f"{folder} holds full weights, not a LoRA adapter; use --format gguf or ollama")
        if quantization not in (None, "f32"):
            raise UserError("a GGUF LoRA adapter is written in f32 (it is small); leave out --quantization")
        quantization = "f32"
    else:
        quantization = quantization or spec.quantization
    return strategy, fmt, quantization, is_adapter


def base_model_folder(strategy) -> Path:
    """The base model's files on disk (a builtin, a local folder, or the hub cache's snapshot)."""
    from trainer.models import source

    spec = strategy.cfg.base_model
    ref = source.resolve(spec)
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, revision=spec.revision, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as exc:  # offline, gated, missing: the same to the user
        raise UserError(f"the base model {ref} is needed to merge the adapter and cannot be had: {exc}") from None


def _weights(folder: Path, strategy, is_adapter: bool):
    from trainer.export.weights import ModelWeights

    if is_adapter:
        return ModelWeights(base_model_folder(strategy), folder)
    return ModelWeights(folder)


def write_gguf(weights, folder: Path, out: Path, quantization: str, name: str, template, max_len: int) -> dict:
    """A GGUF in any offered quantization; K-quants go through a F32 intermediate and llama.cpp."""
    if quantization in gguf_model.IN_PROCESS:
        result = gguf_model.convert(weights, folder, out, quantization, name, template.jinja, max_len,
                                    progress=_progress(f"gguf {quantization}"), stop_strings=template.stop_strings)
        return {"seconds": round(result.seconds, 2), "tensor_types": result.tensor_types, "parameters": result.parameters}
    if quantization not in K_QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}")
    from trainer.export.llamacpp import llama_cpp_module, quantize_k

    llama_cpp_module(f"quantization {quantization}")  # fail before the long conversion
    start = time.perf_counter()
    intermediate = out.with_name(out.name + ".f32")
    gguf_model.convert(weights, folder, intermediate, "f32", name, template.jinja, max_len,
                       progress=_progress("gguf f32 (for llama.cpp's quantizer)"), stop_strings=template.stop_strings)
    try:
        quantize_k(intermediate, out, quantization)
    finally:
        intermediate.unlink(missing_ok=True)
    types = tensor_types(out)
    k_type = quantization.split("_")[0] + "_k"  # q4_k_m -> q4_k
    if k_type not in types:
        # llama.cpp falls back per tensor when rows are not whole 256-value K blocks; say so, never hide it.
        _log(f"note: {quantization} asked, but no tensor could take {k_type} blocks (rows must be multiples of 256); "
             f"llama.cpp used fallback types {types}")
    return {"seconds": round(time.perf_counter() - start, 2), "tensor_types": types}


def tensor_types(path: Path) -> dict[str, int]:
    """What a GGUF really holds, per tensor type (a K-quant file may hold fallback types)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        key = t.tensor_type.name.lower()
        counts[key] = counts.get(key, 0) + 1
    return counts


def _ollama_create(name: str | None, out: Path) -> dict:
    command = ["ollama", "create", name or "<name>", "-f", str(out / "Modelfile")]
    if name and shutil.which("ollama"):
        proc = subprocess.run(command, cwd=out, capture_output=True, text=True)
        if proc.returncode:
            raise UserError(f"`{' '.join(command)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
        _log(f"ollama: created model {name} (`ollama run {name}`)")
        return {"created": name}
    why = "no --name given" if not name else "no `ollama` binary on PATH"
    _log(f"ollama: not created ({why}); run:\n  {' '.join(command)}")
    return {"command": command}


def _written_by_export(path: Path) -> bool:
    """An export folder carries its report; nothing else is ours to replace."""
    return path.is_dir() and (path / REPORT_FILE).is_file()


def _check_replaceable(out: Path, force: bool) -> None:
    """--force replaces an earlier export only: a folder of the user's own files is never deleted."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise UserError(f"{out} already exists; choose another --output or pass --force to replace it")
    if not _written_by_export(out):
        raise UserError(f"{out} exists and was not written by an export (it has no {REPORT_FILE}); --force only "
                        "replaces an earlier export's folder; choose another --output")


def export(folder: Path, fmt: str | None, quantization: str | None, output: Path | None, name: str | None,
           force: bool = False) -> dict:
    from trainer.generate import load_for_inference

    strategy, fmt, quantization, is_adapter = _resolve(folder, fmt, quantization)
    out = (output or default_output(folder, fmt, quantization)).expanduser().resolve()
    _check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    label = name or f"{strategy.cfg.base_model.name}-{folder.parent.name if folder.name == FINAL_DIR else folder.name}"
    _log(f"export: {folder} -> {out} (format {fmt}, {quantization}; "
         f"{'LoRA adapter merged into its base as each tensor is written' if is_adapter and fmt != 'adapter-gguf' else 'weights as trained'})")
    report: dict = {"source": str(folder), "format": fmt, "quantization": quantization, "name": label}
    try:
        model, tokenizer, encoder, _ = load_for_inference(folder)
        template = encoder.template
        prompts = strategy.cfg.export.verify_prompts or _training_prompts(folder, strategy)
        if fmt == "merged":
            from trainer.export.merged import write_merged

            report["merged"] = write_merged(model, tokenizer, tmp, quantization, encoder, prompts)
        elif fmt == "adapter-gguf":
            _adapter(folder, strategy, model, tokenizer, encoder, tmp, label, prompts, report)
        else:
            if fmt == "ollama":  # before the conversion: a template with no Ollama form fails at once
                from trainer.export.ollama import modelfile, ollama_form

                form = ollama_form(template, lambda jinja, msgs: tokenizer.apply_chat_template(
                    msgs, chat_template=jinja, tokenize=False, add_generation_prompt=True))
                text = modelfile(form, tokenizer.bos_token or "", tokenizer.eos_token or "", strategy)
                report["ollama_template"] = form.name
            _gguf(folder, strategy, is_adapter, model, tokenizer, encoder, tmp, quantization, label, prompts, report)
            if fmt == "ollama":
                (tmp / "Modelfile").write_text(text)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    except BaseException:
        failed = out.with_name(out.name + ".failed")
        if _written_by_export(failed):
            shutil.rmtree(failed, ignore_errors=True)
        if report.get("verification") and not failed.exists():
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
            tmp.rename(failed)
            _log(f"the failed export is kept for inspection in {failed}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    report["output"] = str(out)
    if fmt == "ollama":
        report["ollama"] = _ollama_create(name, out)
    return report


def _training_prompts(folder: Path, strategy) -> list[str]:
    """The first user prompts of the job's training data; general prompts when it can't be read."""
    from contract.job_folder import JOB_FILE
    from inputs.data.preference import read_for_stage

    job_file = folder.parent / JOB_FILE
    try:
        dataset = json.loads(job_file.read_text())["dataset"]
        rows = read_for_stage(dataset, strategy.cfg)
        prompts = [next(m["content"] for m in r.messages if m["role"] == "user") for r in rows if r.messages]
        prompts = prompts[:VERIFY_PROMPTS_FROM_DATA]
    except (OSError, KeyError, ValueError, StopIteration, TypeError, UserError):
        prompts = []
    if prompts:
        _log(f"verify prompts: the first {len(prompts)} of the job's training data ({dataset})")
        return prompts
    _log("verify prompts: general ones (the job's training data is not readable from here)")
    return list(GENERAL_VERIFY_PROMPTS)


def _gguf(folder, strategy, is_adapter, model, tokenizer, encoder, tmp, quantization, label, prompts, report) -> None:
    from trainer.export.verify import require, verify

    path = tmp / "model.gguf"
    written = write_gguf(_weights(folder, strategy, is_adapter), folder, path, quantization, label,
                         encoder.template, strategy.cfg.training_args.max_seq_length)
    _log(f"gguf: {path.name} written in {written['seconds']:.1f} s; tensor types {written['tensor_types']}")
    result = verify(path, model, tokenizer, encoder, prompts, quantization)
    report.update(gguf=written, verification=result.to_dict())
    _log(_verdict(result))
    require(result, f"the {quantization} GGUF")


def _adapter(folder, strategy, model, tokenizer, encoder, tmp, label, prompts, report) -> None:
    from trainer.export.gguf_adapter import convert_adapter
    from trainer.export.verify import require, verify
    from trainer.export.weights import ModelWeights

    base_dir = base_model_folder(strategy)
    path = tmp / "adapter.gguf"
    written = convert_adapter(folder, json.loads((base_dir / "config.json").read_text()), path, label)
    _log(f"adapter gguf: {path.name} ({written['lora_pairs']} LoRA pairs, rank {written['rank']}, alpha {written['alpha_written']})")
    # Verified the way it is used: llama.cpp applies it to the base model's GGUF.
    with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
        base_gguf = Path(scratch) / "base.gguf"
        gguf_model.convert(ModelWeights(base_dir), folder, base_gguf, "f32", label + "-base", encoder.template.jinja,
                           strategy.cfg.training_args.max_seq_length)
        result = verify(base_gguf, model, tokenizer, encoder, prompts, "f32", lora_path=path)
    report.update(adapter=written, verification=result.to_dict())
    _log(_verdict(result))
    require(result, "the GGUF LoRA adapter (on the f32 base)")


def _verdict(r) -> str:
    how = (f"max |logit diff| {r.max_abs_logit_diff:.2e} = {r.relative_logit_diff:.1e} of the largest logit "
           f"{r.logit_scale:.1f} (tolerance {r.tolerance:.0e})" if r.tolerance is not None
           else f"top-1 agreement {r.top1_agreement:.1%}")
    return (f"verify vs PyTorch on {r.prompts} prompts: tokenization {'identical' if r.tokenization_equal else 'DIFFERENT'}; "
            f"{how}; greedy text {'identical' if r.greedy_equal else 'different'}; "
            f"stops {'like PyTorch' if r.stops_like_pytorch else 'NOT like PyTorch'} -> {'PASS' if r.passed else 'FAIL'}")
