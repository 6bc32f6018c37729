"""The layers, checked on the import graph: orchestrator -> contract, inputs <- trainer.

Every import statement counts, those inside functions too (a lazy import is still an arrow). The
host (orchestrator/) never imports the trainer, and the torch-free packages (contract/, inputs/)
import neither the host, the trainer nor torch and the libraries built on it. docs/ARCHITECTURE.md
draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_STACK = {"torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "llama_cpp"}
# What each of our packages may not import (ours and the torch stack).
FORBIDDEN = {
    "orchestrator": {"trainer"} | TORCH_STACK,
    "contract": {"orchestrator", "inputs", "trainer"} | TORCH_STACK,
    "inputs": {"orchestrator", "trainer"} | TORCH_STACK,
    "trainer": {"orchestrator"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def arrows() -> list[str]:
    """Every import that crosses a layer the wrong way, as `file:line imports module`."""
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            wrong += [f"{path.relative_to(ROOT)}:{line} imports {module}"
                      for line, module in imports_of(path) if module in forbidden]
    return wrong


def test_no_import_crosses_a_layer_the_wrong_way():
    assert arrows() == []


def test_the_check_sees_nested_imports(tmp_path):
    """The checker itself: a lazy import inside a function is found, with its line."""
    sample = tmp_path / "m.py"
    sample.write_text("import os\n\ndef f():\n    from trainer.models import builtin\n    import torch.nn\n")
    assert imports_of(sample) == [(1, "os"), (4, "trainer"), (5, "torch")]
