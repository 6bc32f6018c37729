"""The `llamafarm` command line (host side). It never imports torch: training and generation run in
the `trainer` package, in a process a runner starts.

    llamafarm finetune strategies list
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from contract.errors import UserError

_STRATEGY_FILES = click.option(
    "--strategy-file",
    "strategy_files",
    multiple=True,
    type=click.Path(),
    help="Extra strategy YAML file or folder (repeatable; also $LLAMAFARM_STRATEGIES).",
)


def _emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


class _UserFacingError(click.ClickException):
    exit_code = 1


class _Root(click.Group):
    """Turns a UserError anywhere below into one clear line and exit 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise _UserFacingError(str(exc)) from None


@click.group(cls=_Root, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llamafarm", message="llamafarm %(version)s")
def cli():
    """Fine-tune open LLMs on your own data, on CUDA, Apple MPS or plain CPU.

    \b
    Example:
      llamafarm finetune start --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl
    """


@cli.group()
def finetune():
    """Strategies, training jobs and their progress.

    \b
    Example:
      llamafarm finetune strategies list
    """


# --- strategies ----------------------------------------------------------------------------------


@finetune.group()
def strategies():
    """List, show and validate strategies.

    \b
    Example:
      llamafarm finetune strategies show tiny_demo
    """


@strategies.command("list")
@_STRATEGY_FILES
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def strategies_list(strategy_files, as_json):
    """List the strategies with their model, method and device.

    \b
    Example:
      llamafarm finetune strategies list --json
    """
    from orchestrator import strategies as strat

    rows = []
    for name, entry in sorted(strat.discover(strategy_files).items()):
        cfg = (entry.raw.get("fine_tuner") or {}).get("config") or {} if isinstance(entry.raw, dict) else {}
        rows.append(
            {
                "name": name,
                "description": entry.raw.get("description", "") if isinstance(entry.raw, dict) else "",
                "base_model": (cfg.get("base_model") or {}).get("huggingface_id"),
                "method": (cfg.get("method") or {}).get("type", "lora"),
                "device": cfg.get("device", "auto"),
                "source": str(entry.source),
            }
        )
    if as_json:
        _emit_json(rows)
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['method']:<5} {r['device']:<4}  {r['base_model']}  {r['description']}")


@strategies.command("show")
@click.argument("name")
@_STRATEGY_FILES
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def strategies_show(name, strategy_files, as_json):
    """Show one strategy with every default filled in.

    \b
    Example:
      llamafarm finetune strategies show cpu_fine_tuning
    """
    import yaml

    from contract.strategy import resolved_dict
    from orchestrator import strategies as strat

    entry, strategy = strat.get(name, strategy_files)
    data = resolved_dict(strategy)
    if as_json:
        _emit_json({"name": name, "source": str(entry.source), "strategy": data})
        return
    click.echo(f"# {name} from {entry.source}")
    click.echo(yaml.safe_dump({name: data}, sort_keys=False).rstrip())


@strategies.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def strategies_validate(files):
    """Check strategy files (or folders of them); report every problem with its path.

    \b
    Example:
      llamafarm finetune strategies validate strategies/ my_strategy.yaml
    """
    from contract.errors import StrategyError
    from orchestrator import strategies as strat

    failures = 0
    for item in files:
        for path in strat.yaml_files(Path(item)):
            for name, raw in strat.read_strategy_file(path).items():
                try:
                    strat.validate(name, raw, str(path))
                    click.echo(f"ok      {name} ({path})")
                except StrategyError as exc:
                    failures += 1
                    click.echo(f"invalid {exc}", err=True)
    if failures:
        raise UserError(f"{failures} invalid strateg{'y' if failures == 1 else 'ies'}")


# --- jobs ----------------------------------------------------------------------------------------


@finetune.command("start")
@click.option("--strategy", "strategy_name", required=True, help="Strategy name (see `strategies list`).")
@click.option("--dataset", required=True, type=click.Path(), help="Training data: a JSONL file.")
@click.option("--set", "assignments", multiple=True, metavar="PATH=VALUE",
              help="Override a strategy value for this run, e.g. training_args.learning_rate=1e-4.")
@click.option("--runner", "runner_flag", default=None, help="Runner to use (default: the strategy's, else auto).")
@click.option("--foreground", is_flag=True, help="Stream progress and exit with the job's result.")
@click.option("--ignore-estimate", is_flag=True, help="Start even when the estimate says it will not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@_STRATEGY_FILES
def start(strategy_name, dataset, assignments, runner_flag, foreground, ignore_estimate, as_json, strategy_files):
    """Start a fine-tuning job; prints its id at once.

    \b
    Example:
      llamafarm finetune start --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl
    """
    from contract.job_folder import update_job
    from orchestrator import jobs
    from orchestrator import strategies as strat
    from orchestrator.backends import BACKENDS
    from orchestrator.platform import available_devices
    from orchestrator.runners import choose_runner
    from trainer.data.records import read_dataset
    from trainer.devices import choose_device
    from trainer.models.source import check_available

    entry, _ = strat.get(strategy_name, strategy_files)
    raw, overrides = strat.apply_overrides(entry.raw, assignments)
    strategy = strat.validate(strategy_name, raw, str(entry.source) + (" with --set" if overrides else ""))
    cfg = strategy.cfg
    backend = BACKENDS[strategy.fine_tuner.type]
    if not backend.available:
        raise UserError(f"strategy {strategy_name}: backend {strategy.fine_tuner.type!r}: {backend.note}")
    device = choose_device(cfg.device, cfg.fallback_device, available_devices())
    conversations = read_dataset(dataset, cfg.dataset.format, cfg.dataset.columns)
    eval_path = Path(cfg.dataset.eval_file).expanduser() if cfg.dataset.eval_file else None
    if eval_path:
        read_dataset(eval_path, cfg.dataset.format, cfg.dataset.columns)
    model_source = check_available(cfg.base_model)
    runner, runner_reason = choose_runner(runner_flag, cfg.runner)
    from orchestrator.estimate import estimate

    est = estimate(strategy, Path(dataset), device.value)
    if est.fits is False and not ignore_estimate:
        tips = "\n".join(f"  - {t}" for t in est.advice)
        raise UserError(
            f"strategy {strategy_name} needs about {est.peak_memory_mb:,.0f} MB on {device.value} but "
            f"{est.available_memory_mb:,.0f} MB are available (`llamafarm finetune estimate` shows the breakdown):\n"
            f"{tips}\n  - or pass --ignore-estimate to start anyway"
        )
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    say(f"strategy: {strategy_name} ({entry.source})" + (f"; overrides {overrides}" if overrides else ""))
    say(f"dataset: {dataset} ({len(conversations)} rows, {conversations[0].format} format)"
        + (f"; eval: {eval_path}" if eval_path else ""))
    say(f"base model: {cfg.base_model.huggingface_id} ({model_source})")
    say(f"device: {device.value} ({device.reason}; the trainer confirms it)")
    say(f"runner: {runner.name} ({runner_reason})")
    say(f"estimate: peak about {est.peak_memory_mb:,.0f} MB, about {_duration(est.seconds)} for {est.steps} steps"
        + (" (does not fit; --ignore-estimate)" if est.fits is False else ""))

    folder = jobs.create(strategy_name, strategy, entry.source, Path(dataset), eval_path, overrides, runner.name,
                         estimate={"peak_memory_mb": est.peak_memory_mb, "seconds": est.seconds, "steps": est.steps,
                                   "device": est.device})
    try:
        pid = runner.start(runner.launch_spec(folder))
    except OSError as exc:
        update_job(folder, status="failed", error=f"runner {runner.name} could not start: {exc}")
        raise UserError(f"runner {runner.name} could not start the job: {exc}") from None
    update_job(folder, pid=pid)
    if as_json:
        _emit_json({"job_id": folder.name, "job_dir": str(folder), "status": "pending", "pid": pid, "runner": runner.name})
    else:
        click.echo(folder.name)
    if foreground:
        from orchestrator.monitor import follow

        final = follow(folder, echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
        sys.exit(0 if final["status"] == "completed" else 1)


@finetune.command("monitor")
@click.option("--job-id", required=True, help="The job to watch.")
@click.option("--follow", "follow_", is_flag=True, help="Keep printing until the job ends.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Write loss, eval loss and learning-rate curves to this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def monitor(job_id, follow_, plot_path, as_json):
    """Show a job's progress: bar, loss with a sparkline, tokens/s and ETA; --plot draws the curves to a PNG.
    With --follow, exit 1 unless the job completes.

    \b
    Example:
      llamafarm finetune monitor --job-id tiny_demo-20260101-120000-ab12 --follow
    """
    from contract.job_folder import read_metrics
    from orchestrator import jobs
    from orchestrator import monitor as mon

    folder, job = jobs.get(job_id)
    if plot_path:
        from orchestrator.plot import plot_metrics

        metrics = read_metrics(folder)
        if not metrics:
            raise UserError(f"job {job_id} has no metrics yet; nothing to plot")
        written = plot_metrics(metrics, Path(plot_path), f"{job_id} ({job['status']})")
        click.echo(f"plot: {written}", err=as_json)
    if follow_:
        final = mon.follow(folder, echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
        if as_json:
            _emit_json(final)
        sys.exit(0 if final["status"] == "completed" else 1)
    s = mon.summary(job, read_metrics(folder))
    if as_json:
        _emit_json(s)
    else:
        click.echo(mon.render(s))


@finetune.command("jobs")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def jobs_cmd(as_json):
    """List jobs, oldest first.

    \b
    Example:
      llamafarm finetune jobs --json
    """
    from orchestrator import jobs

    all_jobs = jobs.list_jobs()
    if as_json:
        _emit_json(all_jobs)
        return
    if not all_jobs:
        click.echo("no jobs yet; start one with `llamafarm finetune start --strategy tiny_demo --dataset ...`")
    for job in all_jobs:
        loss = f"loss {job['final_loss']:.4f}" if job.get("final_loss") is not None else ""
        click.echo(f"{job['job_id']:<40} {job['status']:<9} {job.get('created_at', '')}  {loss}")


@finetune.command("stop")
@click.option("--job-id", required=True, help="The job to stop.")
def stop(job_id):
    """Stop a job: it saves a checkpoint, then ends with status `stopped`.

    \b
    Example:
      llamafarm finetune stop --job-id tiny_demo-20260101-120000-ab12
    """
    from contract.job_folder import FINISHED, now_iso, update_job
    from orchestrator import jobs
    from orchestrator.runners import get_runner

    folder, job = jobs.get(job_id)
    if job["status"] in FINISHED:
        raise UserError(f"job {job_id} already ended ({job['status']}); nothing to stop")
    if not job.get("pid"):
        update_job(folder, status="stopped", finished_at=now_iso())
        click.echo(f"job {job_id} had not started; marked stopped")
        return
    get_runner(job["runner"]).stop(job)
    click.echo(f"stop sent to job {job_id}; it saves a checkpoint, then ends (`llamafarm finetune monitor --job-id {job_id}`)")


@finetune.command("resume")
@click.option("--job-id", required=True, help="A stopped or failed job with a checkpoint.")
@click.option("--foreground", is_flag=True, help="Stream progress and exit with the job's result.")
def resume(job_id, foreground):
    """Continue a stopped or failed job from its newest complete checkpoint, in the same job folder.

    \b
    Example:
      llamafarm finetune resume --job-id tiny_demo-20260101-120000-ab12
    """
    from contract.job_folder import complete_checkpoints, update_job
    from orchestrator import jobs
    from orchestrator.runners import get_runner

    folder, job = jobs.get(job_id)
    if job["status"] in ("pending", "running"):
        raise UserError(f"job {job_id} is {job['status']}; only a stopped or failed job can be resumed")
    if job["status"] == "completed":
        raise UserError(f"job {job_id} already completed; start a new job to train further")
    checkpoints = complete_checkpoints(folder)
    if not checkpoints:
        raise UserError(
            f"job {job_id} has no complete checkpoint to resume from (it saves every training_args.save_steps "
            "steps, and on stop); start it again with `llamafarm finetune start`"
        )
    runner = get_runner(job["runner"])
    latest = checkpoints[-1]
    update_job(folder, status="pending", pid=None, error=None, finished_at=None,
               resume_from=str(latest.relative_to(folder)), resumes=job.get("resumes", 0) + 1)
    pid = runner.start(runner.launch_spec(folder))
    update_job(folder, pid=pid)
    click.echo(f"job {job_id} resumes from {latest.name} (runner {runner.name}, pid {pid})")
    if foreground:
        from orchestrator.monitor import follow

        sys.exit(0 if follow(folder)["status"] == "completed" else 1)


@finetune.command("estimate")
@click.option("--strategy", "strategy_name", required=True, help="Strategy name (see `strategies list`).")
@click.option("--dataset", type=click.Path(), default=None, help="Count tokens from this dataset (else an assumption, stated).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
              help="Device to judge against (default: what the strategy would get here).")
@click.option("--set", "assignments", multiple=True, metavar="PATH=VALUE", help="Override a strategy value.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_STRATEGY_FILES
def estimate_cmd(strategy_name, dataset, device, assignments, as_json, strategy_files):
    """Predict peak memory, time and disk for a strategy, and whether it fits this machine.

    \b
    Example:
      llamafarm finetune estimate --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl
    """
    from orchestrator import strategies as strat
    from orchestrator.estimate import estimate

    entry, _ = strat.get(strategy_name, strategy_files)
    raw, _ = strat.apply_overrides(entry.raw, assignments)
    strategy = strat.validate(strategy_name, raw, str(entry.source))
    est = estimate(strategy, Path(dataset) if dataset else None, _estimate_device(strategy, device))
    if as_json:
        _emit_json(est.to_dict())
        return
    _print_estimate(strategy_name, est)


def _estimate_device(strategy, flag: str) -> str:
    from orchestrator.platform import available_devices
    from trainer.devices import choose_device

    if flag != "auto":
        return flag
    cfg = strategy.cfg
    try:
        return choose_device(cfg.device, cfg.fallback_device, available_devices()).value
    except UserError:
        return cfg.device  # judged against the device it asks for, even if absent here


def _print_estimate(name: str, est) -> None:
    click.echo(f"{name}: {est.model} ({est.params / 1e6:,.1f}M parameters, {est.trainable_params / 1e6:,.2f}M trained; "
               f"shape from {est.shape_source})")
    parts = ", ".join(f"{k} {v:,.0f}" for k, v in est.memory_mb.items())
    avail = f" of {est.available_memory_mb:,.0f} MB available" if est.available_memory_mb else ""
    click.echo(f"memory on {est.device}: peak about {est.peak_memory_mb:,.0f} MB{avail} ({parts} MB)")
    click.echo(f"time: about {_duration(est.seconds)} for {est.steps} steps, {est.train_tokens:,} tokens "
               f"({est.tokens_per_epoch:,} per epoch, {est.tokens_source}); "
               f"{est.flops_per_token / 1e6:,.1f} MFLOP/token at {est.device_gflops:,.0f} GFLOP/s peak")
    click.echo("disk: " + ", ".join(f"{k} {v:,.0f} MB" for k, v in est.disk_mb.items()))
    if est.fits is None:
        click.echo(f"verdict: unknown, no {est.device} device on this machine to compare with")
    elif est.fits:
        click.echo("verdict: fits")
    else:
        click.echo("verdict: does NOT fit; to make it fit:")
        for tip in est.advice:
            click.echo(f"  - {tip}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@finetune.group()
def dataset():
    """Check a dataset before training.

    \b
    Example:
      llamafarm finetune dataset validate demos/datasets/medical_qa.jsonl --strategy tiny_demo
    """


@dataset.command("validate")
@click.argument("path", type=click.Path())
@click.option("--strategy", "strategy_name", default=None, help="Also measure tokens with this strategy's tokenizer and template.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_STRATEGY_FILES
def dataset_validate(path, strategy_name, as_json, strategy_files):
    """Rows, format, blank and duplicate rows; with --strategy, token lengths (p50/p95/max), rows over
    max_seq_length and tokens per epoch. Exit 1 when a row is unusable (each named with file:line).

    \b
    Example:
      llamafarm finetune dataset validate demos/datasets/medical_chat.jsonl --strategy tiny_demo --json
    """
    import yaml

    from contract.strategy import resolved_dict
    from orchestrator import strategies as strat
    from trainer.data.report import describe

    strategy = strat.get(strategy_name, strategy_files)[1] if strategy_name else None
    d = strategy.cfg.dataset if strategy else None
    report = describe(Path(path), d.format if d else "auto", d.columns if d else None)
    if strategy:
        report.update(_trainer_json(["dataset-stats", str(Path(path).resolve())], yaml.safe_dump(resolved_dict(strategy))))
        report["strategy"] = strategy_name
    if as_json:
        _emit_json(report)
        return
    click.echo(f"{report['dataset']}: {report['rows']} rows, {report['format']} format")
    click.echo(f"  blank lines {report['blank_lines']}, duplicate rows {report['duplicates']}, "
               f"multi-turn {report['multi_turn_rows']}, with a system prompt {report['with_system_prompt']}")
    for example in report["duplicate_examples"]:
        click.echo(f"  duplicate: {example}")
    if strategy:
        click.echo(f"  tokens ({strategy_name}, template {report['template']}): p50 {report['tokens_p50']}, "
                   f"p95 {report['tokens_p95']}, max {report['tokens_max']}")
        click.echo(f"  over max_seq_length {report['max_seq_length']}: {report['over_max_seq_length']} rows "
                   f"({report['over_action']}); tokens per epoch {report['tokens_per_epoch']}, "
                   f"in the loss {report['target_tokens']}")
    else:
        click.echo("  (add --strategy NAME for token lengths under that strategy's tokenizer and template)")


def _trainer_json(args: list[str], stdin: str | None = None) -> dict:
    """Run a trainer subcommand (where torch lives) and parse the JSON it prints."""
    from orchestrator.runners.local import PROJECT_ROOT, trainer_env

    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=PROJECT_ROOT, env=trainer_env(),
                          input=stdin, capture_output=True, text=True)
    if proc.returncode:
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise UserError(message.removeprefix("error: "))
    return json.loads(proc.stdout.strip().splitlines()[-1])


@finetune.command("evaluate")
@click.option("--model", required=True, help="A job id, a job folder, or a final/ folder.")
@click.option("--dataset", required=True, type=click.Path(), help="Held-out data in any supported format.")
@click.option("--samples", default=3, show_default=True, type=click.IntRange(0, 100), help="Prompts to answer side by side.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--output", type=click.Path(), default=None, help="Where to write the JSON (default: evaluation.json in the job).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate_cmd(model, dataset, samples, max_new_tokens, output, as_json):
    """Eval loss and perplexity of the fine-tuned model and its base, and their answers side by side.

    \b
    Example:
      llamafarm finetune evaluate --model tiny_demo-20260101-120000-ab12 --dataset demos/datasets/medical_qa_eval.jsonl
    """
    from orchestrator import jobs
    from orchestrator.runners.local import PROJECT_ROOT, trainer_env
    from trainer.data.records import read_dataset

    folder = jobs.model_folder(model)
    read_dataset(dataset)  # a bad file is reported here, with file:line, before any model loads
    out = Path(output) if output else folder.parent / "evaluation.json"
    if output is None and not (folder.parent / "job.json").exists():
        out = folder / "evaluation.json"
    argv = [sys.executable, "-m", "trainer", "evaluate", str(folder), str(Path(dataset).resolve()),
            "--output", str(out.resolve()), "--samples", str(samples), "--max-new-tokens", str(max_new_tokens)]
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, env=trainer_env(), capture_output=True, text=True)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"evaluation failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    if as_json:
        _emit_json(result)
        return
    ft, base = result["fine_tuned"], result["base"]
    click.echo(f"{result['dataset']}: {result['rows']} rows")
    click.echo(f"{'':<12}{'loss':>10}{'perplexity':>14}")
    click.echo(f"{'base':<12}{base['loss']:>10.4f}{base['perplexity']:>14.2f}")
    click.echo(f"{'fine-tuned':<12}{ft['loss']:>10.4f}{ft['perplexity']:>14.2f}")
    for i, sample in enumerate(result["samples"], 1):
        click.echo(f"\n[{i}] {sample['prompt']}")
        click.echo(f"  reference : {sample['reference']}")
        click.echo(f"  base      : {sample['base']}")
        click.echo(f"  fine-tuned: {sample['fine_tuned']}")
    click.echo(f"\nwritten to {out}")


@cli.command()
@click.option("--model", required=True, help="A job id, a job folder, or a final/ folder.")
@click.option("--prompt", required=True, help="The user message to answer.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 5.0),
              help="0 is greedy (deterministic).")
def generate(model, prompt, max_new_tokens, temperature):
    """Answer a prompt with a fine-tuned model, using the chat template it was trained with.

    \b
    Example:
      llamafarm generate --model tiny_demo-20260101-120000-ab12 --prompt "What are the symptoms of anemia?"
    """
    from orchestrator import jobs
    from orchestrator.runners.local import PROJECT_ROOT, trainer_env

    folder = jobs.model_folder(model)
    argv = [sys.executable, "-m", "trainer", "generate", str(folder), "--prompt", prompt,
            "--max-new-tokens", str(max_new_tokens), "--temperature", str(temperature)]
    code = subprocess.call(argv, cwd=PROJECT_ROOT, env=trainer_env())
    if code:
        sys.exit(code)


cli.add_command(start, "run")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
