"""The trainer's shard reader, training batches and validation isolation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import train_gpt
from conftest import write_split_shards
from shard_io import write_shard


def cpu_runtime(rank=0, world_size=1, grad_accum_steps=1) -> train_gpt.Runtime:
    return train_gpt.Runtime(torch.device("cpu"), rank, world_size, 0, grad_accum_steps, torch.float32, False)


def test_reader_reads_what_the_data_tools_write(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 42], dtype=np.uint16)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert np.array_equal(train_gpt.read_shard(tmp_path / "fineweb_train_000000.bin"), tokens)


def test_shard_with_bad_magic_is_rejected_by_name(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(10))
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{path}: not a shard"):
        train_gpt.read_shard(path)


def test_truncated_shard_is_rejected_by_name(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(10))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=rf"{path}: 1042 bytes, but its header promises 10 tokens"):
        train_gpt.read_shard(path)


def test_missing_shards_say_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no train shards match .*fineweb.py --variant sp8192"):
        train_gpt.shard_paths(str(tmp_path), "train", 8192)


def test_tokenizer_of_another_vocabulary_is_rejected(tiny_dataset):
    with pytest.raises(ValueError, match=rf"vocabulary of {tiny_dataset.vocab_size} but VOCAB_SIZE=1024"):
        train_gpt.build_byte_table(tiny_dataset.tokenizer_path, 1024)


def test_token_ids_beyond_the_vocabulary_are_rejected(tmp_path):
    write_split_shards(tmp_path, "val", [np.array([5, 700, 3])], 1)
    with pytest.raises(ValueError, match=r"token id 700 >= VOCAB_SIZE=512"):
        train_gpt.load_validation_split(train_gpt.Settings(data_path=str(tmp_path), vocab_size=512, train_seq_len=2))


def make_split_data(folder, train_range=(10, 200), val_range=(300, 400), train_tokens=5000):
    """Train and val shards whose token ids come from disjoint ranges, so any leak is visible."""
    rng = np.random.default_rng(0)
    for i in range(3):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", rng.integers(*train_range, train_tokens // 3))
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(*val_range, 1000))


def test_training_batches_never_contain_validation_tokens(tmp_path):
    make_split_data(tmp_path)
    settings = train_gpt.Settings(data_path=str(tmp_path), vocab_size=512, train_seq_len=16, train_batch_tokens=256)
    loader = train_gpt.TrainBatchLoader(settings, cpu_runtime())
    seen = torch.cat([torch.cat((x.flatten(), y.flatten())) for _ in range(40) for x, y in loader.next_step()])
    assert seen.numel() > 2 * 5000  # the stream wrapped around the training shards at least once
    assert int(seen.max()) < 300 and all("val" not in p for p in loader.stream.paths)


def global_sequences(settings, world_size, grad_accum_steps, steps=3):
    """The (input, target) rows every rank trains on, over a few steps, in a canonical order."""
    rows = []
    for rank in range(world_size):
        loader = train_gpt.TrainBatchLoader(settings, cpu_runtime(rank, world_size, grad_accum_steps))
        for step in range(steps):
            for x, y in loader.next_step():
                rows += [(step, tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(x, y)]
    return sorted(rows)


def test_every_world_size_and_accumulation_trains_on_the_same_sequences(tmp_path):
    make_split_data(tmp_path)
    settings = train_gpt.Settings(data_path=str(tmp_path), vocab_size=512, train_seq_len=8, train_batch_tokens=128)
    reference = global_sequences(settings, 1, 1)
    assert len(reference) == 3 * 16
    for world_size, accum in [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)]:
        assert global_sequences(settings, world_size, accum) == reference


def test_targets_are_the_next_tokens_of_one_contiguous_block(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 500)
    settings = train_gpt.Settings(data_path=str(tmp_path), vocab_size=512, train_seq_len=4, train_batch_tokens=16)
    (x, y), = train_gpt.TrainBatchLoader(settings, cpu_runtime()).next_step()
    assert x.flatten().tolist() == list(range(16)) and y.flatten().tolist() == list(range(1, 17))
