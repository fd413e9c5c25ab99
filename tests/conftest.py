"""Shared test fixtures: a tiny dataset built from the repository's own text, and a trainer launcher."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))

from build_smoke_dataset import repository_documents  # noqa: E402
from download_hf_docs_and_tokenize import SPEC_SENTENCEPIECE  # noqa: E402
from shard_io import write_shard  # noqa: E402

# Settings small enough for a CPU step in milliseconds; tests add what they are about.
TINY_MODEL_ENV = {
    "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "VAL_BATCH_SIZE": "4096", "ITERATIONS": "20",
    "WARMUP_STEPS": "2", "WARMDOWN_ITERS": "5", "VAL_LOSS_EVERY": "10", "TRAIN_LOG_EVERY": "1",
    "MAX_WALLCLOCK_SECONDS": "0", "MUON_MOMENTUM_WARMUP_STEPS": "5", "DEVICE": "cpu",
    "PRESET": "baseline",  # the naive baseline's math; tests of the strong default set PRESET=strong
}

def train_sentencepiece(docs: list[str], vocab_size: int, model_prefix: Path) -> Path:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(model_prefix),
                                   vocab_size=vocab_size, minloglevel=2, **SPEC_SENTENCEPIECE)
    return model_prefix.with_suffix(".model")


def write_split_shards(folder: Path, split: str, token_lists: list[np.ndarray], num_shards: int) -> None:
    """Documents as BOS + tokens, concatenated, cut into `num_shards` shards."""
    stream = np.concatenate([np.concatenate(([1], t)) for t in token_lists]).astype(np.uint16)
    for i, part in enumerate(np.array_split(stream, num_shards)):
        write_shard(folder / f"fineweb_{split}_{i:06d}.bin", part)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> SimpleNamespace:
    """A SentencePiece tokenizer (the published tokenizers' settings) trained on the repository's own text (as
    committed at HEAD: real and varied text that every checkout has, the same whatever the working tree holds),
    and shards of that text."""
    import sentencepiece as spm
    root = tmp_path_factory.mktemp("tiny_dataset")
    docs = repository_documents(REPO)
    vocab_size = 384
    model = train_sentencepiece(docs, vocab_size, root / "tiny_bpe")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    token_lists = [np.array(ids) for ids in sp.encode(docs)]
    num_val = len(docs) // 5
    write_split_shards(root, "val", token_lists[:num_val], 1)
    write_split_shards(root, "train", token_lists[num_val:], 2)
    return SimpleNamespace(data_path=str(root), tokenizer_path=str(model), vocab_size=vocab_size, docs=docs,
                           num_val_docs=num_val)


def trainer_env(dataset, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(TINY_MODEL_ENV)
    env.update(DATA_PATH=dataset.data_path, TOKENIZER_PATH=dataset.tokenizer_path,
               VOCAB_SIZE=str(dataset.vocab_size), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_trainer(env: dict, cwd, nproc: int = 1, timeout: float = 300, script: Path = REPO / "train_gpt.py",
                **popen) -> subprocess.CompletedProcess:
    """Run train_gpt.py as users do: plain python for one process, torchrun for several."""
    script = str(script)
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **popen)


def run_on_ranks(script_text: str, folder: Path, nproc: int = 2) -> None:
    """A test's script, written into `folder`, run there by torchrun on `nproc` processes of one thread each."""
    script = folder / "ranks.py"
    script.write_text(script_text)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))},
           "OMP_NUM_THREADS": "1"}
    result = run_trainer(env, folder, nproc=nproc, script=script)
    assert result.returncode == 0, result.stderr[-3000:]


def read_log(cwd, run_id: str) -> str:
    return (Path(cwd) / "logs" / f"{run_id}.txt").read_text(encoding="utf-8")


def script_at_commit(commit: str, destination: Path) -> Path:
    """train_gpt.py as it was at `commit` (from git history), written to `destination`; skips without it."""
    original = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:train_gpt.py"], capture_output=True,
                              text=True)
    if original.returncode != 0:
        pytest.skip(f"commit {commit[:8]} of train_gpt.py is not in this checkout")
    destination.write_text(original.stdout)
    return destination


def score_lines(script: Path, env: dict, cwd) -> list[str]:
    """The losses and scores a run prints (not its timings), for comparing two versions of the trainer."""
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    score = re.compile(r"^(step:\d+/\d+ train_loss:\S+|step:\d+/\d+ val_loss:\S+ val_bpb:\S+|"
                       r"final_\w+_roundtrip(_exact)? val_loss:\S+ val_bpb:\S+)")
    return [m.group(1) for line in result.stdout.splitlines() if (m := score.match(line))]
