"""The packed train_gpt.py (train_gpt.pack_code, shipped by records/make_submission.py --pack-code): its size,
the program it runs, and a tiny run of it beside the plain file."""
from __future__ import annotations

import ast
import base64
import lzma
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, trainer_env

sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

pytest.importorskip("python_minifier")
SOURCE = (REPO / "train_gpt.py").read_bytes()


@pytest.fixture(scope="module")
def packed() -> bytes:
    return train_gpt.pack_code(SOURCE)[0]


def payload_of(packed_file: bytes) -> str:
    """The code a packed file executes, read the way its two lines read it (not with the packer's constants)."""
    lines = packed_file.decode("ascii").splitlines()
    assert len(lines) == 2 and lines[0] == "import lzma,base64"
    encoded = re.fullmatch(r"exec\(lzma\.decompress\(base64\.b85decode\(b'([^']*)'\)\)\)", lines[1]).group(1)
    return lzma.decompress(base64.b85decode(encoded)).decode("utf-8")


def test_packed_code_of_todays_trainer_is_at_most_20000_bytes(packed):
    print(f"packed train_gpt.py: {len(packed)} bytes (plain {len(SOURCE)})")
    assert len(packed) <= 20_000


def test_packed_file_is_two_lines_of_ascii(packed):
    assert packed.isascii() and packed.count(b"\n") == 2 and packed.endswith(b"\n")


def test_packing_a_packed_file_returns_it_unchanged(packed):
    assert train_gpt.pack_code(packed) == (packed, "packed already")


# ----------------------------------------------------------------------------------------------
# The program a packed file runs is the source's, up to what the packing drops or renames.

SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
          ast.GeneratorExp)
NAMES = {(ast.Name, "id"), (ast.FunctionDef, "name"), (ast.AsyncFunctionDef, "name"), (ast.ClassDef, "name"),
         (ast.ExceptHandler, "name"), (ast.Global, "names"), (ast.Nonlocal, "names")}


def without_docstrings_and_annotations(tree: ast.Module) -> ast.Module:
    """Drops docstrings, and the annotations of arguments, returns and variables in functions: those a packed file
    drops. The annotations of class attributes (dataclass fields) stay. A body left empty is `pass` (python-minifier
    writes `0` there)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False) is not None:
            node.body = body[1:] or [ast.Pass()]
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant):
            node.body = [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            node.body = [ast.copy_location(ast.Assign([s.target], s.value), s) if isinstance(s, ast.AnnAssign) else s
                         for s in node.body if not (isinstance(s, ast.AnnAssign) and s.value is None)]
        if isinstance(node, ast.arg):
            node.annotation = None
    return ast.parse(ast.unparse(tree))  # fresh nodes: an Assign made here has no type_comment field


def assert_same_up_to_renaming(a, b, scopes: list[dict], where: str = "module") -> None:
    """The same trees, except names bound in the program (not attributes, not arguments), which may differ when the
    renaming is one to one within each scope (a name is looked up in its scope, then in the enclosing ones)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, list):
        assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} items"
        for x, y in zip(a, b):
            assert_same_up_to_renaming(x, y, scopes, where)
    elif isinstance(a, ast.alias):
        assert a.name == b.name, where
        same_name(a.asname or a.name.split(".")[0], b.asname or b.name.split(".")[0], scopes, where, binds=True)
    elif isinstance(a, ast.AST):
        where = f"line {a.lineno}" if hasattr(a, "lineno") else where
        inner = scopes + [{}] if isinstance(a, SCOPES) else scopes
        binds = not isinstance(a, ast.Name) or isinstance(a.ctx, (ast.Store, ast.Del))
        for field in sorted(a._fields, key=lambda f: f != "generators"):  # a comprehension binds, then computes
            x, y = getattr(a, field), getattr(b, field)
            if (type(a), field) in NAMES:
                for n, m in zip(*([x, y] if isinstance(x, list) else [[x], [y]])):
                    same_name(n, m, scopes, where, binds and not isinstance(a, (ast.Global, ast.Nonlocal)))
            else:
                assert_same_up_to_renaming(x, y, inner, f"{where} {type(a).__name__}.{field}")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def same_name(source_name, packed_name, scopes: list[dict], where: str, binds: bool) -> None:
    """A binding is of the innermost scope; a use is of the nearest scope that has the name."""
    if source_name is None or packed_name is None:
        assert source_name == packed_name, where
        return
    for scope in [scopes[-1]] if binds else reversed(scopes):
        if source_name in scope:
            assert scope[source_name] == packed_name, f"{where}: {source_name} is {scope[source_name]} and {packed_name}"
            return
    assert packed_name not in scopes[-1].values(), f"{where}: {packed_name} names two things"
    scopes[-1][source_name] = packed_name


def test_packed_file_runs_the_source_program_up_to_docstrings_annotations_and_names(packed):
    source = without_docstrings_and_annotations(ast.parse(SOURCE))
    program = without_docstrings_and_annotations(ast.parse(payload_of(packed)))
    assert_same_up_to_renaming(source, program, [{}])


# ----------------------------------------------------------------------------------------------
# A tiny run of the packed file beside the plain file.

RUN_LINE = re.compile(r"^(step:\d+/\d+ (train|val)_loss:.*?) train_time|^(final_\w+ val_loss:\S+ val_bpb:\S+)|"
                      r"^(Serialized model \S+ \d+ bytes)|^(Total submission size .*)|^Code size: \d+ bytes (packed:\d+)")


def test_packed_file_logs_the_plain_files_losses_and_artifact_bytes(tmp_path, tiny_dataset, packed):
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "train_gpt.py").write_bytes(packed)
    lines = {}
    for name, script in (("plain", REPO / "train_gpt.py"), ("packed", tmp_path / "packed" / "train_gpt.py")):
        env = trainer_env(tiny_dataset, RUN_ID=name, ITERATIONS=6, VAL_LOSS_EVERY=3, MAX_VAL_TOKENS=2048)
        result = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        lines[name] = [next(g for g in m.groups() if g) for line in result.stdout.splitlines()
                       if (m := RUN_LINE.match(line))]
    assert f"packed:{len(packed)}" in lines["plain"] and any(line.startswith("Total submission") for line in lines["plain"])
    assert lines["packed"] == lines["plain"]
