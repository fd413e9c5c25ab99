"""`python3 train_gpt.py --help` lists every setting (name, default, meaning, the presets' values) and runs nothing;
a packed file, whose comments pack_code dropped, lists names and values and says where the meanings are."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import train_gpt
from conftest import REPO

SETTINGS = [(f.name.upper(), repr(f.default)) for f in fields(train_gpt.Settings)]


def help_of(script, cwd) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "ITERATIONS": "abc"}  # an invalid setting: --help validates and runs nothing
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert list(cwd.iterdir()) == ([script] if script.parent == cwd else [])  # no logs/, nothing written
    return result.stdout.splitlines()


def test_help_lists_every_setting_with_its_default_meaning_and_preset_values(tmp_path):
    lines = help_of(REPO / "train_gpt.py", tmp_path)
    for name, default in SETTINGS:
        assert any(line.split()[:2] == [name, default] for line in lines), name
    assert any(line.split()[:2] == ["TTT_EPOCHS", "1"] and line.endswith(
        "score-first test-time training: steps (full: epochs) on each chunk once it is scored; 0: off [1.0810: 3, "
        "baseline: 0]") for line in lines)
    assert any(line.startswith("VOCAB_SIZE") and line.endswith(" [baseline: 1024, smoke: 512]") for line in lines)
    assert not any("meanings are in the readable" in line for line in lines)


def test_help_of_a_packed_file_lists_names_and_defaults_and_says_where_the_meanings_are(tmp_path):
    packed = tmp_path / "train_gpt.py"
    packed.write_bytes(train_gpt.pack_code((REPO / "train_gpt.py").read_bytes())[1])
    lines = help_of(packed, tmp_path)
    for name, default in SETTINGS:
        assert any(line.split()[:2] == [name, default] for line in lines), name
    assert lines[-1] == "(a packed file: the meanings are in the readable train_gpt.py)"
