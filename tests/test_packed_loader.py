"""PACK_DOCUMENTS=1: the training rows are the 1.0714 record's DocumentPackingLoader's on its 8 GPUs, whatever the
real world size, with the record's cu_seqlens; its own loader code runs beside the kit's (record_pieces)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from record_pieces import record_pieces
from shard_io import write_shard
from test_train_data import cpu_runtime

SEQ_LEN, ROW = 16, 48  # each GPU's row: 48 tokens (3 x TRAIN_SEQ_LEN), a span of 49
LOADER_PIECES = {"BOS_ID", "load_data_shard", "get_next_multiple_of_n", "_build_cu_seqlens", "DocumentPackingLoader",
                 "_SHARD_HEADER_BYTES", "_SHARD_NTOKENS_CACHE", "_MMAP_CACHE", "_read_num_tokens",
                 "_get_shard_memmap", "ShuffledSequenceLoader"}


@pytest.fixture(scope="module")
def record():
    # pin_memory() needs CUDA; the pinned copy holds the same values
    return record_pieces(LOADER_PIECES, edits=((".pin_memory()", "", 3),))


def documents(rng, num_tokens: int, first_bos: int = 0) -> np.ndarray:
    """Documents of 1 to 60 tokens (many longer than TRAIN_SEQ_LEN), each a BOS then ids >= 2, after `first_bos`
    tokens of a document begun in the shard before."""
    tokens = rng.integers(2, 4096, num_tokens)
    bos = first_bos + np.cumsum(rng.integers(1, 61, num_tokens))
    tokens[bos[bos < num_tokens]] = train_gpt.BOS_ID
    return tokens


def write_packed_shards(folder, rng) -> list[int]:
    """Shards of uneven sizes: the first begins mid-document, the third is too short for the 8 spans (392 tokens)
    and is skipped, the fifth has no BOS at all. Returns each shard's 8-span steps, counted by hand."""
    specs = [(1500, 7), (900, 0), (300, 0), (1200, 3), (1000, None), (420, 0)]  # (tokens, first BOS)
    for i, (num_tokens, first) in enumerate(specs):
        tokens = documents(rng, num_tokens, first or 0) if first is not None else rng.integers(2, 4096, num_tokens)
        if first is not None:
            tokens[:first], tokens[first] = rng.integers(2, 4096, first), train_gpt.BOS_ID
        write_shard(folder / f"fineweb_train_{i:06d}.bin", tokens)
    return [(num_tokens - (first or 0)) // (8 * (ROW + 1)) for num_tokens, first in specs]


def packed_settings(folder, **overrides) -> train_gpt.Settings:
    return train_gpt.Settings(data_path=str(folder), vocab_size=4096, train_seq_len=SEQ_LEN,
                              train_batch_tokens=8 * ROW, pack_documents=1, **overrides)


def record_rows(record, folder, steps: int) -> list[list[tuple]]:
    """Per step, what each of the record's 8 GPUs trains on: (inputs, targets, cu_seqlens, max_seqlen passed)."""
    loaders = [record.DocumentPackingLoader(SimpleNamespace(rank=gpu, world_size=8, train_seq_len=SEQ_LEN,
                                                            train_files=str(folder / "fineweb_train_*.bin")),
                                            torch.device("cpu")) for gpu in range(8)]
    return [[(*loader.next_batch(8 * ROW, 1)[:3], SEQ_LEN) for loader in loaders] for _ in range(steps)]


def assert_same_rows(kit: list[tuple], reference: list[tuple]) -> None:
    assert len(kit) == len(reference)
    for (x, y, cu, max_len), (rx, ry, rcu, rmax_len) in zip(kit, reference):
        assert x.shape == (1, ROW) and torch.equal(x, rx) and torch.equal(y, ry)
        assert cu.dtype == torch.int32 and torch.equal(cu, rcu) and max_len == rmax_len


def test_one_and_two_processes_train_on_the_packed_rows_of_the_records_eight_gpus(tmp_path, record):
    """50 steps through 6 shards: 4.5 passes over them (the record's order, one shard skipped), every shard change
    taken by the 8 GPUs together. Kit rank p, micro-step m is the record's GPU m x world + p."""
    steps_per_shard = write_packed_shards(tmp_path, np.random.default_rng(3))
    reference = record_rows(record, tmp_path, 50)
    period = sum(steps_per_shard)  # the record's rows repeat after one pass
    assert period == 3 + 2 + 0 + 3 + 2 + 1
    assert torch.equal(reference[period][0][0], reference[0][0][0])
    assert not any(torch.equal(reference[step][0][0], reference[0][0][0]) for step in range(1, period))
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = train_gpt.TrainBatchLoader(packed_settings(tmp_path), cpu_runtime(rank, world_size,
                                                                                      8 // world_size))
            assert loader.packed.steps_per_shard == steps_per_shard
            for step in range(50):
                assert_same_rows(loader.next_step(), [reference[step][m * world_size + rank]
                                                      for m in range(8 // world_size)])


@pytest.mark.parametrize("density", [0.0, 0.02, 0.3, 0.9])
def test_cu_seqlens_are_the_records_for_any_documents(record, density):
    """Rows with no BOS, a BOS at 0 or not, documents past max_len several times, and more than 64 segments."""
    rng = np.random.default_rng(int(density * 100))
    for length, max_len in [(1, 4), (100, 7), (200, 16), (333, 2048), (150, 1)]:
        row = np.where(rng.random(length) < density, train_gpt.BOS_ID, 7)
        bos = np.flatnonzero(row == train_gpt.BOS_ID).tolist()
        expected, _ = record._build_cu_seqlens(bos, length, torch.device("cpu"), max_len, 64)
        assert torch.equal(train_gpt.document_cu_seqlens(row, max_len)[0], expected), (length, max_len)


def test_gptq_calibration_reads_the_records_rank_zero_sequences_with_packing(tmp_path, record):
    """The record calibrates on ShuffledSequenceLoader of GPU 0 (of 8), not on its packed rows."""
    write_packed_shards(tmp_path, np.random.default_rng(4))
    h = SimpleNamespace(rank=0, world_size=8, train_seq_len=SEQ_LEN, train_files=str(tmp_path / "fineweb_train_*.bin"))
    reference = record.ShuffledSequenceLoader(h, torch.device("cpu"))
    loader = train_gpt.TrainBatchLoader(packed_settings(tmp_path), cpu_runtime(0, 1, 8))
    for x, y in loader.calibration_batches(4):
        rx, ry = reference.next_batch(8 * ROW, 1)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_the_first_document_is_found_past_the_first_chunk():
    tokens = np.full(200_000, 5, dtype=np.uint16)
    tokens[[70_000, 90_000]] = train_gpt.BOS_ID
    assert train_gpt.first_bos(tokens) == 70_000 and train_gpt.first_bos(tokens[:1000]) == 0


@pytest.mark.parametrize("world_size, accum", [(2, 2), (16, 1), (3, 3)])
def test_layouts_that_are_not_the_records_eight_rows_are_refused(world_size, accum):
    with pytest.raises(train_gpt.SettingsError, match=rf"^GRAD_ACCUM_STEPS={accum} is invalid: it must be "
                                                      rf"LOADER_STREAMS / world size = 8 / {world_size} with"):
        train_gpt.Settings(pack_documents=1, train_batch_tokens=786_432 * 3).check_batch_layout(world_size, accum)
    train_gpt.Settings(pack_documents=1).check_batch_layout(2, 4)


def test_shards_too_short_for_the_eight_spans_are_an_error_at_start(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.ones(391))
    with pytest.raises(ValueError, match=r"no train shard in .* holds LOADER_STREAMS x .* = 392 tokens"):
        train_gpt.TrainBatchLoader(packed_settings(tmp_path), cpu_runtime(0, 1, 8))


@pytest.mark.parametrize("steps, iterations, warned", [(127, 20_000, True), (5_000, 20_000, False),
                                                       (127, 100, False)])
def test_the_log_says_when_the_packed_data_repeats(steps, iterations, warned):
    lines = []
    train_gpt.log_packed_data_repeat(lines.append, steps, train_gpt.Settings(iterations=iterations))
    assert lines[0] == f"train_data: packed documents; the shards repeat after {steps} steps"
    assert (len(lines) == 2 and lines[1].startswith(f"WARNING: the training data repeats after {steps} steps, "
                                                    f"before the 4843 steps")) == warned


def test_the_training_step_gives_the_model_each_rows_cu_seqlens(tmp_path, monkeypatch):
    """The model's forward takes (inputs, targets, cu_seqlens, max_seqlen), as the record's."""
    write_packed_shards(tmp_path, np.random.default_rng(5))
    calls, forward = [], train_gpt.GPT.forward
    monkeypatch.setattr(train_gpt.GPT, "forward", lambda model, inputs, targets, *documents:
                        calls.append((inputs, *documents)) or forward(model, inputs, targets))
    settings = packed_settings(tmp_path, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8,
                               recur_layers="", parallel_start_layer=0, device="cpu")
    train_gpt.Trainer(settings, cpu_runtime(0, 1, 8)).step(0, 1.0)
    rows = train_gpt.TrainBatchLoader(settings, cpu_runtime(0, 1, 8)).next_step()
    assert len(calls) == 8
    for (inputs, cu_seqlens, max_seqlen), (x, _, cu, max_len) in zip(calls, rows):
        assert torch.equal(inputs, x) and torch.equal(cu_seqlens, cu) and max_seqlen == max_len == SEQ_LEN
