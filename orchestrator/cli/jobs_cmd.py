"""Jobs: `llamafarm finetune start` (= `llamafarm run`), `monitor`, `jobs`, `stop`, `resume`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from contract.errors import UserError
from orchestrator.cli.base import EXIT_INTERRUPTED, STRATEGY_FILES, cli, emit_json, finetune, load_strategy


@finetune.command("start")
@click.option("--strategy", "strategy_name", required=True, help="Strategy name (see `strategies list`).")
@click.option("--dataset", required=True, type=click.Path(),
              help="Training data: .jsonl, .json, .csv, .parquet or a saved Hugging Face dataset folder.")
@click.option("--set", "assignments", multiple=True, metavar="PATH=VALUE",
              help="Override a strategy value for this run, e.g. training_args.learning_rate=1e-4.")
@click.option("--runner", "runner_flag", default=None, help="auto, local, container or native (default: the strategy's, else $LLAMAFARM_RUNNER, else auto).")
@click.option("--foreground", is_flag=True, help="Stream progress and exit with the job's result once its process has ended.")
@click.option("--ignore-estimate", is_flag=True, help="Start even when the estimate says it will not fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@STRATEGY_FILES
def start(strategy_name, dataset, assignments, runner_flag, foreground, ignore_estimate, as_json, strategy_files):
    """Start a fine-tuning job; prints its id at once.

    \b
    Example:
      llamafarm finetune start --strategy tiny_demo --dataset demos/datasets/medical_qa.jsonl
    """
    from contract.job_folder import update_job
    from orchestrator import jobs
    from orchestrator.backends import BACKENDS
    from orchestrator.estimate import estimate
    from orchestrator.monitor import format_duration
    from orchestrator.plan import make_plan, with_estimate
    from orchestrator.runners import get_runner
    from inputs.data.placeholders import unfilled_warning
    from inputs.data.preference import read_for_stage
    from inputs.models.source import check_available

    entry, strategy, overrides = load_strategy(strategy_name, assignments, strategy_files)
    cfg = strategy.cfg
    backend = BACKENDS[strategy.fine_tuner.type]
    if not backend.available:
        raise UserError(f"strategy {strategy_name}: backend {strategy.fine_tuner.type!r}: {backend.note}")
    plan = make_plan(strategy, runner_flag)
    conversations = read_for_stage(dataset, cfg)
    eval_path = Path(cfg.dataset.eval_file).expanduser() if cfg.dataset.eval_file else None
    if eval_path:
        read_for_stage(eval_path, cfg)
    model_source = check_available(cfg.base_model)
    runner = get_runner(plan.runner.value)
    runner_note = runner.preflight(cfg, plan)  # no engine, no image, no venv: refused before a job exists
    est = estimate(strategy, Path(dataset), plan.device.value, conversations)
    if est.fits is False and not ignore_estimate:
        tips = "\n".join(f"  - {t}" for t in est.advice)
        raise UserError(
            f"strategy {strategy_name} needs about {est.peak_memory_mb:,.0f} MB on {plan.device.value} but "
            f"{est.available_memory_mb:,.0f} MB are available (`llamafarm finetune estimate` shows the breakdown):\n"
            f"{tips}\n  - or pass --ignore-estimate to start anyway"
        )
    plan = with_estimate(plan, est)
    say = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    say(f"strategy: {strategy_name} ({entry.source})" + (f"; overrides {overrides}" if overrides else ""))
    say(f"dataset: {dataset} ({len({c.where for c in conversations})} rows, {conversations[0].format} format)"
        + (f"; eval: {eval_path}" if eval_path else ""))
    placeholders = unfilled_warning(conversations)
    if placeholders:
        say(placeholders)
    say(f"base model: {cfg.base_model.name} = {cfg.base_model.huggingface_id} ({model_source})")
    for line in plan.lines():
        say(line + (f"; {runner_note}" if runner_note and line.startswith("runner:") else ""))
    say(f"estimate: peak about {est.peak_memory_mb:,.0f} MB, about {format_duration(est.seconds)} for {est.steps} steps"
        + (" (does not fit; --ignore-estimate)" if est.fits is False else ""))
    from orchestrator.cli.estimate_cmd import time_warning

    if time_warning(est, cfg.time_warning_hours):
        say(time_warning(est, cfg.time_warning_hours))

    folder = jobs.create(strategy_name, strategy, entry.source, Path(dataset), eval_path, overrides, plan)
    try:
        pid = runner.start(runner.launch_spec(folder))
    except OSError as exc:
        update_job(folder, status="failed", error=f"runner {runner.name} could not start: {exc}")
        raise UserError(f"runner {runner.name} could not start the job: {exc}") from None
    update_job(folder, pid=pid)
    say(f"model: when it completes, the weights are in {folder / 'final'}; then "
        f"`llamafarm finetune export --model-path {folder.name} --format ollama` and "
        f"`llamafarm generate --model {folder.name} --prompt ...`")
    if as_json:
        emit_json({"job_id": folder.name, "job_dir": str(folder), "status": "pending", "pid": pid, "runner": runner.name})
    else:
        click.echo(folder.name)
    if foreground:
        final = follow_in_foreground(folder, runner, echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
        sys.exit(0 if final["status"] == "completed" else 1)


def follow_in_foreground(folder: Path, runner, echo=click.echo) -> dict:
    """Stream a job started with --foreground. Ctrl-C stops the job, as users of a foreground command
    expect: it saves a checkpoint and ends `stopped` (resumable); a second Ctrl-C stops waiting only."""
    from contract.job_folder import FINISHED, now_iso, update_job
    from orchestrator import jobs
    from orchestrator.monitor import follow

    try:
        final = follow(folder, echo=echo)
        _await_process_exit(folder, echo)
        return final
    except KeyboardInterrupt:
        pass
    job_id = folder.name
    job = jobs.refresh(folder)
    if job["status"] not in FINISHED:
        echo(f"\nCtrl-C: stopping job {job_id}; it saves a checkpoint, then ends as stopped "
             f"(continue it with `llamafarm finetune resume --job-id {job_id}`)")
        if job.get("pid"):
            runner.stop(job)
        else:
            update_job(folder, status="stopped", finished_at=now_iso())
        try:
            job = follow(folder, echo=lambda m: None)
            echo(f"job {job_id} {job['status']}")
        except KeyboardInterrupt:
            echo(f"not waiting any longer; job {job_id} is still stopping (`llamafarm finetune jobs` shows when it has)")
    sys.exit(EXIT_INTERRUPTED)


# The most a foreground command waits, after the job's final status, for the job's process to end.
PROCESS_EXIT_SECONDS = 30


def _await_process_exit(folder: Path, echo) -> None:
    """Return once the job's process has ended, not only its status: the trainer writes `completed` before
    its interpreter shuts down (about a second of a core, freeing the model), and a command chained after
    `--foreground` (the next job's thread and kernel probes, a benchmark's timing) would share the CPU
    with it."""
    from contract.job_folder import read_job, wait_for_exit

    pid = read_job(folder).get("pid")
    if not wait_for_exit(pid, PROCESS_EXIT_SECONDS):
        echo(f"note: the job's process (pid {pid}) is still running {PROCESS_EXIT_SECONDS} s after the job "
             f"ended; not waiting for it any longer")


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
        try:
            final = mon.follow(folder, echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
        except KeyboardInterrupt:  # watching stops; the job is not ours to stop here
            click.echo(f"\nstopped watching; job {job_id} runs on (`llamafarm finetune stop --job-id {job_id}` "
                       "stops it)", err=True)
            sys.exit(EXIT_INTERRUPTED)
        if as_json:
            emit_json(final)
        sys.exit(0 if final["status"] == "completed" else 1)
    s = mon.summary(job, read_metrics(folder))
    if as_json:
        emit_json(s)
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
        emit_json(all_jobs)
        return
    if not all_jobs:
        click.echo("no jobs yet; start one with `llamafarm finetune start --strategy tiny_demo --dataset ...`")
    for job in all_jobs:
        loss = f"loss {job['final_loss']:.4f}" if job.get("final_loss") is not None else ""
        click.echo(f"{job['job_id']:<40} {job['status']:<9} {job.get('created_at', '')}  {loss}".rstrip())
        if job["status"] == "unreadable":
            click.echo(f"  {job['error']}")


@finetune.command("stop")
@click.option("--job-id", required=True, help="The job to stop.")
def stop(job_id):
    """Stop a job: it saves a checkpoint, then ends with status `stopped`.

    \b
    Example:
      llamafarm finetune stop --job-id tiny_demo-20260101-120000-ab12
    """
    from contract.job_folder import FINISHED, now_iso, update_job
    from contract.plan import runner_of
    from orchestrator import jobs
    from orchestrator.runners import get_runner

    folder, job = jobs.get(job_id)
    if job["status"] in FINISHED:
        raise UserError(f"job {job_id} already ended ({job['status']}); nothing to stop")
    if not job.get("pid"):
        update_job(folder, status="stopped", finished_at=now_iso())
        click.echo(f"job {job_id} had not started; marked stopped")
        return
    get_runner(runner_of(job)).stop(job)
    click.echo(f"stop sent to job {job_id}; it saves a checkpoint, then ends (`llamafarm finetune monitor --job-id {job_id}`)")


@finetune.command("resume")
@click.option("--job-id", required=True, help="A stopped or failed job with a checkpoint.")
@click.option("--foreground", is_flag=True, help="Stream progress and exit with the job's result once its process has ended.")
def resume(job_id, foreground):
    """Continue a stopped or failed job from its newest complete checkpoint, in the same job folder.

    \b
    Example:
      llamafarm finetune resume --job-id tiny_demo-20260101-120000-ab12
    """
    from contract.job_folder import complete_checkpoints, read_job_strategy, update_job
    from contract.plan import check_kept_decisions, plan_of
    from orchestrator import jobs
    from orchestrator.runners import get_runner

    folder, job = jobs.get(job_id)
    if job["status"] in ("pending", "running"):
        note = f" ({job['note']})" if job.get("note") else ""
        raise UserError(f"job {job_id} is {job['status']}{note}; only a stopped or failed job can be resumed; "
                        f"`llamafarm finetune stop --job-id {job_id}` stops it with a checkpoint")
    if job["status"] == "completed":
        raise UserError(f"job {job_id} already completed; start a new job to train further")
    check_kept_decisions(folder, job)  # the trainer would refuse them only after loading the model
    checkpoints = complete_checkpoints(folder)
    if not checkpoints:
        raise UserError(
            f"job {job_id} has no complete checkpoint to resume from (it saves every training_args.save_steps "
            "steps, and on stop); start it again with `llamafarm finetune start`"
        )
    plan = plan_of(job)
    runner = get_runner(plan.runner.value)
    runner.preflight(read_job_strategy(folder)[0].cfg, plan)  # the engine, image or venv may be gone since start
    latest = checkpoints[-1]
    update_job(folder, status="pending", pid=None, error=None, note=None, finished_at=None,
               resume_from=str(latest.relative_to(folder)), resumes=job.get("resumes", 0) + 1)
    pid = runner.start(runner.launch_spec(folder))
    update_job(folder, pid=pid)
    click.echo(f"job {job_id} resumes from {latest.name} (runner {runner.name}, pid {pid})")
    if foreground:
        sys.exit(0 if follow_in_foreground(folder, runner)["status"] == "completed" else 1)




cli.add_command(start, "run")
