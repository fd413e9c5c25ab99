"""The validation split is checked against TOKENIZER_PATH at start-up, before any training:
a split that counts zero bytes, or shards made with another tokenizer, stop the run with one `error:` line.

The threshold (95% kept) was measured on ../shared/data with `PYTHONPATH=.:data python3 tests/test_tokenizer_match.py
[TEXT...]` (`measure` below, written apart from the trainer; for the code, TEXT is `$(git ls-files '*.py')`): a text,
its lines grouped into documents of >= 2000 characters, encoded with tokenizer A as shards are (BOS + ids per
document); then 21 windows of 4096 tokens (the start and 20 random offsets) decoded and re-encoded with tokenizer B
between control and unknown ids, and the pieces compared without their spaces (difflib matching blocks). The share
of A's pieces kept, min..max over the windows ("ids>=vocab": A's ids do not fit B's vocabulary; the id check
refuses those shards already):

    FineWeb-Edu sample            sp1024        sp2048        sp4096        sp8192       caseops
    sp1024                  0.998..1.000  0.788..0.863  0.651..0.788  0.463..0.528  0.510..0.593
    sp2048                    ids>=vocab  0.997..1.000  0.776..0.891  0.495..0.582  0.563..0.618
    sp4096                    ids>=vocab    ids>=vocab  0.996..1.000  0.567..0.640  0.611..0.672
    sp8192                    ids>=vocab    ids>=vocab    ids>=vocab  1.000..1.000  0.841..0.891
    caseops                   ids>=vocab    ids>=vocab    ids>=vocab  0.819..0.886  0.999..1.000

    the kit's Python code         sp1024        sp2048        sp4096        sp8192       caseops
    sp1024                  0.988..0.998  0.813..0.886  0.775..0.855  0.601..0.776  0.686..0.813
    sp2048                    ids>=vocab  0.981..0.997  0.864..0.926  0.631..0.761  0.681..0.806
    sp4096                    ids>=vocab    ids>=vocab  0.986..0.996  0.656..0.784  0.699..0.816
    sp8192                    ids>=vocab    ids>=vocab    ids>=vocab  1.000..1.000  0.843..0.917
    caseops                   ids>=vocab    ids>=vocab    ids>=vocab  0.649..0.802  1.000..1.000

Own shards keep >= 99.6% of FineWeb (>= 98.1% of code, whose spaces and characters the small vocabularies lack),
another tokenizer's <= 89.1% (<= 92.6% of code): 95% lies between. A window took 0.1 to 0.25 s on a busy CPU core.
Compared as token ids instead, without dropping spaces, own shards of code kept only 92%, as low as others'.
"""
from __future__ import annotations

import re
import shutil
from functools import partial
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
    with pytest.raises(ValueError, match=rf"^the validation split has zero bytes under TOKENIZER_PATH: .*{named}"):
        train_gpt.check_split_fits_tokenizer(split_of(tokens), table, settings)


def test_a_byte_tokenizer_whose_ids_all_count_zero_bytes_is_refused(tmp_path):
    tokenizer = tmp_path / "no_bytes.json"
    tokenizer.write_text('{"vocab_size": 260, "byte_offset": 260}')  # every id special: no byte ids at all
    settings = settings_for(tokenizer, 260)
    table = train_gpt.build_byte_table(str(tokenizer), 260)
    with pytest.raises(ValueError, match=r"^the validation split has zero bytes"):
        train_gpt.check_split_fits_tokenizer(split_of(np.arange(1000) % 260), table, settings)


def test_a_byte_tokenizer_split_skips_the_round_trip(tmp_path):
    tokenizer = tmp_path / "byte260.json"
    tokenizer.write_text('{"vocab_size": 260, "byte_offset": 4}')
    table = train_gpt.build_byte_table(str(tokenizer), 260)
    random_bytes = np.random.default_rng(0).integers(4, 260, 5000)  # not even UTF-8: any id sequence is valid
    train_gpt.check_split_fits_tokenizer(split_of(random_bytes), table, settings_for(tokenizer, 260))


# ----------------------------------------------------------------------------------------------
# The byte table counts the validation text's own UTF-8 bytes (SPEC.md: <unk> 0): a tokenizer whose piece types were
# changed (one byte: <s> typed NORMAL gives BOS 3 bytes, and the first piece of each document its space) is refused.

BOS_CONTROL = b"\n\x03<s>\x15\x00\x00\x00\x00\x18\x03"  # the piece "<s>": its text, score 0.0, type 3 (CONTROL)


def with_bos_as_a_normal_piece(model: Path, folder: Path) -> Path:
    raw = model.read_bytes()
    assert raw.count(BOS_CONTROL) == 1
    doctored = folder / f"doctored_{model.name}"
    doctored.write_bytes(raw.replace(BOS_CONTROL, BOS_CONTROL[:-1] + b"\x01"))  # type 1: NORMAL
    return doctored


def split_and_table(tokenizer: Path, vocab_size: int, made_with: Path, count: int = 200):
    sp = spm.SentencePieceProcessor(model_file=str(made_with))
    tokens = np.concatenate([np.concatenate(([1], ids)) for ids in sp.encode(sample_documents(count))])
    return split_of(tokens), train_gpt.build_byte_table(str(tokenizer), vocab_size), settings_for(tokenizer, vocab_size)


@needs_shared
@pytest.mark.parametrize("name", VOCAB_SIZES)
def test_byte_accounting_of_each_tokenizer_holds_exactly_on_real_text(name):
    split, table, settings = split_and_table(TOKENIZERS[name], VOCAB_SIZES[name], TOKENIZERS[name])
    if name == "sp1024":  # its <unk> pieces (decoded " ⁇ ", counted 0) are in the sample
        assert (split.tokens == 3).any()
    train_gpt.check_byte_accounting(split, table, settings, num_docs=10**6)  # every document of the sample


@needs_shared
@pytest.mark.parametrize("name", ["sp1024", "sp8192"])
def test_a_published_tokenizer_with_bos_doctored_into_a_normal_piece_is_refused(tmp_path, name):
    doctored = with_bos_as_a_normal_piece(TOKENIZERS[name], tmp_path)
    split, table, settings = split_and_table(doctored, VOCAB_SIZES[name], TOKENIZERS[name])
    assert table.base_bytes[1] == 3 and not table.is_boundary[1]  # the doctored table: "<s>" is 3 bytes of text
    with pytest.raises(ValueError, match=rf"^TOKENIZER_PATH={re.escape(str(doctored))} miscounts the validation text "
                                         r"\(SPEC.md\): \d+ bytes in sampled documents of \d+ UTF-8 bytes; ids of no "
                                         r"text in it: \[\]; use the unmodified tokenizer of the shards in DATA_PATH="):
        train_gpt.check_byte_accounting(split, table, settings)


def tiny_split_with(tiny_dataset, make) -> tuple:
    """Two documents of the tiny tokenizer's text, BOS + ids, with `make(ids)` as the first one's ids."""
    sp = spm.SentencePieceProcessor(model_file=tiny_dataset.tokenizer_path)
    ids = sp.encode(tiny_dataset.docs[0])
    split = split_of(np.concatenate(([1], make(ids), [1], ids, [1], ids)))
    table = train_gpt.build_byte_table(tiny_dataset.tokenizer_path, tiny_dataset.vocab_size)
    return split, table, settings_for(Path(tiny_dataset.tokenizer_path), tiny_dataset.vocab_size)


def test_a_control_id_inside_a_document_is_refused(tiny_dataset):
    split, table, settings = tiny_split_with(tiny_dataset, lambda ids: ids[:10] + [0] + ids[10:])  # <pad>: no text
    with pytest.raises(ValueError, match=r"^TOKENIZER_PATH=.* miscounts the validation text .* ids of no text in it: "
                                         r"\[0\]; "):
        train_gpt.check_byte_accounting(split, table, settings)


def test_eos_ending_a_document_is_accepted(tiny_dataset):
    train_gpt.check_byte_accounting(*tiny_split_with(tiny_dataset, lambda ids: ids + [2]))


def test_a_byte_tokenizer_counts_its_bytes_and_one_doctored_to_count_bos_is_refused(tmp_path):
    text = ["naïve café ✓ one", "two ≠ three", "and a fourth"]
    tokens = np.concatenate([[1, *(4 + b for b in doc.encode("utf-8"))] for doc in text])
    for offset, refused in ((4, False), (1, True)):  # byte_offset 1: BOS (id 1) would count as a byte
        tokenizer = tmp_path / f"byte260_{offset}.json"
        tokenizer.write_text(f'{{"vocab_size": 260, "byte_offset": {offset}, "bos_id": 1, "eos_id": 2}}')
        table = train_gpt.build_byte_table(str(tokenizer), 260)
        check = partial(train_gpt.check_byte_accounting, split_of(tokens), table, settings_for(tokenizer, 260))
        if not refused:
            check()
            continue
        with pytest.raises(ValueError, match=r"miscounts the validation text \(SPEC.md\): \d+ bytes in sampled"):
            check()


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
    assert error.startswith("error: the validation split has zero bytes under TOKENIZER_PATH")


def test_trainer_stops_before_training_on_shards_of_another_tokenizer(tmp_path, tiny_dataset):
    val = train_gpt.read_shard(next(Path(tiny_dataset.data_path).glob("fineweb_val_*.bin")))
    other = np.where(val == 1, 1, (val.astype(np.int64) * 7 + 3) % tiny_dataset.vocab_size)  # ids of another vocab
    error, _ = run_with_val_tokens(tmp_path, tiny_dataset, other, "other_tokenizer")
    assert error.startswith("error: the validation shards were not made with TOKENIZER_PATH")
    assert f"TOKENIZER_PATH={tiny_dataset.tokenizer_path}" in error and str(tmp_path / "data") in error


def test_trainer_stops_before_training_with_a_tokenizer_doctored_in_one_byte(tmp_path, tiny_dataset):
    doctored = with_bos_as_a_normal_piece(Path(tiny_dataset.tokenizer_path), tmp_path)
    env = trainer_env(tiny_dataset, TOKENIZER_PATH=doctored, RUN_ID="doctored", ITERATIONS=2, WARMUP_STEPS=0)
    result = run_trainer(env, tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: TOKENIZER_PATH={doctored} miscounts the validation text")
    assert not re.search(r"^(warmup_)?step:", read_log(tmp_path, "doctored"), re.MULTILINE)


def measure(text_paths: list[Path], windows: int = 20, length: int = 4096) -> None:
    """Print a table of the module's docstring for the texts (default: the FineWeb-Edu sample), read as one."""
    import difflib
    import time
    text = "\n".join(path.read_text(encoding="utf-8") for path in text_paths or [FINEWEB_SAMPLE])
    docs, lines = [], []
    for line in text.splitlines():
        lines.append(line)
        if sum(map(len, lines)) >= 2000:
            docs, lines = docs + ["\n".join(lines)], []
    tokenizers = {name: spm.SentencePieceProcessor(model_file=str(path)) for name, path in TOKENIZERS.items()}
    print("".ljust(12) + "".join(name.rjust(14) for name in tokenizers))
    slowest = 0.0
    for a, sp_a in tokenizers.items():
        stream = np.concatenate([np.concatenate(([1], ids)) for ids in sp_a.encode(docs)])
        starts = [0, *np.random.default_rng(0).integers(0, stream.size - length, windows)]
        row = a.ljust(12)
        for b, sp_b in tokenizers.items():
            if stream.max() >= sp_b.vocab_size():
                row += "ids>=vocab".rjust(14)
                continue
            no_text = {i for i in range(sp_b.vocab_size()) if sp_b.is_control(i) or sp_b.is_unknown(i)}
            shares = []
            for start in starts:
                began, kept, total, run = time.perf_counter(), 0, 0, []
                for i in [*stream[start:start + length].tolist(), None]:
                    if i is not None and i not in no_text:
                        run.append(i)
                        continue
                    old = [p.replace("\u2581", "") for p in map(sp_b.id_to_piece, run)]
                    new = [p.replace("\u2581", "") for p in sp_b.encode(sp_b.decode(run), out_type=str)]
                    old, new = [p for p in old if p], [p for p in new if p]
                    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
                    kept, total, run = kept + sum(m.size for m in matcher.get_matching_blocks()), total + len(old), []
                shares.append(kept / total)
                slowest = max(slowest, time.perf_counter() - began)
            row += f"{min(shares):.3f}..{max(shares):.3f}".rjust(14)
        print(row, flush=True)
    print(f"slowest window: {slowest:.3f} s")


if __name__ == "__main__":
    import sys
    measure([Path(arg) for arg in sys.argv[1:]])
