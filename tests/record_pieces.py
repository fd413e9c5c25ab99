"""Named top-level definitions of a published record's source (../shared/reference), executed alone on the CPU.

A test that compares one part of the kit with the record's (its loader, its Muon) needs only that part, not the
model and its FlashAttention, Triton and CUDA stand-ins. `record_pieces` takes the definitions by name from the
record's unmodified source (parsed, never copied into the repository), applies the test's edits, each checked to
match exactly as often as expected, and executes them with the record's imports. Decorators are left out: the one
on `zeropower_via_newtonschulz5` is `torch.compile`, which computes the same function.
"""
from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
RECORD_1_0714 = REFERENCE / "record_2026-04-16_sp8192_1.0714" / "train_gpt.py"
IMPORTS = ("import glob\nfrom concurrent.futures import ThreadPoolExecutor\nfrom pathlib import Path\n"
           "import numpy as np\nimport torch\nimport torch.distributed as dist\n")

# Its Muon edited to fp32 (it hard-codes bf16), to compare with the kit's fp32 on a CPU.
FP32_MUON = (("X = G.bfloat16()", "X = G.float()", 1), ("dtype=torch.bfloat16", "dtype=torch.float32", 4),
             ("p.grad.bfloat16()", "p.grad.float()", 2))


def record_pieces(names: set[str], edits: tuple = (), source: Path = RECORD_1_0714) -> SimpleNamespace:
    """The functions, classes and assignments called `names` in `source`, with `edits` ((old, new, count), ...)."""
    if not source.exists():
        pytest.skip(f"{source} is absent (../shared is not beside the repository)")
    text = source.read_text(encoding="utf-8")
    nodes = [node for node in ast.parse(text).body
             if getattr(node, "name", None) in names or isinstance(node, ast.Assign) and
             any(getattr(target, "id", None) in names for target in node.targets)]
    found = {getattr(node, "name", None) or node.targets[0].id for node in nodes}
    assert found == names, f"reference source changed: {sorted(names - found)} not found"
    code = "\n\n\n".join(ast.get_source_segment(text, node) for node in nodes)
    for old, new, count in edits:
        assert code.count(old) == count, f"reference source changed: {old!r} occurs {code.count(old)} times"
        code = code.replace(old, new)
    namespace = {}
    exec(compile(IMPORTS + code, f"<{source.parent.name} pieces>", "exec"), namespace)
    return SimpleNamespace(**{name: namespace[name] for name in names})
