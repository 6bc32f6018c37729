"""The GPU check: the CUDA paths through the real CLI and training entrypoint, one step after another.

    bash scripts/gpu_check.sh --out DIR [--carry .gpu-carry] [--dry-run]

Steps (each a function below): install the carried wheels and join the real model's wheel; record the
environment; `tiny_demo` on the device; a LoRA, a full and (when bitsandbytes is there) a QLoRA job on
the real SmolLM2-135M-Instruct in bf16 (bench/gpu_check.yaml); `finetune estimate` beside the measured
peak memory; a GGUF export of the LoRA result (verified by llama.cpp on CPU when llama-cpp-python is
importable, else written without verification and labelled so); and the benchmark's GPU mode, the
Trainer + PEFT baseline (bench/baseline.py) and our trainer on the same model, rows and settings, one
after the other. A failing step is a finding: its error is recorded and the next steps still run.
Writes gpu_check.json and gpu_check.txt (and each command's log) into --out.

--dry-run: the same steps on CPU with the builtin tiny model and a few steps each (the CI test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu_carry import MANIFEST, PLATFORM
from contract.plan import all_decisions
from inputs.models.cache import file_sha256

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ROOT / "bench" / "gpu_check.yaml"
DATASET = ROOT / "demos" / "datasets" / "medical_qa.jsonl"
EVAL_SET = ROOT / "demos" / "datasets" / "medical_qa_eval.jsonl"
JOBS = {"lora": "gpu_check_lora", "full": "gpu_check_full", "qlora": "gpu_check_qlora"}


@dataclass(frozen=True)
class Mode:
    """Where and on what the check runs. `model` is the base model of every real-model step."""

    name: str
    device: str
    model: str
    precision: str  # of the jobs and of both benchmark sides
    sets: tuple[str, ...]  # more --set for every job (the dry run's short runs)
    bench_tokens: int  # real training tokens per benchmark side (enough for steps after the 2 warm-up ones)


GPU = Mode("gpu", "cuda", "builtin:smollm2-135m-instruct", "bf16", (), 60000)
# On CPU fp32: bf16 is slower than fp32 on some CPUs here (docs/PERFORMANCE.md), and speed is not the point.
DRY_RUN = Mode("dry-run", "cpu", "builtin:tiny-llama-spm", "fp32", ("training_args.max_steps=2",), 4000)


class Skipped(Exception):
    def __init__(self, reason: str, **details):
        super().__init__(reason)
        self.details = details


class StepFailed(Exception):
    pass


@dataclass
class Check:
    mode: Mode
    out: Path
    carry: Path | None
    results: dict = field(default_factory=dict)
    jobs: dict = field(default_factory=dict)  # step name -> job folder

    @property
    def home(self) -> Path:
        return self.out / "llamafarm-home"

    @property
    def site(self) -> Path:
        return self.out / "site-packages"  # the carried wheels are installed here

    def env(self) -> dict:
        path = os.pathsep.join([str(self.site), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return {**os.environ, "PYTHONPATH": path, "LLAMAFARM_HOME": str(self.home), "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"}

    def run(self, name: str, cmd: list[str]) -> str:
        """Run a command with its output in <out>/logs/<name>.log; its output, or StepFailed with its tail."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        text = log.read_text()
        if proc.returncode != 0:
            raise StepFailed(f"exit {proc.returncode}: " + " ".join(cmd[2:6]) + " ...\n" + text[-1500:])
        return text

    def cli(self, name: str, *args: str) -> str:
        # The real CLI (orchestrator/cli), started as `python -m` so a checkout runs without installing.
        return self.run(name, [sys.executable, "-m", "orchestrator.cli", *args])

    def python(self, name: str, code: str) -> dict:
        """Run Python code in a fresh process (with the carried packages); the JSON of its last line."""
        return json.loads(self.run(name, [sys.executable, "-c", code]).strip().splitlines()[-1])


def _has(module: str, check: Check) -> bool:
    """Whether `module` imports where the jobs run (from the environment step, else asked afresh)."""
    modules = check.results.get("environment", {}).get("modules")
    if modules is not None and module in modules:
        return modules[module] is not None
    code = f"import importlib.util, json; print(json.dumps(importlib.util.find_spec({module!r}) is not None))"
    try:
        return check.python(f"has-{module}", code)
    except StepFailed:
        return False


def _manifest(carry: Path) -> dict:
    found = sorted(carry.glob(f"*/{MANIFEST}"))
    if not found:
        raise StepFailed(f"{carry} holds no bundle ({carry}/N/{MANIFEST}); prepare it with python -m bench.gpu_carry")
    return json.loads(found[0].read_text())


def _join(carry: Path, name: str, spec: dict, dest: Path) -> Path:
    """One file that travelled in parts, joined into `dest` and checked against its sha256."""
    parts = [next(carry.glob(f"*/{spec['kind']}/{p}"), None) for p in spec["parts"]]
    missing = [p for p, f in zip(spec["parts"], parts) if f is None]
    if missing:
        raise StepFailed(f"parts {missing} of {name} are not in {carry}: carry every bundle, one per call")
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / name).open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    if file_sha256(dest / name) != spec["sha256"]:
        raise StepFailed(f"{name} joined from its parts does not match its sha256: a part was damaged in transit")
    return dest / name


def step_install(check: Check) -> dict:
    if check.carry is None or not check.carry.is_dir():
        raise Skipped(f"no carry folder ({check.carry}); the packages the steps need must already be installed")
    manifest = _manifest(check.carry)
    present = sorted(int(p.parent.name) for p in check.carry.glob(f"*/{MANIFEST}"))
    if len(present) != manifest["bundles"]:
        raise StepFailed(f"bundles {present} of {manifest['bundles']} are here; carry each one (docs/GPU.md)")
    staging = check.out / "carried"
    for name, spec in manifest["joined"].items():
        # The model's wheel goes where the builtin looks before downloading (inputs/models/wheel.py);
        # the dry run's model is the tiny builtin, so a carried model is only joined and checked.
        to_cache = spec["kind"] == "model" and check.mode.device == "cuda"
        dest = (_cache_root(check) / "downloads") if to_cache else staging
        if spec["kind"] == "model" and not to_cache:
            dest = check.out / "carried-model"
        _join(check.carry, name, spec, dest)
    wheels = sorted({w.name: w for w in check.carry.glob("*/wheels/*.whl")}.values()) + sorted(staging.glob("*.whl"))
    if wheels:
        # --no-deps into a folder of our own: the device's own packages (torch, transformers) stay as they are.
        # The dry run (Python 3.11 here) only asks pip whether every wheel installs on the device's 3.12.
        where = ["--dry-run", *PLATFORM] if check.mode.device == "cpu" else []
        check.run("install", [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-index",
                              "--no-deps", "--target", str(check.site), *where, *map(str, wheels)])
    return {"bundles": manifest["bundles"], "installed": [w.name for w in wheels],
            "joined": sorted(manifest["joined"]), "llama_cpp": manifest.get("llama_cpp"),
            "bitsandbytes": manifest.get("bitsandbytes")}


def _cache_root(check: Check) -> Path:
    code = "import json; from contract.paths import cache_root; print(json.dumps(str(cache_root())))"
    return Path(check.python("cache-root", code))


ENV_CODE = """
import importlib, json, platform, torch
mods = {}
for m in ("pydantic", "datasets", "gguf", "bitsandbytes", "llama_cpp", "transformers", "peft", "accelerate"):
    try:
        mods[m] = getattr(importlib.import_module(m), "__version__", "present")
    except Exception as e:
        mods[m] = None
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
                  "cores": len(__import__("os").sched_getaffinity(0)), "modules": mods}))
"""


def step_environment(check: Check) -> dict:
    env = check.python("environment", ENV_CODE)
    env["machine"] = platform.node()
    if check.mode.device == "cuda" and not env["cuda_available"]:
        raise StepFailed(f"torch {env['torch']} sees no CUDA device: {env}")
    return env


def _job(check: Check, step: str, strategy: str, dataset: Path, sets: list[str], strategy_file: bool = True) -> dict:
    """`finetune start --foreground` of one strategy; what its job.json says."""
    before = set((check.home / "jobs").glob("*")) if (check.home / "jobs").exists() else set()
    # The local runner: the entrypoint as a process of this machine (no container engine on the GPU machine).
    args = ["finetune", "start", "--strategy", strategy, "--dataset", str(dataset), "--runner", "local", "--foreground"]
    if strategy_file:
        args += ["--strategy-file", str(STRATEGIES)]
    for s in sets:
        args += ["--set", s]
    error = None
    try:
        check.cli(step, *args)
    except StepFailed as exc:
        error = exc
    new = sorted(set((check.home / "jobs").glob("*")) - before) if (check.home / "jobs").exists() else []
    if not new:
        raise error or StepFailed("no job folder was written")
    job = json.loads((new[-1] / "job.json").read_text())
    check.jobs[step] = new[-1]
    if error:
        raise StepFailed(f"{error}\njob.json error: {job.get('error')}")
    decided = all_decisions(job)
    device = decided["device"]["value"]
    if device != check.mode.device:  # tiny_demo falls back to cpu: on the GPU machine that is a finding
        raise StepFailed(f"the job trained on {device}, not {check.mode.device}: {decided['device']['reason']}")
    metrics = [json.loads(x) for x in (new[-1] / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    # "job_status", not "status": the step's own status (ok, failed, skipped) is a different thing.
    return {"job_dir": str(new[-1]), "job_status": job["status"],
            "decisions": {k: v["value"] for k, v in decided.items()},
            "first_loss": losses[0] if losses else None, "final_loss": job.get("final_loss"),
            "tokens_per_second": job.get("tokens_per_second"), "measured": job.get("measured")}


def _sets(check: Check) -> list[str]:
    m = check.mode
    return [f"base_model.huggingface_id={m.model}", f"device={m.device}", f"training_args.precision={m.precision}",
            *m.sets]


def step_tiny_demo(check: Check) -> dict:
    # tiny_demo's own model, except in the dry run, which keeps to one tiny builtin (one build per machine).
    model = [f"base_model.huggingface_id={check.mode.model}"] if check.mode is DRY_RUN else []
    return _job(check, "tiny_demo", "tiny_demo", DATASET, [f"device={check.mode.device}", *model, *check.mode.sets],
                strategy_file=False)


def step_lora(check: Check) -> dict:
    return _job(check, "lora", JOBS["lora"], DATASET, _sets(check))


def step_full(check: Check) -> dict:
    return _job(check, "full", JOBS["full"], DATASET, _sets(check))


def step_qlora(check: Check) -> dict:
    if not _has("bitsandbytes", check):
        bnb = (check.results.get("install") or {}).get("bitsandbytes") or {}
        raise Skipped("skipped: bitsandbytes not carried", bitsandbytes=bnb or "size unknown (no carry manifest)")
    return _job(check, "qlora", JOBS["qlora"], DATASET, _sets(check))


def step_estimate(check: Check) -> dict:
    """The estimate for each job that ran, beside what it measured (GPU: max_memory_allocated; CPU: peak RSS)."""
    rows = {}
    for step in ("lora", "full", "qlora"):
        if step not in check.jobs or check.results.get(step, {}).get("status") != "ok":
            continue
        args = ["finetune", "estimate", "--strategy", JOBS[step], "--strategy-file", str(STRATEGIES),
                "--dataset", str(DATASET), "--device", check.mode.device, "--json"]
        for s in _sets(check):
            args += ["--set", s]
        text = check.cli(f"estimate-{step}", *args)  # the log: the command line, then the JSON (and stderr notes)
        predicted, _ = json.JSONDecoder().raw_decode(text[text.index("\n{") + 1:])
        measured = check.results[step]["measured"]
        key = "peak_gpu_mb" if check.mode.device == "cuda" else "peak_rss_mb"
        est_mb = predicted["peak_memory_mb"]
        rows[step] = {"estimated_peak_mb": est_mb, f"measured_{key}": measured.get(key),
                      "ratio": round(est_mb / measured[key], 3) if measured.get(key) else None,
                      "estimated_seconds": predicted.get("seconds"), "measured_seconds": measured.get("train_seconds"),
                      "estimate": predicted}
    if not rows:
        raise Skipped("no training job completed, so there is nothing to compare")
    return rows


def step_export(check: Check) -> dict:
    job = check.jobs.get("lora")
    if job is None or check.results.get("lora", {}).get("status") != "ok":
        raise Skipped("the LoRA job did not complete")
    out = check.out / "export"
    if _has("llama_cpp", check):
        check.cli("export", "finetune", "export", "--model-path", str(job / "final"), "--format", "gguf",
                  "--quantization", "q8_0", "--output", str(out), "--force")
        report = json.loads((out / "export_report.json").read_text())
        return {"verified": report["verification"]["passed"], "gguf": str(out / "model.gguf"),
                "verification": report["verification"]}
    code = f"import json; from bench.gpu_check import unverified_gguf; print(json.dumps(unverified_gguf({str(job / 'final')!r}, {str(out)!r})))"
    return {"verified": False, "label": "UNVERIFIED: llama-cpp-python is not importable here, so llama.cpp did not "
            "load this GGUF", **check.python("export", code)}


def unverified_gguf(folder: str, out: str) -> dict:
    """The q8_0 GGUF written the way `finetune export` writes it, without the llama.cpp comparison."""
    from contract.job_folder import read_job_strategy
    from trainer.export.run import _weights, write_gguf
    from trainer.generate import load_for_inference

    folder_path, out_path = Path(folder), Path(out)
    strategy, _ = read_job_strategy(folder_path)
    _, _, encoder, _ = load_for_inference(folder_path)
    out_path.mkdir(parents=True, exist_ok=True)
    is_adapter = (folder_path / "adapter_config.json").exists()
    written = write_gguf(_weights(folder_path, strategy, is_adapter), folder_path, out_path / "model.unverified.gguf",
                         "q8_0", "gpu-check", encoder.template, strategy.cfg.training_args.max_seq_length)
    return {"gguf": str(out_path / "model.unverified.gguf"), **written}


def step_bench(check: Check) -> dict:
    """bench.cpu_lora's two sides in the check's mode: the Trainer + PEFT script, then our trainer."""
    from bench import cpu_lora
    from bench.model import make_rows, write_rows

    m = check.mode
    code = ("import json; from trainer.models.builtin import builtin_path; "
            f"print(json.dumps(str(builtin_path({m.model!r}))))")
    model = Path(check.python("bench-model", code))
    work = check.out / "bench"
    work.mkdir(exist_ok=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    data = write_rows(make_rows(tokenizer, m.bench_tokens, seed=1), work / "train.jsonl")
    evals = write_rows(make_rows(tokenizer, max(m.bench_tokens // 20, 300), seed=2), work / "eval.jsonl")
    env = check.env()
    try:
        baseline = cpu_lora.run_baseline(work, model, data, evals, m.precision, -1, env, device=m.device)
        ours = cpu_lora.run_project(work, model, data, evals, env,
                                    sets=(f"device={m.device}", f"training_args.precision={m.precision}"))
    except SystemExit as exc:  # cpu_lora's runner exits with the failed command's tail
        raise StepFailed(str(exc)) from None
    keep = ("name", "tokens_per_second", "tokens", "eval_loss", "peak_rss_mb", "peak_gpu_mb")
    return {"model": m.model, "device": m.device, "precision": m.precision, "rows": len(data.read_text().splitlines()),
            "baseline": {k: baseline.get(k) for k in keep},
            "llamafarm": {k: ours.get(k) for k in keep} | {"peak_gpu_mb": _peak_gpu(ours)},
            "ratio": round(ours["tokens_per_second"] / baseline["tokens_per_second"], 3)}


def _peak_gpu(run: dict) -> float | None:
    job = json.loads((Path(run["job_dir"]) / "job.json").read_text())
    return job["measured"].get("peak_gpu_mb")


STEPS = [("install", step_install), ("environment", step_environment), ("tiny_demo", step_tiny_demo),
         ("lora", step_lora), ("full", step_full), ("qlora", step_qlora), ("estimate", step_estimate),
         ("export", step_export), ("bench", step_bench)]


def run_step(check: Check, name: str, fn) -> dict:
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        result = {"status": "ok", **fn(check)}
    except Skipped as s:
        result = {"status": "skipped", "reason": str(s), **s.details}
    except Exception as exc:  # a failing step is a finding; the others still run
        detail = str(exc) if isinstance(exc, StepFailed) else traceback.format_exc()[-1500:]
        result = {"status": "failed", "error": detail}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"   {result['status']} in {result['seconds']} s" + (f": {result.get('reason') or result.get('error', '')[:300]}"
                                                              if result["status"] != "ok" else ""), flush=True)
    return result


def _headline(name: str, r: dict) -> str:
    if r["status"] == "skipped":
        return r["reason"] + (f" (bitsandbytes: {r['bitsandbytes']})" if "bitsandbytes" in r else "")
    if r["status"] == "failed":
        return r["error"].strip().splitlines()[0][:160]
    if "final_loss" in r:
        mem = r["measured"] or {}
        return (f"loss {r['first_loss']} -> {r['final_loss']}, {r['tokens_per_second']} tokens/s, "
                f"peak GPU {mem.get('peak_gpu_mb', '-')} MB, peak RSS {mem.get('peak_rss_mb')} MB; {r['decisions']}")
    if name == "estimate":
        return "; ".join(f"{k}: estimated {v['estimated_peak_mb']} MB vs measured "
                         f"{next(x for key, x in v.items() if key.startswith('measured_peak'))} MB" for k, v in r.items()
                         if isinstance(v, dict))
    if name == "export":
        return ("verified by llama.cpp: " + str(r["verified"])) if "verification" in r else r["label"]
    if name == "bench":
        return (f"tokens/s: Trainer+PEFT {r['baseline']['tokens_per_second']:.0f}, llamafarm "
                f"{r['llamafarm']['tokens_per_second']:.0f} ({r['ratio']}x), {r['rows']} rows of {r['model']}")
    if name == "environment":
        return f"python {r['python']}, torch {r['torch']} (CUDA {r['cuda']}), gpu {r['gpu']}, {r['cores']} cores"
    if name == "install":
        return f"{len(r['installed'])} wheels from {r['bundles']} bundles; joined {r['joined']}"
    return "ok"


def report_text(report: dict) -> str:
    lines = [f"GPU check ({report['mode']}) {report['started']} on {report['machine']}, {report['seconds']} s"]
    for name, r in report["steps"].items():
        lines.append(f"{name:12} {r['status']:8} {r['seconds']:7.1f} s  {_headline(name, r)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.txt and the logs")
    p.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry", help="the bundles bench.gpu_carry prepared")
    p.add_argument("--dry-run", action="store_true", help="every step on CPU with the builtin tiny model")
    a = p.parse_args(argv)
    out = a.out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        print(f"Error: {out} is not empty; name a new folder for the report", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    check = Check(DRY_RUN if a.dry_run else GPU, out, a.carry.resolve() if a.carry else None)
    started, start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    for name, fn in STEPS:
        check.results[name] = run_step(check, name, fn)
    report = {"mode": check.mode.name, "started": started, "machine": platform.node(),
              "seconds": round(time.perf_counter() - start, 1), "base_model": check.mode.model,
              "steps": check.results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = report_text(report)
    (out / "gpu_check.txt").write_text(text)
    print(text, end="")
    return 0 if all(r["status"] != "failed" for r in check.results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
