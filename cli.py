"""`python cli.py ...` runs the llamafarm CLI from a checkout, the form the original docs use.

    python cli.py finetune strategies list
"""

from orchestrator.cli import main

if __name__ == "__main__":
    main()
