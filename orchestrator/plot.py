"""Pictures of a job's progress: a PNG of the loss curves and a one-line sparkline for terminals."""

from __future__ import annotations

from pathlib import Path

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """The last `width` values as block characters, low to high."""
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))] for v in values)


def plot_metrics(metrics: list[dict], out: Path, title: str) -> Path:
    """Training and eval loss against the step, with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss", color="tab:blue")
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss", color="tab:orange")
    if any("reward_margin" in m for m in train):  # preference stages: the reward margin, on the loss axis
        ax.plot([m["step"] for m in train if "reward_margin" in m],
                [m["reward_margin"] for m in train if "reward_margin" in m], label="reward margin", color="tab:green")
    if any("eval_reward_accuracy" in m for m in evals):
        ax.plot([m["step"] for m in evals], [m.get("eval_reward_accuracy") for m in evals], "s-",
                label="eval pairs ranked right", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot([m["step"] for m in train], [m["learning_rate"] for m in train], "--", color="tab:gray", alpha=0.7,
            label="learning rate")
    lr.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title(title)
    return finish_figure(fig, out)


def finish_figure(fig, out: Path) -> Path:
    """Lay the figure out, write it to `out` (see _save) and close it, written or not."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        _save(fig, Path(out))
    finally:
        plt.close(fig)
    return Path(out)


def _save(fig, out: Path) -> None:
    """Write under a temporary name, then rename: a failed save leaves nothing behind."""
    import os

    from contract.errors import UserError

    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"cannot write the plot to {out}: unknown image type {out.suffix!r}; use a .png path")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, out)
    except OSError as exc:
        if tmp.is_file():
            tmp.unlink()
        reason = exc.strerror or str(exc)
        raise UserError(f"cannot write the plot to {out}: {reason}; give a path in a writable folder") from None
