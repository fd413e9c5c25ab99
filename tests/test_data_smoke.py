"""data/build_smoke_dataset.py: an offline dataset from the repository's own text, and the README's
smoke command on it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, read_log, run_trainer, trainer_env

BUILDER = REPO / "data" / "build_smoke_dataset.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SimpleNamespace:
    """The builder run as the README runs it (from the repository root), into a temporary folder."""
    root = tmp_path_factory.mktemp("smoke")
    result = subprocess.run([sys.executable, str(BUILDER), "--output-root", str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    settings = dict(re.findall(r"(DATA_PATH|TOKENIZER_PATH|VOCAB_SIZE)=(\S+)", result.stdout))
    return SimpleNamespace(root=root, data_path=settings["DATA_PATH"], tokenizer_path=settings["TOKENIZER_PATH"],
                           vocab_size=int(settings["VOCAB_SIZE"]))


def test_printed_settings_point_at_the_built_files(smoke):
    import sentencepiece as spm
    data_path = Path(smoke.data_path)
    assert data_path == smoke.root / "datasets" / "fineweb10B_smoke"
    assert spm.SentencePieceProcessor(model_file=smoke.tokenizer_path).vocab_size() == smoke.vocab_size
    assert (smoke.root / "manifest.json").is_file()


def test_there_is_a_validation_split_and_at_least_two_training_shards(smoke):
    data_path = Path(smoke.data_path)
    assert len(list(data_path.glob("fineweb_train_*.bin"))) >= 2
    assert len(list(data_path.glob("fineweb_val_*.bin"))) >= 1


def test_documents_are_paragraphs_of_the_repository_text(smoke):
    repo_text = "".join(p.read_text(encoding="utf-8") for p in REPO.rglob("*") if p.suffix in (".md", ".py")
                        and p.is_file() and not p.relative_to(REPO).parts[0].startswith("."))
    docs = [json.loads(line)["text"] for line in (smoke.root / "docs_selected.jsonl").read_text().splitlines()]
    assert len(docs) >= 50 and all(d in repo_text for d in docs)


def test_shards_hold_the_documents_in_order(smoke):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=smoke.tokenizer_path)
    docs = [json.loads(line)["text"] for line in (smoke.root / "docs_selected.jsonl").read_text().splitlines()]
    expected = np.concatenate([np.concatenate(([1], sp.encode(d))) for d in docs])
    paths = sorted(Path(smoke.data_path).glob("fineweb_val_*.bin")) + \
        sorted(Path(smoke.data_path).glob("fineweb_train_*.bin"))
    found = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in paths])
    np.testing.assert_array_equal(found, expected)


def test_train_gpt_runs_on_the_smoke_dataset(smoke, tmp_path):
    env = trainer_env(smoke, RUN_ID="smoke", ITERATIONS=4, TRAIN_BATCH_TOKENS=2048, TRAIN_SEQ_LEN=64,
                      VAL_BATCH_SIZE=4096, WARMUP_STEPS=1, VAL_LOSS_EVERY=0)
    result = run_trainer(env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:\S+$", read_log(tmp_path, "smoke"), re.M)
