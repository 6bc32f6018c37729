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
        for path in strat._yaml_files(Path(item)):
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
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@_STRATEGY_FILES
def start(strategy_name, dataset, assignments, runner_flag, foreground, as_json, strategy_files):
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
    conversations = read_dataset(dataset, cfg.dataset.format)
    model_source = check_available(cfg.base_model)
    runner, runner_reason = choose_runner(runner_flag, cfg.runner)
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    say(f"strategy: {strategy_name} ({entry.source})" + (f"; overrides {overrides}" if overrides else ""))
    say(f"dataset: {dataset} ({len(conversations)} rows)")
    say(f"base model: {cfg.base_model.huggingface_id} ({model_source})")
    say(f"device: {device.value} ({device.reason}; the trainer confirms it)")
    say(f"runner: {runner.name} ({runner_reason})")

    folder = jobs.create(strategy_name, strategy, entry.source, Path(dataset), overrides, runner.name)
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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def monitor(job_id, follow_, as_json):
    """Show a job's progress: bar, loss, tokens/s and ETA. With --follow, exit 1 unless it completes.

    \b
    Example:
      llamafarm finetune monitor --job-id tiny_demo-20260101-120000-ab12 --follow
    """
    from contract.job_folder import read_metrics
    from orchestrator import jobs
    from orchestrator import monitor as mon

    folder, job = jobs.get(job_id)
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
