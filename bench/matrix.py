"""Speed on the settings users write: sequence length x batch x method, llamafarm against the Trainer + PEFT script.

    .venv/bin/python -m bench.matrix --quick          # 4 cells, about 15 minutes on 2 cores
    .venv/bin/python -m bench.matrix                  # every cell: 4 lengths x 3 batches x 3 methods (hours)
    .venv/bin/python -m bench.matrix --cells 1024x1:full,512x8:lora-all-r16
    .venv/bin/python -m bench.matrix --cells 512x4:lora-qv-r8 --runners local,container
    .venv/bin/python -m bench.matrix --cells 1024x1:lora-qv-r8 --rounds 2   # each side twice, B L L B, pooled
    .venv/bin/python -m bench.matrix --quick --model real    # the pretrained SmolLM2-135M-Instruct instead
    .venv/bin/python -m bench.matrix --quick --unpacked      # llamafarm with dataset.packing: false
    .venv/bin/python -m bench.matrix --cells 1024x1:lora-qv-r8 --precision fp32   # both sides in fp32

A cell is LENGTHxBATCH:METHOD (methods: bench/model.py METHODS; --cells choices outside the full matrix:
lora-all-r64, the all-linear LoRA at rank 64, and lora-all-r16-gc and full-gc, those with gradient
checkpointing on both sides). Each cell trains the SmolLM2-135M-
shaped model (bench/model.py; --model real: the pretrained SmolLM2-135M-Instruct, the same shape with its
own tokenizer) on its own rows of LENGTH/4 to LENGTH tokens (mixed lengths, as real
data has) for 2 warm-up and 3 timed (--steps) optimizer steps per side, one side after the other in the same run;
a cell of batch B times at least TIMED_ROWS / B steps (8 at batch 1), so the baseline's timed rows,
whose lengths set its attention's cost per token, are never just three:
- the baseline, bench/baseline.py: padded batches of BATCH rows cut at LENGTH, in whichever of fp32
  and bf16 ran the matmul faster on this machine (the harder baseline), or in --precision;
- llamafarm, `finetune start` with bench/strategy.yaml and only the cell's settings set
  (per_device_train_batch_size, max_seq_length, the method); everything else is the project's
  defaults and its own decisions (precision, packing, attention, compile), printed per cell; --precision
  sets training_args.precision too, so both sides run the precision the other CPU kind would pick
  (fp32 on a Zen shows the fp32 path of an Intel Xeon where bf16 is the slower precision).
Printed per cell: real tokens/s after the warm-up steps, peak RSS, MFU against the measured matmul
peak (the higher of a measurement at the start and one at the end of the run), the ratio, and each
side's loss after training on the same held-out rows (~8 x LENGTH tokens of other text); at the end a
markdown table (docs/PERFORMANCE.md), result.json (also rewritten after every cell) and matrix.png
(bench/matrix_plot.py). A side that does not finish (killed for memory) leaves its cell without a
ratio, and the matrix goes on. With --rounds N each side runs N times per cell, alternated (B L L B ...),
and its tokens/s is over all its timed steps: the two sides of a cell run minutes apart, and this
machine's speed has moved one side's by tens of percent between runs. Every runner of --runners takes
part in every round (B L C, C L B, ...), so the runners are compared alternated too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench import measure
from bench.cpu_lora import ROOT, CommandFailed, run_baseline, run_project
from bench.matrix_plot import SIDES, plot_matrix, title_of, unfinished
from bench.model import BENCH_MODELS, METHOD_NAMES, METHODS, SHAPE, bench_model, make_rows, method_settings, write_rows

LENGTHS = (256, 512, 1024, 2048)
BATCHES = (1, 4, 8)
QUICK = ("256x8:lora-qv-r8", "512x4:lora-qv-r8", "512x4:lora-all-r16", "512x4:full")
TIMED_STEPS = 3  # per side, after measure.WARMUP_STEPS untimed ones (--steps)
# At least this many rows per side in the timed steps: at batch 1 the baseline's step is one row of
# LENGTH/4 to LENGTH tokens, and three such rows (seen: 301, 623 and 472 of 1024 against a mean of
# 640) move its tokens/s by several percent either way, the attention's cost per token being the row's.
TIMED_ROWS = 8
TARGETS = {"quick": 2.0, "full": 1.5}  # the least ratio per cell (issue #24)
# --precision: auto, the baseline in the faster precision here and llamafarm deciding its own; or both sides in one.
PRECISION_CHOICES = ("auto", "fp32", "bf16")
LOSS_APART = 0.02  # the most the two sides' held-out losses may differ, relative to the baseline's (issue #24)
EVAL_ROWS_TOKENS = 8  # held-out rows per cell: about this many times LENGTH tokens


def timed_steps(cell: str, least: int) -> int:
    """Timed steps per side for a cell: `least`, or enough for TIMED_ROWS rows at its batch size."""
    return max(least, math.ceil(TIMED_ROWS / parse_cell(cell)[1]))


def parse_cell(text: str) -> tuple[int, int, str]:
    try:
        shape, method = text.split(":")
        length, batch = (int(n) for n in shape.split("x"))
    except ValueError:
        sys.exit(f"cell {text!r}: expected LENGTHxBATCH:METHOD, e.g. 512x4:lora-qv-r8")
    if method not in METHOD_NAMES:
        sys.exit(f"cell {text!r}: unknown method {method!r}; valid: {', '.join(METHOD_NAMES)}")
    return length, batch, method


def all_cells() -> list[str]:
    return [f"{length}x{batch}:{method}" for method in METHODS for length in LENGTHS for batch in BATCHES]


def write_strategy(folder: Path, length: int, batch: int, method: str, steps: int, packed: bool = True,
                   precision: str = "auto") -> Path:
    """bench/strategy.yaml's bench_cpu_lora with the cell's method, batch and length (a method block is
    replaced whole: full fine-tuning takes none of LoRA's keys); `packed` False: dataset.packing false;
    `precision` other than auto: training_args.precision."""
    import yaml

    strategy = yaml.safe_load((ROOT / "bench" / "strategy.yaml").read_text())["bench_cpu_lora"]
    config = strategy["fine_tuner"]["config"]
    config["method"], checkpointing = method_settings(method)
    if checkpointing:
        config["training_args"]["gradient_checkpointing"] = True
    config["training_args"].update(per_device_train_batch_size=batch, max_seq_length=length, max_steps=steps)
    if precision != "auto":
        config["training_args"]["precision"] = precision
    if not packed:
        config.setdefault("dataset", {})["packing"] = False
    path = folder / "strategy.yaml"
    path.write_text(yaml.safe_dump({"bench_matrix": strategy}, sort_keys=False))
    return path


def cell_rows(tokenizer, length: int, batch: int, steps: int) -> list[dict]:
    """A cell's training rows: enough for `steps` packed steps of batch x length tokens (the baseline
    needs fewer), of lengths from a quarter of `length` to all of it."""
    return make_rows(tokenizer, int(1.3 * steps * batch * length) + length, seed=length + batch,
                     lengths=(max(16, length // 4), length))


def row_lengths(tokenizer, rows: list[dict], length: int) -> list[int]:
    """Each of the cell's rows in tokens, with its end-of-text token, cut at `length`."""
    return [min(length, len(tokenizer(r["text"])["input_ids"]) + 1) for r in rows]


def baseline_flags(length: int, batch: int, method: str) -> tuple[str, ...]:
    """bench/baseline.py's flags for a cell: its batch, its length and its method."""
    return ("--batch-size", str(batch), "--max-length", str(length), "--method", method)


def cell_flops_per_token(tokenizer, rows: list[dict], length: int, method: str) -> float:
    """Model FLOPs per real token of one pass over the cell's rows, each cut at `length` (bench.measure.lora_flops)."""
    lengths = row_lengths(tokenizer, rows, length)
    return measure.lora_flops(SHAPE, lengths, weight_gradients=method.startswith("full")) / sum(lengths)


def prepare_cell(cell: str, workdir: str, prefix: str, steps: int, model_name: str = "shape") -> SimpleNamespace:
    """A one-cell benchmark's folder (WORKDIR/PREFIX-time/CELL), the model (bench/model.py BENCH_MODELS) and
    its tokenizer, the cell's training rows written there, and its strategy with `steps` steps (bench.heap,
    bench.mfu)."""
    from transformers import AutoTokenizer

    length, batch, method = parse_cell(cell)
    bench_dir = Path(workdir).expanduser().resolve()
    work = bench_dir / time.strftime(f"{prefix}-%Y%m%d-%H%M%S") / cell.replace(":", "-")
    work.mkdir(parents=True)
    model = bench_model(model_name, bench_dir)
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = cell_rows(tokenizer, length, batch, steps)
    return SimpleNamespace(work=work, model=model, tokenizer=tokenizer, rows=rows, length=length, method=method,
                           data=write_rows(rows, work / "train.jsonl"),
                           strategy=write_strategy(work, length, batch, method, steps))


def run_cell(cell: str, work: Path, model: Path, tokenizer, precision: str, env: dict, runners: list[str],
             steps: int, rounds: int = 1, packed: bool = True, forced: str = "auto") -> dict:
    """One cell, both sides; `precision` is the baseline's, `forced` llamafarm's setting (auto: its own decision)."""
    length, batch, method = parse_cell(cell)
    folder = work / cell.replace(":", "-")
    folder.mkdir()
    rows = cell_rows(tokenizer, length, batch, steps)
    data = write_rows(rows, folder / "train.jsonl")
    # Held-out rows of the same lengths, other text: both sides report their loss on these same tokens.
    evals = write_rows(make_rows(tokenizer, EVAL_ROWS_TOKENS * length, seed=length + batch + 1,
                                 lengths=(max(16, length // 4), length)), folder / "eval.jsonl")
    flops_per_token = cell_flops_per_token(tokenizer, rows, length, method)
    extra = baseline_flags(length, batch, method)
    strategy = write_strategy(folder, length, batch, method, steps, packed, forced)

    def ours_on(runner: str) -> dict:
        return _side_or_failure(cell, f"llamafarm's {runner} runner", lambda: run_project(
            folder, model, data, evals, env, strategy="bench_matrix", strategy_file=strategy, runner=runner))

    runs = {side: [] for side in ("baseline", *runners)}
    for side in alternation(rounds, runners):
        if runs[side] and runs[side][-1].get("failed"):
            continue  # one that ran out of memory will again: not another few minutes for it
        runs[side].append(ours_on(side) if side != "baseline" else _side_or_failure(
            cell, "the baseline", lambda: run_baseline(folder, model, data, evals, precision, steps, env, extra=extra)))
    baseline, sides = pooled(runs["baseline"]), {runner: pooled(runs[runner]) for runner in runners}
    ours = sides[runners[0]]
    decisions = {k: ours["decisions"].get(k, {}).get("value") for k in (
        "precision", "attention", "attention_softmax", "sequence_kernel", "attention_segments", "compile", "packing",
        "lora_dropout", "layer_kernel")}
    result = {"cell": cell, "length": length, "batch": batch, "method": method, "flops_per_token": flops_per_token,
              "baseline": baseline, "project": ours, "decisions": decisions,
              "ratio": _both(ours["tokens_per_second"], baseline["tokens_per_second"], lambda a, b: a / b),
              "runners": {runner: side["tokens_per_second"] for runner, side in sides.items()},
              "loss_apart": _both(ours["eval_loss"], baseline["eval_loss"], lambda a, b: abs(a - b) / b)}
    print(f"{cell}: llamafarm {_number(ours['tokens_per_second'])} vs baseline {_number(baseline['tokens_per_second'])} "
          f"real tokens/s = {_ratio(result)}; peak RSS {_number(ours['peak_rss_mb'], ',.0f')} vs "
          f"{_number(baseline['peak_rss_mb'], ',.0f')} MB; held-out loss {_number(ours['eval_loss'], '.4f')} vs "
          f"{_number(baseline['eval_loss'], '.4f')} (after {_number(_trained(ours), ',')} vs "
          f"{_number(_trained(baseline), ',')} tokens trained); {decisions}; per runner "
          f"{', '.join(f'{k} {_number(v)}' for k, v in result['runners'].items())} tokens/s", flush=True)
    if rounds > 1:
        print(f"{cell}: per run, in order {' '.join(alternation(rounds, runners))}: " + "; ".join(
            f"{side} {', '.join(_number(r['tokens_per_second']) for r in side_runs)}" for side, side_runs in runs.items())
            + " tokens/s", flush=True)
    return result


def alternation(rounds: int, runners: tuple[str, ...] = ("local",)) -> list[str]:
    """The order of a cell's runs: the baseline and llamafarm (each of its runners) alternated as
    B L L B B L ..., so a drift of the machine's speed over the cell weighs on every side alike (one
    round: B L, as before); with two runners B L C, C L B, B L C ..."""
    order = []
    for i in range(rounds):
        order += ["baseline", *runners] if i % 2 == 0 else [*reversed(runners), "baseline"]
    return order


def pooled(runs: list[dict]) -> dict:
    """One side's runs of a cell as one: real tokens/s over all their timed steps, the highest peak RSS, the
    first run's held-out loss and decisions (the runs train the same rows alike); a failed run if any."""
    failed = next((r for r in runs if r.get("failed")), None)
    if failed is not None or len(runs) == 1:
        return failed or runs[0]
    tokens, seconds = sum(r["timed_tokens"] for r in runs), sum(r["timed_seconds"] for r in runs)
    return {**runs[0], "tokens_per_second": tokens / seconds, "timed_tokens": tokens, "timed_seconds": seconds,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": [r["tokens_per_second"] for r in runs]}


def _side_or_failure(cell: str, side: str, run) -> dict:
    """One side of a cell, or what stopped it (e.g. killed for memory, -9: the padded baseline cannot run
    2048 x 4 in 24 GB): the matrix records the failure in the cell and goes on to the next one."""
    try:
        return run()
    except CommandFailed as failed:
        print(f"{cell}: {side} did not finish ({failed.cause}); the matrix goes on", flush=True)
        return {"failed": failed.cause, "tokens_per_second": None, "peak_rss_mb": None, "eval_loss": None,
                "decisions": {}}


def _trained(side: dict) -> int | None:
    """Real tokens one run of a side trained on in all its steps: packing puts more in each step than
    the baseline's padded batches, so after the same steps ours has seen more (the held-out losses say so
    most after full fine-tuning of a pretrained model)."""
    return sum(side["step_tokens"]) if side.get("step_tokens") else None


def _both(ours, baseline, combine):
    """combine(ours, baseline), or None where either side did not finish."""
    return combine(ours, baseline) if ours is not None and baseline is not None else None


def table(results: list[dict], peak: float) -> str:
    lines = ["| length | batch | method | Trainer+PEFT tokens/s | llamafarm tokens/s | ratio | peak RSS MB (PEFT / ours) "
             "| MFU (PEFT / ours) | held-out loss (PEFT / ours) | llamafarm decisions |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, o = r["baseline"], r["project"]
        mfu = [100 * side["tokens_per_second"] * r["flops_per_token"] / (peak * 1e9) if side["tokens_per_second"]
               else None for side in (b, o)]
        d = r["decisions"]
        chosen = (f"{d['precision']}, {d['attention']}, compile {d['compile']}{_kernels(d)}" if d.get("precision")
                  else "-")
        lines.append(f"| {r['length']} | {r['batch']} | {r['method']} | {_number(b['tokens_per_second'])} | "
                     f"{_number(o['tokens_per_second'])} | {_ratio(r)} | {_number(b['peak_rss_mb'], ',.0f')} / "
                     f"{_number(o['peak_rss_mb'], ',.0f')} | {_number(mfu[0])}% / {_number(mfu[1])}% | "
                     f"{_number(b['eval_loss'], '.3f')} / {_number(o['eval_loss'], '.3f')} | {chosen} |")
    return "\n".join(lines)


def _number(value, spec: str = ".0f") -> str:
    return format(value, spec) if value is not None else "-"


def _ratio(result: dict) -> str:
    if result["ratio"] is not None:
        return f"{result['ratio']:.2f}x"
    return " and ".join(unfinished(result)) + " failed"


def _kernels(decisions: dict) -> str:
    """The table's note of the CPU kernels' decisions: the LoRA dropout's, and the layer kernel where it is ours."""
    value = decisions.get("lora_dropout")
    dropout = f", dropout {value}" if value not in (None, "none") else ""
    return dropout + (", layer kernel" if decisions.get("layer_kernel") == "kernel" else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--cells", help="comma-separated LENGTHxBATCH:METHOD cells instead")
    p.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per side, at least (more: steadier, slower; batch 1 times 8)")
    p.add_argument("--rounds", type=int, default=1, help="runs per side (and runner) and cell, alternated B L L B "
                   "... (2: a drift of the machine over the cell weighs on both sides alike)")
    p.add_argument("--runners", default="local", help="llamafarm's runners, comma-separated; the first one is "
                   "compared with the baseline, the others with it (e.g. local,container)")
    p.add_argument("--model", choices=BENCH_MODELS, default="shape", help="shape: the random-init SmolLM2-shaped "
                   "model; real: the pretrained SmolLM2-135M-Instruct (bench/model.py)")
    p.add_argument("--unpacked", action="store_true", help="llamafarm with dataset.packing: false, each batch "
                   "padded to its longest row as the baseline's are (what a user who turns packing off gets)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help="auto: the baseline in the "
                   "faster precision here, llamafarm deciding its own; fp32 or bf16: both sides in it")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "llamafarm-bench"))
    a = p.parse_args(argv)
    cells = a.cells.split(",") if a.cells else list(QUICK) if a.quick else all_cells()
    for cell in cells:
        parse_cell(cell)

    import torch
    from transformers import AutoTokenizer

    work = Path(a.workdir).expanduser().resolve()
    run_dir = work / time.strftime("matrix-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    cores = len(os.sched_getaffinity(0))
    peaks = measure.matmul_peak(measure.peak_thread_counts())
    precision = measure.faster_precision(peaks) if a.precision == "auto" else a.precision
    machine = (f"{measure.cpu_model()}, {cores} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
               f"{', the real SmolLM2-135M-Instruct' if a.model == 'real' else ''}"
               f"{', llamafarm with packing off' if a.unpacked else ''}"
               f"{f', both sides in {a.precision} (--precision)' if a.precision != 'auto' else ''}")
    print(f"machine: {machine}; matmul peak {peaks} GFLOP/s; baseline precision {precision}; {len(cells)} cells, "
          f"{measure.WARMUP_STEPS} warm-up and at least {a.steps} timed steps per side", flush=True)
    model = bench_model(a.model, work)
    tokenizer = AutoTokenizer.from_pretrained(model)
    runners = a.runners.split(",")
    results = []
    for cell in cells:  # result.json after every cell: a long matrix stopped part way keeps what it measured
        steps = measure.WARMUP_STEPS + timed_steps(cell, a.steps)
        results.append(run_cell(cell, run_dir, model, tokenizer, precision, dict(os.environ), runners, steps,
                                a.rounds, packed=not a.unpacked, forced=a.precision))
        _save(run_dir, machine, peaks, precision, results)
    # MFU against the higher of two peak measurements, at the start and now: a peak read during a slow
    # spell of the machine (seen: 855 against 972-1,030 GFLOP/s in other runs the same day) would inflate it.
    at_end = measure.matmul_peak(measure.peak_thread_counts())
    peaks = {name: max(rate, at_end[name]) for name, rate in peaks.items()}
    # MFU against the peak of the precision both sides ran (--precision), else the faster one's.
    peak = max(peaks.values()) if a.precision == "auto" else peaks[a.precision]
    target = TARGETS["quick" if a.quick else "full"]
    print("\n" + table(results, peak))
    short = [r["cell"] for r in results if r["ratio"] is not None and r["ratio"] < target]
    apart = [f"{r['cell']} ({100 * r['loss_apart']:.1f}%)" for r in results
             if r["loss_apart"] is not None and r["loss_apart"] > LOSS_APART]
    failed = [f"{r['cell']} ({side}: {r[key]['failed']})" for r in results for side, key in SIDES if r[key].get("failed")]
    if failed:
        print("did not finish (no ratio): " + "; ".join(failed))
    print(f"\nmatmul peak for MFU: {peak} GFLOP/s (the higher of the run's start, and its end: {at_end}); "
          f"cells under {target}x: {', '.join(short) or 'none'}; held-out losses more than {100 * LOSS_APART:.0f}% "
          f"apart: {', '.join(apart) or 'none'}")
    for runner in runners[1:]:
        for r in results:
            relative = _both(r["runners"][runner], r["runners"][runners[0]], lambda a, b: f"{a / b:.3f}x")
            print(f"{r['cell']}: {runner} runner {_number(r['runners'][runner])} tokens/s = "
                  f"{relative or '-'} the {runners[0]} runner")
    saved = _save(run_dir, machine, peaks, precision, results)
    print(f"result: {run_dir / 'result.json'}; picture: {plot_matrix(results, run_dir / 'matrix.png', title_of(saved))}")
    return 1 if short or apart else 0


def _save(run_dir: Path, machine: str, peaks: dict, precision: str, results: list[dict]) -> dict:
    saved = {"machine": machine, "peaks": peaks, "precision": precision, "results": results}
    (run_dir / "result.json").write_text(json.dumps(saved, indent=1))
    return saved


if __name__ == "__main__":
    sys.exit(main())
