"""Validation of a model trained on packed documents (PACK_DOCUMENTS=1): each document attends within itself, as in
training. Plain passes (periodic validation, the round trip) score the 1.0714 record's packed rows (its eval_val:
rows of VAL_BATCH_SIZE / 8 tokens, documents cut at every BOS and every TRAIN_SEQ_LEN tokens), checked against the
record's own eval_val run on the CPU (tests/reference_record.py) on the same weights.

Reduced size: test_record_1_0714_model's model (11 layers of 64, loops on, gates, two lanes), TRAIN_SEQ_LEN 32,
VAL_BATCH_SIZE 1,024: rows of 128 tokens. Tolerance: relative 1e-6, fp32 on the CPU: the model's logits agree to 1e-6
(their operations differ in order), the sums are float64. The record drops each rank's last incomplete batch of rows;
the kit scores every token (its last row ends at the split's end, overlapping the one before, and scores the rest).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from reference_record import load_record
from test_lora_ttt import cpu_runtime
from test_record_1_0714_model import REDUCED_KIT, REDUCED_RECORD, one_thread, perturbed_pair  # noqa: F401
from train_gpt import Settings

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, ROW, RTOL = 128, 128, 1e-6
PACKED = dict(REDUCED_KIT, pack_documents=1, val_batch_size=8 * ROW, loader_streams=8)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    env = {**REDUCED_RECORD, "VAL_BATCH_TOKENS": 8 * ROW, "EVAL_SEQ_LEN": 32}
    return load_record(tmp_path_factory.mktemp("record_eval_val"), {k: str(v) for k, v in env.items()},
                       record="1.0714")


def split_and_table(num_scored: int, seed: int = 0) -> tuple[train_gpt.ValidationSplit, train_gpt.ByteTable]:
    """Documents of 3 to 90 tokens (some cut at 32 and 64 tokens, some across rows), BOS first."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, num_scored + 1)
    starts = np.cumsum(rng.integers(3, 90, num_scored)) - 3
    tokens[starts[starts < tokens.size]] = train_gpt.BOS_ID
    table = train_gpt.ByteTable(rng.integers(0, 4, VOCAB), rng.random(VOCAB) < 0.5, rng.random(VOCAB) < 0.1)
    return train_gpt.ValidationSplit(tokens.astype(np.uint16), True), table


def kit_sums(record, split, table, runtime=None, stride: int = 0, smear: bool = True, **overrides) -> torch.Tensor:
    """(nats, tokens, bytes) of the kit's evaluate on the perturbed model, recurrence on; smear=False: SmearGate's
    lambda 0 (the identity), as the record's runs leave it (its optimizers do not train it)."""
    _, model = perturbed_pair(record, seed=4)
    model.recurrence_active = True
    with torch.no_grad():
        model.smear_lambda.mul_(smear)
    runtime = runtime or cpu_runtime(grad_accum_steps=8)
    if runtime.compute_dtype == torch.bfloat16:
        model.tok_emb.to(torch.bfloat16)
    evaluator = train_gpt.Evaluator(split, table, Settings(**{**PACKED, **overrides}), runtime)
    sums = []
    evaluator.reduce = lambda s: sums.append(s) or (0.0, 0.0)
    evaluator.evaluate(model, stride)
    return sums[0]


def score(sums: torch.Tensor) -> tuple[float, float]:
    nats, tokens, num_bytes = sums.tolist()
    return nats / tokens, nats / tokens / np.log(2) * tokens / num_bytes


def record_eval_val(record, split, table) -> tuple[float, float]:
    theirs, _ = perturbed_pair(record, seed=4)
    theirs.looping_active = True
    val_data = SimpleNamespace(val_tokens=torch.from_numpy(split.tokens.astype(np.int64)),
                               base_bytes_lut=torch.from_numpy(table.base_bytes).to(torch.int16),
                               has_leading_space_lut=torch.from_numpy(table.has_leading_space),
                               is_boundary_token_lut=torch.from_numpy(table.is_boundary))
    return record.eval_val(record.Hyperparameters(), torch.device("cpu"), val_data, theirs)


def test_packed_rows_score_as_the_records_eval_val(record):
    """One process of the record (8 accumulation steps) on 4 whole rows: it drops nothing, the rows are the kit's."""
    split, table = split_and_table(4 * ROW)
    expected = record_eval_val(record, split, table)
    assert score(kit_sums(record, split, table)) == pytest.approx(expected, rel=RTOL)
    dense = score(kit_sums(record, split, table, pack_documents=0))  # the documents' cuts matter
    assert abs(dense[0] / expected[0] - 1) > 100 * RTOL


def test_packed_rows_score_every_token_once_on_any_split_into_ranks(record):
    """4.5 rows: the record (one process) would score 4; the kit's last row ends at the split's end and scores its
    last 64 targets. Two ranks' shares add up to one rank's sums."""
    split, table = split_and_table(4 * ROW + ROW // 2, seed=1)
    one = kit_sums(record, split, table)
    assert one[1] == split.num_scored
    two = sum(kit_sums(record, split, table, cpu_runtime(rank=r, world_size=2, grad_accum_steps=4)) for r in (0, 1))
    assert two.tolist() == pytest.approx(one.tolist(), rel=1e-12)


def test_sliding_windows_of_packed_documents_do_not_see_each_other(record):
    """EVAL_STRIDE with PACK_DOCUMENTS: a batch of windows is one packed row cut at each window's start too, so a
    window scores as when it is alone in its batch (VAL_BATCH_SIZE of one window a rank), but for a trained SmearGate,
    which mixes the previous window's last token into a window's first."""
    split, table = split_and_table(4 * ROW, seed=2)
    batched, alone = (kit_sums(record, split, table, stride=8, smear=False, val_batch_size=size) for size in (
        8 * ROW, 8 * 32))
    assert batched.tolist() == pytest.approx(alone.tolist(), rel=RTOL) and batched[1] == split.num_scored
    assert not torch.allclose(batched, kit_sums(record, split, table, stride=8, smear=False, pack_documents=0),
                              rtol=100 * RTOL)


def test_packed_rows_in_bf16_are_finite_and_close_to_fp32(record):
    """PRECISION=bf16 on the CPU (CUDA's configuration): 8 significant bits in every activation, averaged over 512
    tokens; measured 0.1%."""
    split, table = split_and_table(4 * ROW)
    bf16 = score(kit_sums(record, split, table, cpu_runtime(torch.bfloat16, grad_accum_steps=8)))
    assert np.isfinite(bf16[1]) and bf16 == pytest.approx(score(kit_sums(record, split, table)), rel=1e-2)
