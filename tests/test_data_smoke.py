"""data/build_smoke_dataset.py: an offline dataset from the text committed at HEAD, and the README's
smoke command on it: `python3 data/build_smoke_dataset.py && PRESET=smoke python3 train_gpt.py`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train_gpt
from build_smoke_dataset import build_smoke_dataset
from conftest import REPO, read_log, run_trainer

BUILDER = REPO / "data" / "build_smoke_dataset.py"
GIT_IDENTITY = ["-c", "user.name=kit", "-c", "user.email=kit@localhost"]  # for commits in a fresh repository


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SimpleNamespace:
    """The builder run into data/smoke of a temporary folder, from that folder: the layout the README's command
    makes in the repository root."""
    cwd = tmp_path_factory.mktemp("checkout")
    root = cwd / "data" / "smoke"
    result = subprocess.run([sys.executable, str(BUILDER), "--output-root", str(root)], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    settings = dict(re.findall(r"(DATA_PATH|TOKENIZER_PATH|VOCAB_SIZE)=(\S+)", result.stdout))
    return SimpleNamespace(cwd=cwd, root=root, data_path=str(cwd / settings["DATA_PATH"]),
                           tokenizer_path=str(cwd / settings["TOKENIZER_PATH"]),
                           vocab_size=int(settings["VOCAB_SIZE"]))


def smoke_env(**overrides) -> dict:
    """PRESET=smoke and no other setting of the trainer's, as the README runs it."""
    settings = {f.name.upper() for f in dataclasses.fields(train_gpt.Settings)}
    env = {k: v for k, v in os.environ.items()
           if k not in settings and not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PRESET="smoke", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **overrides)
    return env


@pytest.fixture(scope="module")
def smoke_run(smoke) -> SimpleNamespace:
    """`PRESET=smoke python3 train_gpt.py` run once in the folder the smoke data was built in."""
    result = run_trainer(smoke_env(), cwd=smoke.cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"^run_id:(\S+)", result.stdout, re.M).group(1)
    return SimpleNamespace(run_id=run_id, log=read_log(smoke.cwd, run_id))


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


def test_documents_are_paragraphs_of_the_committed_text(smoke):
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.split("\n")
    committed_text = "".join(subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:{path}"], capture_output=True,
                                            text=True, check=True).stdout
                             for path in tracked if path.endswith((".md", ".py")) and not path.startswith("."))
    docs = [json.loads(line)["text"] for line in (smoke.root / "docs_selected.jsonl").read_text().splitlines()]
    assert len(docs) >= 50 and all(d in committed_text for d in docs)


# ----------------------------------------------------------------------------------------------
# The same commit gives the same smoke tokens, whatever the working tree holds.

def git(checkout: Path, *args: str) -> None:
    subprocess.run(["git", *GIT_IDENTITY, "-C", str(checkout), *args], capture_output=True, check=True)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A clone of this repository at its HEAD (so the smoke text is the kit's), whose working tree is the test's."""
    root = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], capture_output=True, check=True)
    return root


def smoke_tokens(checkout: Path, output_root: Path) -> dict[str, bytes]:
    """Every shard of the smoke dataset built from `checkout`, and its tokenizer's pieces and scores (the .vocab:
    the .model also records where it was written), by file name."""
    build_smoke_dataset(output_root, vocab_size=512, repo_root=checkout)
    return {p.name: p.read_bytes() for p in sorted(output_root.rglob("*")) if p.suffix in (".bin", ".vocab")}


NEW_TEXT = "\n\n".join(f"Paragraph {i} that a user wrote in the working tree, long enough to be a document."
                        for i in range(40))


def test_untracked_and_edited_files_leave_the_smoke_tokens_unchanged(checkout, tmp_path):
    before = smoke_tokens(checkout, tmp_path / "before")
    (checkout / "records" / "my_submission.md").write_text(NEW_TEXT)  # untracked, as a submission's README
    with open(checkout / "README.md", "a") as readme:  # a tracked file, edited
        readme.write("\n\n" + NEW_TEXT)
    assert smoke_tokens(checkout, tmp_path / "after") == before


def test_a_commit_that_changes_the_text_changes_the_smoke_tokens(checkout, tmp_path):
    before = smoke_tokens(checkout, tmp_path / "before")
    (checkout / "records" / "my_submission.md").write_text(NEW_TEXT)
    git(checkout, "add", "-A")
    git(checkout, "commit", "-q", "-m", "a submission")
    after = smoke_tokens(checkout, tmp_path / "after")
    assert after.keys() >= {"fineweb_val_000000.bin", "fineweb_train_000000.bin"}
    assert after != before


def test_outside_a_git_checkout_the_builder_says_how_to_make_one(tmp_path):
    copy = tmp_path / "kit"  # the kit's data tools, unpacked from an archive
    (copy / "data").mkdir(parents=True)
    for module in (REPO / "data").glob("*.py"):
        shutil.copy(module, copy / "data")
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp_path)}  # git looks for no repository above tmp_path
    result = subprocess.run([sys.executable, str(copy / "data" / "build_smoke_dataset.py"), "--output-root",
                             str(tmp_path / "smoke")], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {copy} is not a git checkout")
    assert "git init && git add -A && git commit" in result.stderr
    assert not (tmp_path / "smoke").exists()


def test_shards_hold_the_documents_in_order(smoke):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=smoke.tokenizer_path)
    docs = [json.loads(line)["text"] for line in (smoke.root / "docs_selected.jsonl").read_text().splitlines()]
    expected = np.concatenate([np.concatenate(([1], sp.encode(d))) for d in docs])
    paths = sorted(Path(smoke.data_path).glob("fineweb_val_*.bin")) + \
        sorted(Path(smoke.data_path).glob("fineweb_train_*.bin"))
    found = np.concatenate([np.fromfile(p, dtype="<u2", offset=1024) for p in paths])
    np.testing.assert_array_equal(found, expected)


def test_smoke_preset_trains_on_what_the_builder_wrote(smoke, smoke_run):
    sha = hashlib.sha256(Path(smoke.tokenizer_path).read_bytes()).hexdigest()
    assert re.search(rf"^tokenizer: custom sha256:{sha}$", smoke_run.log, re.M)  # the smoke tokenizer, made here
    shards = r"^train_shards:\d+ pattern:\./data/smoke/datasets/fineweb10B_smoke/fineweb_train_"
    assert re.search(shards, smoke_run.log, re.M)


def test_smoke_run_names_its_training_data_by_the_shards_names_and_sizes(smoke, smoke_run):
    listing = "".join(f"{p.name} {p.stat().st_size}\n" for p in sorted(Path(smoke.data_path).glob("fineweb_train_*")))
    data_id = hashlib.sha256(listing.encode()).hexdigest()[:16]
    line = rf"^train_shards:\d+ pattern:\S+/fineweb_train_\*\.bin data_id:{data_id}( loader_streams:\d+ \(.*\))?$"
    assert re.search(line, smoke_run.log, re.M)


def test_smoke_preset_runs_every_stage(smoke_run):
    stages = [r"step:0/\d+ val_loss:", r"step:\d+/\d+ train_loss:", r"recurrence:on", r"ema:applied",
              r"step:\d+/\d+ val_loss:", r"gptq: \d+ms", r"Serialized model int6\+brotli: \d+ bytes",
              r"eval_pass:roundtrip", r"final_int6_brotli_roundtrip_exact val_loss:", r"eval_pass:ttt ",
              r"final_int6_brotli_roundtrip_exact val_loss:"]  # the round trip's score, then test-time training's
    position = 0
    for stage in stages:
        found = re.compile(f"^{stage}", re.M).search(smoke_run.log, position)
        assert found, f"no line for {stage!r} after the earlier stages"
        position = found.end()


def test_smoke_preset_caps_in_steps_not_seconds(smoke_run):
    settings = json.loads(re.search(r"^settings:(.*)$", smoke_run.log, re.M).group(1))
    assert settings["MAX_WALLCLOCK_SECONDS"] == 0
    assert re.search(rf"^step:{settings['ITERATIONS']}/{settings['ITERATIONS']} val_loss:", smoke_run.log, re.M)
    assert not re.search(r"^stopping_early", smoke_run.log, re.M)


def test_smoke_preset_final_score_is_well_below_the_first_validation_score(smoke_run):
    first = float(re.search(r"^step:0/\d+ val_loss:(\S+)", smoke_run.log, re.M).group(1))
    final = float(re.findall(r"^final_\w+_roundtrip_exact val_loss:(\S+)", smoke_run.log, re.M)[-1])
    assert final < first - 1.0  # nats per token: the loss visibly falls, from about ln(512) = 6.24 at step 0


def test_smoke_preset_runs_again_without_a_new_run_id(smoke, smoke_run):
    quick = dict(ITERATIONS="1", WARMUP_STEPS="0", VAL_LOSS_EVERY="0", TTT_EPOCHS="0", EVAL_STRIDE="0", EXPORT_QUANT="rtn")
    again = run_trainer(smoke_env(**quick), cwd=smoke.cwd)  # the run id is all this run is about
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"^run_id:(\S+)", again.stdout, re.M).group(1) != smoke_run.run_id
