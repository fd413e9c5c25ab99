"""The validation split is checked against TOKENIZER_PATH at start-up, before any training (issue 16, items 5, 6):
a split that counts zero bytes, or shards made with another tokenizer, stop the run with one `error:` line.

The threshold (95% of the tokens kept) was measured on ../shared/data: the FineWeb-Edu sample, its lines grouped
into documents of >= 2000 characters, encoded with tokenizer A as shards are (BOS + ids per document), then each
of 21 windows of 4096 tokens (the start and 20 random offsets) decoded and re-encoded with tokenizer B,
document by document without control and unknown ids. The share of A's tokens kept (difflib matching blocks),
min..max over the windows ("ids>=vocab": A's ids do not fit B's vocabulary, refused by the id check already):

    A \\ B           sp1024        sp2048        sp4096        sp8192   sp8192caseops
    sp1024     0.990..1.000  0.788..0.862  0.651..0.788  0.438..0.508  0.489..0.581
    sp2048       ids>=vocab  0.989..1.000  0.776..0.890  0.480..0.571  0.536..0.600
    sp4096       ids>=vocab    ids>=vocab  0.980..1.000  0.545..0.626  0.595..0.667
    sp8192       ids>=vocab    ids>=vocab    ids>=vocab  1.000..1.000  0.835..0.889
    caseops      ids>=vocab    ids>=vocab    ids>=vocab  0.819..0.886  1.000..1.000

Own shards keep >= 98.0%, another tokenizer's <= 89.1%: 95% lies between. The tokenizer trained on the
repository's text (conftest.tiny_dataset) keeps >= 99.9% of its own split in every window. A window of 4096
tokens takes at most 40 ms on one CPU core.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from conftest import SHARED_DATA, read_log, run_trainer, trainer_env
from shard_io import write_shard

VOCAB_SIZES = {"sp1024": 1024, "sp2048": 2048, "sp4096": 4096, "sp8192": 8192, "caseops": 8192}
TOKENIZERS = {name: SHARED_DATA / "tokenizers" / f"fineweb_{VOCAB_SIZES[name]}_bpe.model" for name in VOCAB_SIZES}
TOKENIZERS["caseops"] = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt"
needs_shared = pytest.mark.skipif(not FINEWEB_SAMPLE.exists(), reason="../shared/data is absent")


def sample_documents(count: int = 16) -> list[str]:
    """The sample's first lines, grouped into documents of at least 2000 characters."""
    docs, lines = [], []
    for line in FINEWEB_SAMPLE.read_text(encoding="utf-8").splitlines():
        lines.append(line)
        if sum(map(len, lines)) >= 2000:
            docs.append("\n".join(lines))
            lines = []
            if len(docs) == count:
                return docs
    return docs


def split_of(tokens) -> train_gpt.ValidationSplit:
    return train_gpt.ValidationSplit(np.asarray(tokens, dtype=np.uint16), True)


def settings_for(tokenizer: Path, vocab_size: int, data_path: str = "/data/val") -> train_gpt.Settings:
    return train_gpt.Settings(data_path=data_path, tokenizer_path=str(tokenizer), vocab_size=vocab_size)


PAIRS = [(a, b) for a in VOCAB_SIZES for b in VOCAB_SIZES if VOCAB_SIZES[a] <= VOCAB_SIZES[b]]  # ids that fit


@needs_shared
@pytest.mark.parametrize("shards, tokenizer", PAIRS)
def test_shards_are_accepted_with_their_own_tokenizer_and_refused_with_another(shards, tokenizer):
    made_with = spm.SentencePieceProcessor(model_file=str(TOKENIZERS[shards]))
    tokens = np.concatenate([np.concatenate(([1], ids)) for ids in made_with.encode(sample_documents())])
    settings = settings_for(TOKENIZERS[tokenizer], VOCAB_SIZES[tokenizer])
    table = train_gpt.build_byte_table(settings.tokenizer_path, settings.vocab_size)
    if shards == tokenizer:
        train_gpt.check_split_fits_tokenizer(split_of(tokens), table, settings)
        return
    named = rf"DATA_PATH=/data/val and TOKENIZER_PATH={re.escape(settings.tokenizer_path)}"
    with pytest.raises(ValueError, match=r"^the validation shards were not made with TOKENIZER_PATH: only "
                                         rf"\d+\.\d% of \d+ tokens .*{named}"):
        train_gpt.check_split_fits_tokenizer(split_of(tokens), table, settings)


def test_the_split_of_a_tokenizer_trained_here_is_accepted(tiny_dataset):
    settings = settings_for(Path(tiny_dataset.tokenizer_path), tiny_dataset.vocab_size, tiny_dataset.data_path)
    split = train_gpt.load_validation_split(settings)
    table = train_gpt.build_byte_table(tiny_dataset.tokenizer_path, tiny_dataset.vocab_size)
    train_gpt.check_split_fits_tokenizer(split, table, settings)


@pytest.mark.parametrize("tokens", [[1, 0, 2, 3] * 50, [0] * 100, [1] * 3])  # pad, bos, eos, unk: zero bytes each
def test_a_split_of_control_ids_only_is_refused(tiny_dataset, tokens):
    settings = settings_for(Path(tiny_dataset.tokenizer_path), tiny_dataset.vocab_size)
    table = train_gpt.build_byte_table(tiny_dataset.tokenizer_path, tiny_dataset.vocab_size)
    named = rf"DATA_PATH=/data/val and TOKENIZER_PATH={re.escape(tiny_dataset.tokenizer_path)}"
    with pytest.raises(ValueError, match=rf"^the validation split counts zero bytes under TOKENIZER_PATH .*{named}"):
        train_gpt.check_split_fits_tokenizer(split_of(tokens), table, settings)


def test_a_byte_tokenizer_whose_ids_all_count_zero_bytes_is_refused(tmp_path):
    tokenizer = tmp_path / "no_bytes.json"
    tokenizer.write_text('{"vocab_size": 260, "byte_offset": 260}')  # every id special: no byte ids at all
    settings = settings_for(tokenizer, 260)
    table = train_gpt.build_byte_table(str(tokenizer), 260)
    with pytest.raises(ValueError, match=r"^the validation split counts zero bytes"):
        train_gpt.check_split_fits_tokenizer(split_of(np.arange(1000) % 260), table, settings)


def test_a_byte_tokenizer_split_skips_the_round_trip(tmp_path):
    tokenizer = tmp_path / "byte260.json"
    tokenizer.write_text('{"vocab_size": 260, "byte_offset": 4}')
    table = train_gpt.build_byte_table(str(tokenizer), 260)
    random_bytes = np.random.default_rng(0).integers(4, 260, 5000)  # not even UTF-8: any id sequence is valid
    train_gpt.check_split_fits_tokenizer(split_of(random_bytes), table, settings_for(tokenizer, 260))


# ----------------------------------------------------------------------------------------------
# Through the trainer: the error comes before the first training step, also into the run's log.


def run_with_val_tokens(tmp_path, dataset, val_tokens: np.ndarray, run_id: str) -> tuple[str, str]:
    data = tmp_path / "data"
    shutil.copytree(dataset.data_path, data)
    write_shard(data / "fineweb_val_000000.bin", val_tokens)
    env = trainer_env(dataset, DATA_PATH=data, RUN_ID=run_id, ITERATIONS=2, WARMUP_STEPS=0, VAL_LOSS_EVERY=0)
    result = run_trainer(env, tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    log = read_log(tmp_path, run_id)
    assert log.rstrip().splitlines()[-1] == error
    assert not re.search(r"^(warmup_)?step:", log, re.MULTILINE)  # no training step, no validation
    return error, log


def test_trainer_stops_before_training_on_a_split_without_bytes(tmp_path, tiny_dataset):
    error, _ = run_with_val_tokens(tmp_path, tiny_dataset, np.tile([1, 0, 2, 3], 200), "zero_bytes")
    assert error.startswith("error: the validation split counts zero bytes under TOKENIZER_PATH")


def test_trainer_stops_before_training_on_shards_of_another_tokenizer(tmp_path, tiny_dataset):
    val = train_gpt.read_shard(next(Path(tiny_dataset.data_path).glob("fineweb_val_*.bin")))
    other = np.where(val == 1, 1, (val.astype(np.int64) * 7 + 3) % tiny_dataset.vocab_size)  # ids of another vocab
    error, _ = run_with_val_tokens(tmp_path, tiny_dataset, other, "other_tokenizer")
    assert error.startswith("error: the validation shards were not made with TOKENIZER_PATH")
    assert f"TOKENIZER_PATH={tiny_dataset.tokenizer_path}" in error and str(tmp_path / "data") in error
