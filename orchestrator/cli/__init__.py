"""The `llamafarm` command line (host side). It never imports torch: training, generation and
evaluation run in the `trainer` package, in a process a runner starts; heavy imports sit inside the
command bodies so `--help` and `strategies list` answer at once.

    llamafarm finetune strategies list
"""

from orchestrator.cli import data_cmd, estimate_cmd, export_cmd, generate_cmd, images_cmd, jobs_cmd, strategies_cmd, ui_cmd  # noqa: F401  (register)
from orchestrator.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
