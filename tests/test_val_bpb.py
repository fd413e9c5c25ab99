"""val_bpb is the score: its byte table and its arithmetic are checked against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import train_gpt
from conftest import SHARED_DATA, write_split_shards

SP1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt"
needs_shared = pytest.mark.skipif(not SP1024.exists(), reason="../shared/data is absent")


def fineweb_documents() -> list[str]:
    """The sample runs documents together; its lines (paragraphs) serve as documents."""
    return [line for line in FINEWEB_SAMPLE.read_text(encoding="utf-8").split("\n") if line.strip()]


def decoded_utf8_bytes(sp: spm.SentencePieceProcessor, ids: list[int]) -> int:
    """UTF-8 length of the decoded text, with SPEC's <unk> rule: <unk> counts 0 bytes and, like BOS, starts
    a new segment (decode drops the leading space of a segment's first piece, as the table does)."""
    total, segment = 0, []
    for i in ids + [sp.unk_id()]:
        if i == sp.unk_id():
            total += len(sp.decode(segment).encode("utf-8")) if segment else 0
            segment = []
        else:
            segment.append(i)
    return total


def table_bytes_of_documents(table: train_gpt.ByteTable, docs_ids: list[list[int]]) -> int:
    stream = np.concatenate([np.concatenate(([1], ids)) for ids in docs_ids]).astype(np.int64)
    return int(table.target_bytes(stream[:-1], stream[1:]).sum())


@needs_shared
@pytest.mark.parametrize("vocab_size, num_tokens", [(1024, 300_000), (8192, 260_000)])  # sp8192: the default
def test_byte_table_equals_decoded_utf8_on_real_fineweb_with_a_published_tokenizer(vocab_size, num_tokens):
    model = SHARED_DATA / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs_ids = sp.encode(fineweb_documents())
    table = train_gpt.build_byte_table(str(model), vocab_size)
    expected = sum(decoded_utf8_bytes(sp, ids) for ids in docs_ids)
    assert sum(map(len, docs_ids)) > num_tokens  # the whole sample, not a toy
    if vocab_size == 1024:  # sp8192 has no <unk> on this sample
        assert any(sp.unk_id() in ids for ids in docs_ids)  # the <unk> rule is exercised
    assert table_bytes_of_documents(table, docs_ids) == expected


def test_byte_table_equals_decoded_utf8_with_a_tokenizer_trained_here(tiny_dataset):
    sp = spm.SentencePieceProcessor(model_file=tiny_dataset.tokenizer_path)
    docs_ids = sp.encode(tiny_dataset.docs)
    table = train_gpt.build_byte_table(tiny_dataset.tokenizer_path, tiny_dataset.vocab_size)
    expected = sum(decoded_utf8_bytes(sp, ids) for ids in docs_ids)
    assert table_bytes_of_documents(table, docs_ids) == expected


def test_byte260_table_counts_one_byte_per_byte_token(tmp_path):
    path = tmp_path / "byte260.json"
    path.write_text('{"kind": "byte", "vocab_size": 260, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, '
                    '"byte_offset": 4}')
    text = "naïve café ✓"
    ids = np.array([1] + [b + 4 for b in text.encode("utf-8")])
    table = train_gpt.build_byte_table(str(path), 260)
    assert int(table.target_bytes(ids[:-1], ids[1:]).sum()) == len(text.encode("utf-8"))


def cpu_runtime() -> train_gpt.Runtime:
    return train_gpt.Runtime(torch.device("cpu"), rank=0, world_size=1, local_rank=0, grad_accum_steps=1,
                             compute_dtype=torch.float32, compile=False)


def per_token_nats(model: train_gpt.GPT, tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """-log p(target) from the logits, computed without the evaluator or cross_entropy."""
    x = torch.from_numpy(tokens[:-1].astype(np.int64)).view(-1, seq_len)
    y = torch.from_numpy(tokens[1:].astype(np.int64)).view(-1, seq_len)
    with torch.no_grad():
        logits = model.logits(x).double()
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
    return -log_probs.gather(-1, y[..., None]).squeeze(-1).flatten().numpy()


def per_document_nats(model: train_gpt.GPT, tokens: np.ndarray, seq_len: int, row: int) -> np.ndarray:
    """The same for packed rows of `row` tokens (PACK_DOCUMENTS=1): each piece of a document (cut at every BOS, every
    seq_len tokens into it, and at the row's start) run through the model alone, as its own sequence."""
    nats = []
    for start in range(0, tokens.size - 1, row):
        x, y = tokens[start:start + row], tokens[start + 1:start + row + 1]
        doc_starts = [i for i in range(row) if i == 0 or x[i] == train_gpt.BOS_ID] + [row]
        cuts = [c for a, b in zip(doc_starts, doc_starts[1:]) for c in range(a, b, seq_len)] + [row]
        for a, b in zip(cuts, cuts[1:]):
            nats.append(per_token_nats(model, np.append(x[a:b], y[b - 1]), b - a))
    return np.concatenate(nats)


def assert_val_bpb_matches_independent_computation(tmp_path, sp_model: str, vocab_size: int, docs: list[str],
                                                   preset: str):
    """PRESET=1.0810: plain windows of TRAIN_SEQ_LEN; the default: packed rows of VAL_BATCH_SIZE / 8 tokens."""
    seq_len, batch = 32, 7 * 32
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    docs_ids = sp.encode(docs)
    stream_len = sum(len(ids) + 1 for ids in docs_ids)
    padding = (-(stream_len - 1)) % batch  # trailing BOS tokens (zero bytes) make the split whole batches
    write_split_shards(tmp_path, "val", [np.array(ids) for ids in docs_ids] + [np.array([], dtype=int)] * padding, 1)
    settings = train_gpt.Settings.for_preset(preset, data_path=str(tmp_path), tokenizer_path=sp_model,
                                             vocab_size=vocab_size, train_seq_len=seq_len, val_batch_size=batch,
                                             num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, recur_layers="",
                                             parallel_start_layer=0)
    split = train_gpt.load_validation_split(settings)
    assert split.is_full and split.num_scored == stream_len + padding - 1
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    for p in model.parameters():  # a model that predicts something other than uniform
        p.data.add_(0.05 * torch.randn_like(p))
    if settings.smear_frozen:  # the default's SmearGate stays the identity (across a BOS it would mix documents)
        model.smear_lambda.data.zero_()
    evaluator = train_gpt.Evaluator(split, train_gpt.build_byte_table(sp_model, vocab_size), settings, cpu_runtime())
    val_loss, val_bpb = evaluator.evaluate(model)

    packed = settings.pack_documents  # the pieces alone: rotary angles of other positions, equal to float rounding
    nats = per_document_nats(model, split.tokens, seq_len, batch) if packed else per_token_nats(model, split.tokens,
                                                                                               seq_len)
    total_bytes = sum(decoded_utf8_bytes(sp, ids) for ids in docs_ids)
    assert nats.size == split.num_scored
    assert val_loss == pytest.approx(nats.mean(), rel=1e-6 if packed else 1e-9)
    assert val_bpb == pytest.approx(nats.sum() / math.log(2) / total_bytes, rel=1e-6 if packed else 1e-9)


@needs_shared
@pytest.mark.parametrize("preset", ["strong", "1.0810"])
@pytest.mark.parametrize("vocab_size", [1024, 8192])
def test_val_bpb_equals_bits_over_decoded_bytes_on_fineweb_with_a_published_tokenizer(tmp_path, vocab_size, preset):
    model = SHARED_DATA / "tokenizers" / f"fineweb_{vocab_size}_bpe.model"
    assert_val_bpb_matches_independent_computation(tmp_path, str(model), vocab_size, fineweb_documents()[:120], preset)


@pytest.mark.parametrize("preset", ["strong", "1.0810"])
def test_val_bpb_equals_bits_over_decoded_bytes_with_a_tokenizer_trained_here(tmp_path, tiny_dataset, preset):
    assert_val_bpb_matches_independent_computation(tmp_path, tiny_dataset.tokenizer_path, tiny_dataset.vocab_size,
                                                   tiny_dataset.docs[:60], preset)


def test_evaluation_does_not_depend_on_batch_size(tmp_path, tiny_dataset):
    """Plain windows (PRESET=1.0810); packed rows are the record's rows of VAL_BATCH_SIZE / 8 tokens, by design."""
    settings = train_gpt.Settings.for_preset("1.0810", data_path=tiny_dataset.data_path, tokenizer_path=tiny_dataset.tokenizer_path,
                                             vocab_size=tiny_dataset.vocab_size, train_seq_len=64, num_layers=1,
                                             model_dim=32, num_heads=2, num_kv_heads=2)
    split = train_gpt.load_validation_split(settings)
    table = train_gpt.build_byte_table(tiny_dataset.tokenizer_path, tiny_dataset.vocab_size)
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    scores = [train_gpt.Evaluator(split, table, train_gpt.Settings(**{**settings.__dict__, "val_batch_size": b}),
                                  cpu_runtime()).evaluate(model) for b in (64, 64 * 5, 64 * 1000)]
    assert scores[1] == pytest.approx(scores[0], rel=1e-12)
    assert scores[2] == pytest.approx(scores[0], rel=1e-12)


def test_max_val_tokens_scores_a_whole_sequence_prefix(tiny_dataset):
    settings = train_gpt.Settings(data_path=tiny_dataset.data_path, tokenizer_path=tiny_dataset.tokenizer_path,
                                  vocab_size=tiny_dataset.vocab_size, train_seq_len=64, max_val_tokens=200)
    split = train_gpt.load_validation_split(settings)
    full = train_gpt.load_validation_split(train_gpt.Settings(**{**settings.__dict__, "max_val_tokens": 0}))
    assert (split.num_scored, split.is_full, full.is_full) == (192, False, True)
    assert np.array_equal(split.tokens, full.tokens[:193])
    assert split.fingerprint() != full.fingerprint()


def test_logits_are_causal_and_normalised(tiny_dataset):
    settings = train_gpt.Settings(vocab_size=tiny_dataset.vocab_size, num_layers=3, model_dim=32, num_heads=4,
                                  num_kv_heads=2)
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, settings.vocab_size, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, settings.vocab_size, (2, 15))
    with torch.no_grad():
        before, after = model.logits(tokens), model.logits(changed)
    assert torch.equal(before[:, :25], after[:, :25])
    assert not torch.allclose(before[:, 25:], after[:, 25:])
    assert torch.allclose(F.softmax(before.double(), -1).sum(-1), torch.ones(2, 40, dtype=torch.float64))
