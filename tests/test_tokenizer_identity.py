"""The published tokenizers, known by their sha256: train_gpt.py's table and the submission README's line.
(The downloader's check and the trainer's log line are run in test_data_download.py and test_data_smoke.py.)"""
from __future__ import annotations

import hashlib

import pytest

import train_gpt
from conftest import SHARED_DATA
from test_records import folder_of, render_log, submit, write_logs

TOKENIZERS = SHARED_DATA / "tokenizers"
CUSTOM = "custom sha256:" + "ab" * 32  # the trainer's line; older trainers wrote "custom (sha256 <hex>)"


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (the published tokenizers)")
def test_each_published_tokenizer_is_known_by_its_sha256():
    expected = {sha256_of(TOKENIZERS / f"fineweb_{v}_bpe.model"): f"sp{v}" for v in (1024, 2048, 4096, 8192)}
    assert train_gpt.PUBLISHED_TOKENIZERS == expected
    # The CaseOps tokenizer is left out: its case operators (U+E001..U+E004) are 3-byte pieces to the byte table,
    # while they stand for no byte of the text, so a score made with it here is not the records' score.
    assert sha256_of(TOKENIZERS / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model") not in expected


def readme_with(tmp_path, *tokenizer_lines: str | None) -> str:
    texts = [render_log(seed, 2.05 + seed / 1000) for seed in range(1, len(tokenizer_lines) + 1)]
    texts = [text if line is None else text.replace("model_params:", f"tokenizer: {line}\nmodel_params:")
             for text, line in zip(texts, tokenizer_lines)]
    assert submit(tmp_path, write_logs(tmp_path / "logs", *texts)) == 0
    return (folder_of(tmp_path) / "README.md").read_text()


def test_readme_names_the_published_tokenizer_of_the_logs(tmp_path):
    assert "- tokenizer: published sp8192\n" in readme_with(tmp_path, "published sp8192", "published sp8192")


@pytest.mark.parametrize("line", [CUSTOM, "custom (sha256 " + "ab" * 32 + ")"])
def test_readme_names_a_custom_tokenizer_with_its_sha256(tmp_path, line):
    assert f"- tokenizer: {CUSTOM}\n" in readme_with(tmp_path, line, line)


def test_readme_says_when_the_logs_do_not_name_the_tokenizer(tmp_path):
    assert "- tokenizer: not named in the logs" in readme_with(tmp_path, None, None)
