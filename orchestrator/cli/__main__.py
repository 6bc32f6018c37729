"""`python -m orchestrator.cli ...`: the llamafarm CLI without the console script."""

from orchestrator.cli import main

main()
