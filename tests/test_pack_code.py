"""The packed train_gpt.py (train_gpt.pack_code, shipped by records/make_submission.py --pack-code): its size,
the program it runs, and a tiny run of it beside the plain file."""
from __future__ import annotations

import ast
import hashlib
import re
import subprocess
import sys

import brotli
import pytest

from conftest import REPO, run_trainer, trainer_env

sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

SOURCE = (REPO / "train_gpt.py").read_bytes()


@pytest.fixture(scope="module")
def packed() -> bytes:
    return train_gpt.pack_code(SOURCE)[1]


def payload_of(packed_file: bytes) -> bytes:
    """The code a packed file executes, read the way Python reads the file (a latin-1 string literal), with its
    one-space indents made four again (as the trainer logs it)."""
    module = ast.parse(packed_file.decode("latin-1"))
    (literal,) = [n.value for n in ast.walk(module) if isinstance(n, ast.Constant) and n.value not in ("latin-1",)]
    return re.sub(rb"(?m)^ +", lambda m: b"    " * len(m[0]), brotli.decompress(literal.encode("latin-1")))


def without_docstrings(code: bytes) -> str:
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


# The largest model the default's record shipped (the 1.0714 record's logs: 15,911,493 bytes) must fit beside the
# packed code under the 16,000,000-byte cap.
RECORD_LARGEST_MODEL_BYTES = 15_911_493


def test_packed_trainer_fits_beside_the_records_largest_model(packed):
    print(f"packed train_gpt.py: {len(packed)} bytes (plain {len(SOURCE)})")
    assert RECORD_LARGEST_MODEL_BYTES + len(packed) <= 16_000_000


def test_packed_file_is_a_latin1_exec_of_brotli(packed):
    assert packed.startswith(b'#coding:latin-1\nimport brotli;exec(brotli.decompress("""')
    assert packed.endswith(b'""".encode("latin-1")))\n') and b"\r" not in packed and b"\0" not in packed


def test_packed_file_runs_the_source_program_docstrings_aside(packed):
    assert without_docstrings(payload_of(packed)) == without_docstrings(SOURCE)


def test_packing_a_packed_file_keeps_it_and_unpacks_its_source(packed):
    assert train_gpt.pack_code(packed) == (payload_of(packed), packed)


# ----------------------------------------------------------------------------------------------
# A tiny run of the packed file beside the plain file.

RUN_LINE = re.compile(r"^(step:\d+/\d+ (train|val)_loss:.*?) train_time|^(final_\w+ val_loss:\S+ val_bpb:\S+)|"
                      r"^(Serialized model \S+ \d+ bytes)|^(Total submission size .*)|^(Code size: .*)")


def test_packed_file_logs_the_plain_files_losses_artifact_bytes_and_code_id(tmp_path, tiny_dataset, packed):
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
    code_id = hashlib.sha256(packed).hexdigest()
    assert f"Code size: {len(SOURCE)} bytes packed:{len(packed)} code_id:{code_id}" in lines["plain"]
    assert f"Code size: {len(payload_of(packed))} bytes packed:{len(packed)} code_id:{code_id}" in lines["packed"]
    assert [x for x in lines["packed"] if not x.startswith("Code")] == \
        [x for x in lines["plain"] if not x.startswith("Code")]


def test_packed_file_under_torchrun_logs_its_readable_source(tmp_path, tiny_dataset, packed):
    (tmp_path / "train_gpt.py").write_bytes(packed)
    env = trainer_env(tiny_dataset, RUN_ID="packed", ITERATIONS=1, VAL_LOSS_EVERY=0, MAX_VAL_TOKENS=1024,
                      EXPORT_QUANT="rtn", TTT_EPOCHS=0)
    result = run_trainer(env, tmp_path, nproc=2, script=tmp_path / "train_gpt.py")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "packed.txt").read_bytes()
    source = payload_of(packed)
    assert log.startswith(b"source train_gpt.py bytes:%d " % len(source)) and source + b"end_of_source\n" in log
    assert b" world_size:2 " in log


@pytest.mark.parametrize("change", ["a newline added at the end", "CRLF line ends"])
def test_a_packed_file_changed_after_packing_is_refused_in_one_line_before_any_log(tmp_path, tiny_dataset, packed,
                                                                                    change):
    script = tmp_path / "train_gpt.py"
    script.write_bytes(packed + b"\n" if change.startswith("a newline") else packed.replace(b"\n", b"\r\n"))
    result = run_trainer(trainer_env(tiny_dataset, RUN_ID="changed", ITERATIONS=1), tmp_path, script=script)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: {script}: a packed file changed since packing (CRLF line "
                                                  f"ends or bytes after its last line): copy it again byte for byte, "
                                                  f"or run the plain train_gpt.py"]
    assert not (tmp_path / "logs").exists()  # the RUN_ID stays free
