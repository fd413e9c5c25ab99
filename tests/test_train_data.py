"""The trainer's shard reader, training batches (PRESET=1.0810: the 1.0810 record's loader; or the official one) and
validation isolation."""
from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import write_split_shards
from reference_record import load_record
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


@pytest.mark.parametrize("streams", [8, 0])
def test_training_batches_never_contain_validation_tokens(tmp_path, streams):
    make_split_data(tmp_path)
    settings = train_gpt.Settings.for_preset("1.0810", data_path=str(tmp_path), vocab_size=512, train_seq_len=16,
                                             train_batch_tokens=256, loader_streams=streams)
    loader = train_gpt.TrainBatchLoader(settings, cpu_runtime())
    seen = torch.cat([torch.cat((x.flatten(), y.flatten())) for _ in range(40) for x, y in loader.next_step()])
    assert seen.numel() > 2 * 5000  # the stream wrapped around the training shards at least once
    assert int(seen.max()) < 300 and all("val" not in p for p in loader.paths)


def global_sequences(settings, world_size, grad_accum_steps, steps=3):
    """The (input, target) rows every rank trains on, over a few steps, in a canonical order."""
    rows = []
    for rank in range(world_size):
        loader = train_gpt.TrainBatchLoader(settings, cpu_runtime(rank, world_size, grad_accum_steps))
        for step in range(steps):
            for x, y in loader.next_step():
                rows += [(step, tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(x, y)]
    return sorted(rows)


@pytest.mark.parametrize("streams", [8, 2, 0])
def test_every_world_size_and_accumulation_trains_on_the_same_sequences(tmp_path, streams):
    make_split_data(tmp_path)
    settings = train_gpt.Settings.for_preset("1.0810", data_path=str(tmp_path), vocab_size=512, train_seq_len=8,
                                             train_batch_tokens=128, loader_streams=streams)
    reference = global_sequences(settings, 1, 1)
    assert len(reference) == 3 * 16
    for world_size, accum in [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)]:
        assert global_sequences(settings, world_size, accum) == reference


def test_official_loader_targets_are_the_next_tokens_of_one_contiguous_block(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 500)
    settings = train_gpt.Settings.for_preset("baseline", data_path=str(tmp_path), vocab_size=512, train_seq_len=4,
                                             train_batch_tokens=16)
    (x, y), = train_gpt.TrainBatchLoader(settings, cpu_runtime()).next_step()
    assert x.flatten().tolist() == list(range(16)) and y.flatten().tolist() == list(range(1, 17))


# ----------------------------------------------------------------------------------------------
# The default loader is the 1.0810 record's ShuffledSequenceLoader, run by the record's own code beside it.

SEQ_LEN, RANK_SEQS = 16, 3  # the record's ranks take RANK_SEQS sequences of SEQ_LEN tokens per micro-step


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_record(tmp_path_factory.mktemp("record"))


def write_uneven_shards(folder, num_shards: int) -> None:
    """Shards of different lengths (a few hundred tokens: the record's loader cuts each anew many times in 50 steps),
    each of its own token ids so that a batch shows where it came from."""
    rng = np.random.default_rng(1)
    for i in range(num_shards):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", 100 * i + rng.integers(0, 100, int(rng.integers(120, 700))))


def record_batches(record, folder, rank: int, world_size: int, steps: int, accum: int = 1):
    """What the record's rank trains on: per step, its `accum` micro-batches of RANK_SEQS sequences."""
    h = SimpleNamespace(rank=rank, world_size=world_size, train_seq_len=SEQ_LEN,
                        train_files=str(folder / "fineweb_train_*.bin"))
    loader = record.ShuffledSequenceLoader(h, torch.device("cpu"))
    tokens = world_size * accum * RANK_SEQS * SEQ_LEN
    return [[loader.next_batch(tokens, accum) for _ in range(accum)] for _ in range(steps)]


def kit_loader(folder, rank: int, world_size: int, accum: int, streams: int = 8):
    settings = train_gpt.Settings.for_preset("1.0810", data_path=str(folder), vocab_size=4096,
                                             train_seq_len=SEQ_LEN, train_batch_tokens=8 * RANK_SEQS * SEQ_LEN,
                                             loader_streams=streams)
    return train_gpt.TrainBatchLoader(settings, cpu_runtime(rank, world_size, accum))


def assert_same_batches(kit: list[tuple], reference: list[tuple]) -> None:
    assert len(kit) == len(reference)
    for (x, y), (rx, ry) in zip(kit, reference):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("num_shards", [8, 19])
def test_one_and_two_processes_train_on_the_batches_of_the_records_eight_gpus(tmp_path, record, num_shards):
    """50 steps: kit rank p, micro-step m trains on what the record's GPU m * world + p does (8 GPUs, 1 micro-step
    each); with 19 shards each record GPU draws from 2 or 3 of them by their sequences left."""
    write_uneven_shards(tmp_path, num_shards)
    records = [record_batches(record, tmp_path, gpu, 8, steps=50) for gpu in range(8)]
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = kit_loader(tmp_path, rank, world_size, accum=8 // world_size)
            for step in range(50):
                assert_same_batches(loader.next_step(), [records[m * world_size + rank][step][0]
                                                         for m in range(8 // world_size)])


def test_one_stream_is_the_records_one_gpu_run(tmp_path, record):
    write_uneven_shards(tmp_path, 8)
    reference = record_batches(record, tmp_path, 0, 1, steps=10, accum=8)
    loader = kit_loader(tmp_path, 0, 1, accum=8, streams=1)
    for step in range(10):
        assert_same_batches(loader.next_step(), reference[step])


def test_with_fewer_shards_than_streams_each_shard_is_a_stream(tmp_path, record):
    """3 shards, 8 streams: the sequences of the record's 3 GPUs (shard v, PCG64(v)), 8 of each per step."""
    write_uneven_shards(tmp_path, 3)
    gpu_sequences = [torch.cat([x for step in record_batches(record, tmp_path, gpu, 3, steps=1, accum=8 * 5)
                                for x, _ in step]) for gpu in range(3)]  # 5 x 24 sequences of each GPU, in order
    loader = kit_loader(tmp_path, 0, 1, accum=1)
    assert loader.num_streams == 3
    for step in range(5):
        (x, y), = loader.next_step()
        assert torch.equal(x, torch.cat([rows[8 * step:8 * step + 8] for rows in gpu_sequences]))


def test_gptq_calibration_reads_the_records_rank_zero_batches_shared_over_the_ranks(tmp_path, record):
    write_uneven_shards(tmp_path, 8)
    reference = [batch for step in record_batches(record, tmp_path, 0, 8, steps=6) for batch in step]
    for world_size in (1, 2):
        for rank in range(world_size):
            loader = kit_loader(tmp_path, rank, world_size, accum=8 // world_size)
            assert_same_batches(list(loader.calibration_batches(6)), reference[rank::world_size])


def test_token_ids_beyond_the_vocabulary_are_rejected_when_read(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.full(100, 600))
    settings = train_gpt.Settings.for_preset("1.0810", data_path=str(tmp_path), vocab_size=512, train_seq_len=4,
                                             train_batch_tokens=16)
    with pytest.raises(ValueError, match=rf"the train shards in {tmp_path}: token id 600 >= VOCAB_SIZE=512"):
        train_gpt.TrainBatchLoader(settings, cpu_runtime()).next_step()


def test_the_default_is_the_records_eight_gpu_loader_and_the_baseline_the_official_one():
    assert train_gpt.Settings.from_env({}).loader_streams == 8
    assert train_gpt.Settings.from_env({"PRESET": "baseline"}).loader_streams == 0
    with pytest.raises(train_gpt.SettingsError, match=r"^LOADER_STREAMS=-1 is invalid"):
        train_gpt.Settings.from_env({"LOADER_STREAMS": "-1"})


def test_shards_without_one_sequence_are_an_error_at_start(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(5))
    settings = train_gpt.Settings.for_preset("1.0810", data_path=str(tmp_path), vocab_size=512, train_seq_len=8,
                                             train_batch_tokens=16)
    with pytest.raises(ValueError, match=r"fineweb_train_000000.bin, which hold no TRAIN_SEQ_LEN \+ 1 = 9 tokens"):
        train_gpt.TrainBatchLoader(settings, cpu_runtime())


@pytest.mark.parametrize("lengths, streams, working", [
    ([100, 5], 8, "1 or 0"),  # a short last shard: stream 1 of 2 would read only it
    ([100, 5, 5, 100], 4, "2 or 1 or 0"),  # 3 streams: stream 1 reads only shard 1
])
def test_short_shards_name_the_loader_streams_that_work_with_them(tmp_path, lengths, streams, working):
    for i, n in enumerate(lengths):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(2, 2 + n))
    settings = train_gpt.Settings.for_preset("1.0810", data_path=str(tmp_path), vocab_size=512, train_seq_len=8,
                                             train_batch_tokens=16, loader_streams=streams)
    with pytest.raises(ValueError, match=r"^loader stream 1 of \d reads only the train shards .*fineweb_train_000001.bin, "
                                         r"which hold no TRAIN_SEQ_LEN \+ 1 = 9 tokens .*: set "
                                         rf"LOADER_STREAMS={working} \(each works with these shards\)") as refused:
        train_gpt.TrainBatchLoader(settings, cpu_runtime())
    assert "download" not in str(refused.value)
    for n in map(int, working.split(" or ")):  # each named setting trains on these shards
        train_gpt.TrainBatchLoader(dataclasses.replace(settings, loader_streams=n), cpu_runtime()).next_step()


def test_the_training_data_id_is_the_shards_names_and_sizes_wherever_they_lie(tmp_path):
    for folder in ("here", "there"):
        (tmp_path / folder).mkdir()
        write_split_shards(tmp_path / folder, "train", [np.arange(2, 300)], 2)
    paths = {folder: train_gpt.shard_paths(str(tmp_path / folder), "train", 512) for folder in ("here", "there")}
    sizes = [1024 + 2 * n for n in (150, 149)]  # the header, then 299 tokens (BOS + 298) split in two
    listing = f"fineweb_train_000000.bin {sizes[0]}\nfineweb_train_000001.bin {sizes[1]}\n"
    expected = hashlib.sha256(listing.encode()).hexdigest()[:16]
    assert train_gpt.training_data_id(paths["here"]) == train_gpt.training_data_id(paths["there"]) == expected
    assert train_gpt.training_data_id(paths["here"][:1]) != expected  # a shard fewer: another identity
