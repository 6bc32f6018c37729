"""The matrix as a picture: one square per cell, coloured by llamafarm's speed over the Trainer + PEFT script.

    .venv/bin/python -m bench.matrix_plot RESULT_JSON [--out PNG] [--title TEXT]

RESULT_JSON is what `bench.matrix` writes (it draws matrix.png beside it itself); this redraws a saved
run. Rows are length x batch, columns the methods; each square shows the ratio and both sides' real
tokens/s, its colour the targets of issue #24 (under the 1.5x floor, under the 2x quick-matrix target,
at or over it), grey where a side did not finish.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Ratio bands and their colours: under the full matrix's floor, under the quick matrix's target, over it.
BANDS = ((1.5, "#e8847c"), (2.0, "#f2d16b"), (float("inf"), "#8cc98a"))
FAILED = "#cccccc"


def colour(ratio: float | None) -> str:
    if ratio is None:
        return FAILED
    return next(c for upper, c in BANDS if ratio < upper)


SIDES = (("baseline", "baseline"), ("llamafarm", "project"))  # (name, key in a cell's result)


def unfinished(result: dict) -> list[str]:
    """The names of a cell's sides that did not finish (SIDES order)."""
    return [side for side, key in SIDES if result[key].get("failed")]


def label(result: dict) -> str:
    """What one square says: the ratio and both sides' real tokens/s, or which side did not finish."""
    base, ours = result["baseline"]["tokens_per_second"], result["project"]["tokens_per_second"]
    if result["ratio"] is not None:
        return f"{result['ratio']:.2f}x\n{base:.0f} / {ours:.0f}"
    return f"{' and '.join(unfinished(result))}\ndid not finish" + (f"\nours {ours:.0f}" if ours is not None else "")


def plot_matrix(results: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    from orchestrator.plot import finish_figure

    methods = list(dict.fromkeys(r["method"] for r in results))
    shapes = sorted({(r["length"], r["batch"]) for r in results})
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 + 2.0 * len(methods)), 1.2 + 0.62 * len(shapes)), dpi=110)
    for r in results:
        x, y = methods.index(r["method"]), shapes.index((r["length"], r["batch"]))
        ax.add_patch(plt.Rectangle((x, y), 1, 1, facecolor=colour(r["ratio"]), edgecolor="white", linewidth=2))
        ax.text(x + 0.5, y + 0.5, label(r), ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(methods))
    ax.set_ylim(len(shapes), 0)  # the shortest, smallest batch at the top, as in the docs' tables
    ax.set_xticks([i + 0.5 for i in range(len(methods))], methods)
    ax.set_yticks([i + 0.5 for i in range(len(shapes))], [f"{n} x {b}" for n, b in shapes])
    ax.xaxis.tick_top()
    ax.set_ylabel("sequence length x batch")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    legend = [plt.Rectangle((0, 0), 1, 1, color=c) for _, c in BANDS] + [plt.Rectangle((0, 0), 1, 1, color=FAILED)]
    ax.legend(legend, ["under 1.5x", "1.5-2x", "2x or more", "a side did not finish"], loc="upper center",
              bbox_to_anchor=(0.5, -0.01), ncol=4, fontsize=8, frameon=False)
    ax.set_title(title + "\nllamafarm's speed over Trainer + PEFT; real tokens/s: Trainer+PEFT / llamafarm", fontsize=9,
                 pad=18)
    return finish_figure(fig, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a result.json that bench.matrix wrote")
    p.add_argument("--out", type=Path, help="the PNG to write (default: matrix.png beside RESULT_JSON)")
    p.add_argument("--title", help="default: the machine and matmul peak the run recorded")
    a = p.parse_args(argv)
    try:
        saved = json.loads(a.result.read_text())
        results = saved["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"cannot read the matrix result {a.result}: {e}; pass a result.json that bench.matrix wrote")
    from contract.errors import UserError

    try:
        print(plot_matrix(results, a.out or a.result.with_name("matrix.png"), a.title or title_of(saved)))
    except UserError as e:  # an --out that cannot be written: the message, not a traceback
        sys.exit(str(e))
    return 0


def title_of(saved: dict) -> str:
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in saved.get("peaks", {}).items())
    return f"{saved.get('machine', 'bench.matrix')}; matmul peak {peaks} GFLOP/s"


if __name__ == "__main__":
    sys.exit(main())
