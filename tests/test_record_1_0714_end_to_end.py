"""End to end: the 1.0714 record's own script as its 8-GPU run and the kit's default as ONE process, at reduced size on
the same data and seed, log the same training losses, the same final scores and the same model bytes.

The record runs its whole train_and_eval in 8 gloo processes (tests/record_eight_gpus.py: its document-packing loader
on 8 ranks, per-GPU clipping, its sharded Muon edited to fp32; edited to log the 8 GPUs' mean loss and to draw each TTT
batch's adapters as the kit does); the kit runs `python3 train_gpt.py` with its defaults at the same reduced size (8
micro-batches, each one of the record's GPUs). Real FineWeb text (../shared) in pieces of 600 characters (about 230
tokens: each packed row of 128 tokens meets a document boundary every other row), 8 train shards.
Reduced size: 4 blocks of width 128, MLP 5x (the MLP matrices and the embedding exceed the record's 65,536-value
passthrough, so GPTQ rounds them: int6 at 12 sigmas, the embedding int7 at 15; the attention matrices stay fp16 at this
width, their clip of 13 is proven in test_gptq), blocks 1-2 looped from 35% of training, two lanes from block 3, 2 + 2
warm-up steps then 30 steps of 8 rows of 128 tokens, sequences of 64, EMA 0.9, TTT chunks of 48 (the recipe's) in
windows of 64, 2 documents a batch, at LoRA LR 0.01 so that TTT moves the score by more than the tolerance (here,
on a model trained for 30 steps, it raises it by about 0.07 bpb: a kit that skipped TTT would fail).

Tolerances: losses relative 1e-3 for the first 20 steps, scores within 0.005 bpb, model bytes within 2%. Both run fp32
on the CPU, so what differs is float summation order (the 8 clipped gradients summed in another order, Newton-Schulz
batched or a matrix a rank, per-segment attention), compounded over 34 clipped, orthogonalised steps, GPTQ and TTT;
for the bytes also the container each pickles its tensors in, and brotli-11's sensitivity at this size (up to 1.3% for
one fp16 unit in the last place changed; tests/test_record_equivalence_end_to_end.py). Both score the same tokens: the
validation split is 64 whole sequences, 8 for each of the record's ranks, so its diagnostic passes drop nothing.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import REPO
from record_eight_gpus import run_record_end_to_end
from test_record_1_0714_model import LOGGED
from test_record_equivalence_end_to_end import (VAL_TOKENS, finished_output, kit_scores, kit_train_losses, start,
                                                write_record_layout)

SEED, ITERATIONS, SEQ_LEN, ROW = 1337, 30, 64, 128
COMPARED_STEPS, LOSS_RTOL, BPB_ATOL, MODEL_BYTES_RTOL = 20, 1e-3, 0.005, 0.02
SIZE = dict(SEED=SEED, ITERATIONS=ITERATIONS, WARMUP_STEPS=2, MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=1,
            VAL_LOSS_EVERY=0, TRAIN_SEQ_LEN=SEQ_LEN, TRAIN_BATCH_TOKENS=8 * ROW, VOCAB_SIZE=1024, NUM_LAYERS=4,
            MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=5, XSA_LAST_N=4, PARALLEL_START_LAYER=3,
            MUON_MOMENTUM_WARMUP_STEPS=10, EMA_DECAY=0.9,  # the default 0.9965 would export ~the initial weights
            GPTQ_CALIBRATION_BATCHES=4, TTT_BATCH_SIZE=2, TTT_LORA_LR=0.01)
RECORD_ENV = dict(LOGGED, **SIZE, EMBEDDING_DIM=128, LOOP_START=1, LOOP_END=2, EVAL_SEQ_LEN=SEQ_LEN,
                  TTT_EVAL_SEQ_LEN=SEQ_LEN, VAL_BATCH_TOKENS=VAL_TOKENS)
KIT_ENV = dict(SIZE, RECUR_LAYERS="1,2", VAL_BATCH_SIZE=VAL_TOKENS, DEVICE="cpu", RUN_ID="kit")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> tuple[str, str]:
    """The record's log and the kit's, both run at once (9 processes of one thread each)."""
    data = write_record_layout(tmp_path_factory.mktemp("record_data"), piece_chars=600)
    kit_folder = tmp_path_factory.mktemp("kit_run")
    kit = start(REPO / "train_gpt.py", dict(KIT_ENV, DATA_PATH=data / "datasets" / "fineweb10B_sp1024",
                                            TOKENIZER_PATH=data / "tokenizers" / "fineweb_1024_bpe.model"), kit_folder)
    record = run_record_end_to_end(tmp_path_factory.mktemp("record_run"), dict(RECORD_ENV, DATA_DIR=f"{data}/"))
    return record, finished_output(kit, kit_folder)


def record_train_losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"^\d+/\d+ train_loss: (\S+)", log, flags=re.MULTILINE)]


def record_scores(log: str) -> dict[str, float]:
    """val_bpb by stage: pre-quantization (post-EMA), quantized (packed rows), quantized + LoRA TTT."""
    names = {"diagnostic pre-quantization post-ema": "pre-quantization post-ema", "diagnostic quantized": "quantized",
             "quantized_ttt_lora": "quantized_ttt"}
    return {names[name]: float(bpb) for name, bpb in
            re.findall(r"^(diagnostic [\w -]+|quantized_ttt_lora) val_loss:\S+ val_bpb:(\S+)", log, re.MULTILINE)}


def model_bytes(log: str) -> int:
    return int(re.search(r"^Serialized model (?:quantized\+brotli|int6\+brotli): (\d+) bytes", log, re.M).group(1))


def test_both_runs_go_through_every_stage(logs):
    record, kit = logs
    assert len(record_train_losses(record)) == len(kit_train_losses(kit)) == ITERATIONS
    assert "layer_loop:enabled step:11 " in record and "recurrence:on layers:1,2 step:11" in kit  # 35% of 30 steps
    assert "gptq (int6): blocks.mlp.fc.weight, blocks.mlp.proj.weight" in record
    assert "gptq (int7): tok_emb.weight" in record
    assert re.findall(r"^eval_pass:(\w+)", kit, re.M) == ["roundtrip", "ttt"]
    scores = record_scores(record)
    assert set(scores) == {"pre-quantization post-ema", "quantized", "quantized_ttt"}
    assert abs(scores["quantized"] - scores["quantized_ttt"]) > BPB_ATOL  # so that a kit without TTT fails the scores


def test_kit_logs_the_records_mean_train_losses_for_20_steps(logs):
    record, kit = (losses[:COMPARED_STEPS] for losses in (record_train_losses(logs[0]), kit_train_losses(logs[1])))
    assert np.allclose(kit, record, rtol=LOSS_RTOL, atol=0), list(zip(record, kit))


def test_kit_final_scores_are_the_records(logs):
    record, kit = record_scores(logs[0]), kit_scores(logs[1])
    assert set(kit) == set(record), (record, kit)
    assert all(abs(kit[stage] - record[stage]) <= BPB_ATOL for stage in kit), (record, kit)


def test_kit_model_bytes_are_the_records(logs):
    record, kit = model_bytes(logs[0]), model_bytes(logs[1])
    assert abs(kit - record) <= MODEL_BYTES_RTOL * record, (record, kit)
