#!/usr/bin/env python3
"""Build a small dataset from the repository's own text, offline, in a few seconds.

    python3 data/build_smoke_dataset.py [--output-root data/smoke] [--vocab-size 512]

The documents are the paragraphs of the *.md and *.py files committed at the checkout's HEAD, read through
git (nothing downloaded, nothing copied from elsewhere, and neither edited nor untracked files: the same
commit gives the same tokens whatever the working tree holds), shuffled with a fixed seed. Outside a git
checkout it stops with one error line that says how to make one. The re-tokenizer turns them into a
complete export with a small SentencePiece tokenizer: DIR/datasets/fineweb10B_smoke/, DIR/tokenizers/,
DIR/manifest.json. It prints the DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE to give train_gpt.py;
PRESET=smoke reads the default location (data/smoke) by itself. This is for checking that the kit runs,
not for measuring anything.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when run as `python3 data/...`
from cached_challenge_fineweb import DOCS_FILE, docs_digest  # noqa: E402
from download_hf_docs_and_tokenize import (ExportError, TokenizerSpec, build_export,  # noqa: E402
                                           sidecar_path_for, write_text_atomically)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIN_PARAGRAPH_CHARS = 40  # shorter blocks are mostly code fragments and headings
MAX_VAL_DOCS = 50  # ~14K tokens: the smoke run validates in a fraction of a second
MIN_DOCS = 50
TRAIN_SHARDS_WANTED = 4


def git(repo_root: Path, *args: str) -> bytes:
    """The output of a git command in `repo_root`; an ExportError that says how to get a checkout otherwise."""
    try:
        result = subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True)
    except FileNotFoundError:
        raise ExportError(not_a_checkout(repo_root, "git is not installed")) from None
    if result.returncode != 0:
        raise ExportError(not_a_checkout(repo_root, result.stderr.decode(errors="replace").strip().split("\n")[0]))
    return result.stdout


def not_a_checkout(repo_root: Path, why: str) -> str:
    return (f"{repo_root} is not a git checkout with a commit ({why}): the smoke text is the files committed at "
            f"HEAD, so that edits and untracked files never change it; clone the kit with git, or commit this "
            f"copy (git init && git add -A && git commit -m kit)")


def head_commit(repo_root: Path) -> str:
    return git(repo_root, "rev-parse", "--verify", "HEAD^{commit}").decode().strip()


def repository_documents(repo_root: Path, commit: str = "HEAD") -> list[str]:
    """Paragraphs of the *.md and *.py files committed at `commit`, outside hidden folders (.github), read from
    git's objects: the working tree's edits and untracked files are never read."""
    texts = {}
    with tarfile.open(fileobj=io.BytesIO(git(repo_root, "archive", "--format=tar", commit))) as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and member.name.endswith((".md", ".py")) and not any(p.startswith(".") for p in parts):
                text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                texts[tuple(parts)] = text.replace("\r\n", "\n").replace("\r", "\n")  # git writes CRLF on Windows
    docs = []
    for parts in sorted(texts):  # the order of the paths' parts, as pathlib sorts them
        docs += [p.strip() for p in texts[parts].split("\n\n") if len(p.strip()) >= MIN_PARAGRAPH_CHARS]
    return docs


def write_documents(docs: list[str], output_root: Path) -> Path:
    """docs_selected.jsonl and its sidecar, as the hub has them."""
    output_root.mkdir(parents=True, exist_ok=True)
    docs_path = output_root / DOCS_FILE
    write_text_atomically(docs_path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    sha, num_docs = docs_digest(docs_path)
    write_text_atomically(sidecar_path_for(docs_path), json.dumps({"docs_sha256": sha, "num_docs": num_docs}) + "\n")
    return docs_path


def display_path(path: Path) -> str:
    """Relative to the current folder when inside it, so the printed command is short and portable."""
    path = path.resolve()
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def build_smoke_dataset(output_root: Path, vocab_size: int, repo_root: Path = REPO_ROOT) -> tuple[dict, str]:
    """The export of the smoke text of `repo_root`'s HEAD, and that commit."""
    commit = head_commit(repo_root)
    docs = repository_documents(repo_root, commit)
    if len(docs) < MIN_DOCS:
        raise ExportError(f"commit {commit} of {repo_root} has only {len(docs)} paragraphs of text; the smoke "
                          f"dataset needs at least {MIN_DOCS}")
    random.Random(0).shuffle(docs)  # validation and training text from the same mix, as in FineWeb's shuffled list
    num_val_docs = min(MAX_VAL_DOCS, len(docs) // 5)
    train_bytes = sum(len(d.encode("utf-8")) for d in docs[num_val_docs:])
    shard_tokens = max(1, train_bytes // (3 * TRAIN_SHARDS_WANTED))  # ~3 bytes per token at this vocabulary
    spec = TokenizerSpec(name=f"sp_bpe_smoke_{vocab_size}", dataset_suffix="smoke", vocab_size=vocab_size)
    manifest = build_export(write_documents(docs, output_root), output_root, [spec], num_val_docs=num_val_docs,
                            shard_tokens=shard_tokens, tokenizer_train_docs=len(docs))
    if manifest["datasets"][0]["stats"]["files_train"] < 2:
        raise ExportError(f"the smoke dataset in {output_root} has fewer than 2 training shards")
    return manifest, commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", type=Path, default=Path(__file__).resolve().parent / "smoke",
                        help="where the export goes (default: data/smoke)")
    parser.add_argument("--vocab-size", type=int, default=512, help="SentencePiece vocabulary (default 512)")
    args = parser.parse_args(argv)
    try:
        manifest, commit = build_smoke_dataset(args.output_root, args.vocab_size)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dataset, tokenizer = manifest["datasets"][0], manifest["tokenizers"][0]
    stats = dataset["stats"]
    print(f"smoke text: the *.md and *.py files of commit {commit} (HEAD; edits and untracked files are not read)")
    print(f"smoke dataset: {stats['docs_val']} val docs ({stats['tokens_val']:,} tokens), {stats['docs_train']} "
          f"train docs ({stats['tokens_train']:,} tokens) in {stats['files_train']} train shards")
    print(f"DATA_PATH={display_path(args.output_root / dataset['path'])} "
          f"TOKENIZER_PATH={display_path(args.output_root / tokenizer['model_path'])} "
          f"VOCAB_SIZE={dataset['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
