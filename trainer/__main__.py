"""The trainer's own command line, used by runners (not by people; they use `llamafarm`).

    python -m trainer train <job_dir>
    python -m trainer generate <folder> --prompt "..." [--max-new-tokens N] [--temperature T]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run the job in a job folder")
    train.add_argument("job_dir", type=Path)
    gen = sub.add_parser("generate", help="answer a prompt with a trained model folder")
    gen.add_argument("folder", type=Path)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    if args.command == "train":
        from trainer.entrypoint import run

        return run(args.job_dir)
    try:
        from trainer.generate import generate

        print(generate(args.folder, args.prompt, args.max_new_tokens, args.temperature), flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
