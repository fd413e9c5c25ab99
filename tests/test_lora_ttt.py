"""Test-time training of adapters per document (TTT_METHOD=lora, the 1.0714 record's evaluation), against the record's
own eval_val_ttt_lora run on the CPU (tests/reference_record.py), on the same model and tokens, at 1 and 2 processes.

Reduced size: the record's 11 layers with loops at width 64 (test_record_1_0714_model's), its weights perturbed, fp32;
windows of 32 tokens (TRAIN_SEQ_LEN, the record's TTT_EVAL_SEQ_LEN), chunks of 8, rank-4 adapters, 3 documents a
batch: 10 documents of 2 to 120 tokens make 4 batches (the last of one document: the record builds new adapters for
it), two documents shorter than a chunk and four longer than a window (their windows slide); each document repeats 4
words, so that its adapters learn (TTT lowers val_loss from 4.51 to 3.35).
The record draws each batch's adapters from the global generator in whatever order its ranks claim batches; the kit
from a generator seeded with SEED x 2**20 + the batch's index. The record is edited (checked against its source) to
seed its generator so before each batch: then both draw the same adapters.
Tolerance: relative 1e-6 on val_loss and val_bpb. Both run fp32 on the CPU with the same fused AdamW and the same
draws, and differ in the order of float operations in the model (its logits agree to 1e-6 relative) and in the sums.
Measured: 3e-8. Adam with beta1 = 0 and eps 1e-10 moves each weight by about +-LR whatever its gradient's size, so a
rounding difference in a gradient near 0 can move a weight by up to 2 LR: at LR 0.03 the two agree to 1e-8, at 0.1
(where TTT diverges) to 1%, also with both models in float64 (their cross-entropy in fp32): such a test would measure
that amplification, not the code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO
from reference_record import load_record
from test_record_1_0714_model import REDUCED_KIT, REDUCED_RECORD, one_thread, perturbed_pair  # noqa: F401
from train_gpt import Settings

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, WINDOW, CHUNK = 128, 32, 8
DOCUMENT_LENGTHS = (14, 2, 61, 9, 120, 33, 5, 90, 40, 7)  # with their BOS
TTT = dict(ttt_method="lora", ttt_epochs=1, ttt_chunk_tokens=CHUNK, ttt_batch_size=3, ttt_lora_rank=4,
           ttt_lora_lr=0.01, seed=7)  # TTT lowers val_loss here from 4.51 to 3.35
RECORD_TTT = dict(REDUCED_RECORD, TTT_CHUNK_SIZE=CHUNK, TTT_EVAL_SEQ_LEN=WINDOW, TTT_BATCH_SIZE=3, TTT_LORA_RANK=4,
                  TTT_LORA_LR=0.01, SEED=7)
RTOL = 1e-6


def record_edits(counter_dir: Path) -> tuple:
    """Each batch's adapters drawn as the kit draws them; the batch counter file in the test's folder."""
    return (("        if bsz == reusable_lora.bsz:\n            reusable_lora.reset()",
             "        torch.manual_seed(h.seed * 2**20 + orig_batch_idx)\n"
             "        if bsz == reusable_lora.bsz:\n            reusable_lora.reset()", 1),
            ('f"/tmp/ttt_counter_{h.run_id}"', f'f"{counter_dir}/ttt_counter_{{h.run_id}}"', 1))


def load_ttt_record(folder: Path, counter_dir: Path, run_id: str, **env):
    env = {k: str(v) for k, v in {**RECORD_TTT, "RUN_ID": run_id, **env}.items()}
    return load_record(folder, env, record="1.0714", edits=record_edits(counter_dir))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    folder = tmp_path_factory.mktemp("record_lora_ttt")
    return load_ttt_record(folder, folder, f"kit-test-{os.getpid()}")


def split_and_table() -> tuple[train_gpt.ValidationSplit, train_gpt.ByteTable]:
    rng = np.random.default_rng(3)
    tokens = np.concatenate([np.concatenate(([train_gpt.BOS_ID], rng.choice(rng.integers(2, VOCAB, 4), n - 1)))
                             for n in DOCUMENT_LENGTHS]).astype(np.uint16)  # each of 4 words: TTT learns them
    table = train_gpt.ByteTable(rng.integers(0, 4, VOCAB), rng.random(VOCAB) < 0.5, rng.random(VOCAB) < 0.1)
    table.is_boundary[train_gpt.BOS_ID] = True
    return train_gpt.ValidationSplit(tokens, True), table


def cpu_runtime(compute_dtype=torch.float32, **changes) -> train_gpt.Runtime:
    """The record's fused AdamW (the kit's on CUDA), on the CPU."""
    return dataclasses.replace(train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, compute_dtype, False, True), **changes)


def kit_score(record, runtime: train_gpt.Runtime, **overrides) -> tuple[tuple[float, float], torch.Tensor]:
    """(val_loss, val_bpb) of the kit's LoRA TTT and the (nats, tokens, bytes) it summed, on the perturbed model."""
    settings = Settings(**{**REDUCED_KIT, **TTT, **overrides})
    _, model = perturbed_pair(record, seed=5)
    model.recurrence_active = True
    if runtime.compute_dtype == torch.bfloat16:  # as build_model stores it
        model.tok_emb.to(torch.bfloat16)
    split, table = split_and_table()
    evaluator = train_gpt.Evaluator(split, table, settings, runtime)
    sums = []
    evaluator.reduce = lambda s: sums.append(s.clone()) or train_gpt.Evaluator.reduce(evaluator, s)
    return evaluator.evaluate_with_lora_ttt(model), sums[0]


def record_score(record) -> tuple[float, float]:
    theirs, _ = perturbed_pair(record, seed=5)
    theirs.looping_active = True
    split, table = split_and_table()
    val_data = SimpleNamespace(val_tokens=torch.from_numpy(split.tokens.astype(np.int64)),
                               base_bytes_lut=torch.from_numpy(table.base_bytes).to(torch.int16),
                               has_leading_space_lut=torch.from_numpy(table.has_leading_space),
                               is_boundary_token_lut=torch.from_numpy(table.is_boundary))
    return record.eval_val_ttt_lora(record.Hyperparameters(), theirs, torch.device("cpu"), val_data,
                                    forward_ttt_train=theirs.forward_ttt)


@pytest.fixture(scope="module")
def one_process(record):
    return SimpleNamespace(kit=kit_score(record, cpu_runtime()), record=record_score(record))


def test_documents_and_batches_are_the_records(record):
    """Cut at every BOS, each through the next BOS (its last target); sorted by length, ties in order, 3 a batch."""
    split, _ = split_and_table()
    record.BOS_ID = train_gpt.BOS_ID
    theirs = record._find_docs(torch.from_numpy(split.tokens.astype(np.int64)))
    ours = train_gpt.ttt_documents(split.tokens)
    assert [tuple(d) for d in ours] == theirs and ours[:, 1].sum() - len(ours) + 1 == split.tokens.size
    their_batches = record._build_ttt_global_batches(list(enumerate(theirs)), record.Hyperparameters(),
                                                     ascending=True)
    assert [[tuple(d) for d in b] for b in train_gpt.ttt_batches(ours, 3)] == [[d for _, d in b] for _, b in
                                                                            their_batches]
    with_lone_bos = np.append(split.tokens, train_gpt.BOS_ID)  # the last BOS is a target, no document
    assert [tuple(d) for d in train_gpt.ttt_documents(with_lone_bos)][-1] == (theirs[-1][0], theirs[-1][1] + 1)


def test_lora_ttt_score_equals_the_records(one_process):
    (kit_loss, kit_bpb), sums = one_process.kit
    record_loss, record_bpb = one_process.record
    assert kit_loss == pytest.approx(record_loss, rel=RTOL) and kit_bpb == pytest.approx(record_bpb, rel=RTOL)
    assert sums[1] == sum(DOCUMENT_LENGTHS) - 1  # every target of the split, once


@pytest.mark.parametrize("changed_back", [dict(ttt_lora_lr=0.0), dict(seed=8), dict(ttt_chunk_tokens=16)])
def test_lora_ttt_score_differs_when_one_setting_is_changed(record, one_process, changed_back):
    """The adapters' training, their draws and the chunks each move the score by far more than the tolerance."""
    (loss, _), _ = kit_score(record, cpu_runtime(), **changed_back)
    assert abs(loss / one_process.record[0] - 1) > 100 * RTOL


def test_lora_ttt_in_bf16_is_finite_and_close_to_fp32(record, one_process):
    """PRECISION=bf16 (CUDA's configuration) on the CPU: bf16 activations and embedding, fused AdamW. bf16 keeps 8
    significant bits (a relative step of 0.4%) in every activation, and the adapters' training amplifies some of it
    (the 26% TTT gain here is a steep descent); averaged over 380 tokens, measured 0.1%."""
    (loss, bpb), _ = kit_score(record, cpu_runtime(torch.bfloat16))
    assert np.isfinite(bpb) and bpb == pytest.approx(one_process.kit[0][1], rel=1e-2)


def test_ranks_split_the_batches_by_cost_deterministically():
    costs = [10, 1, 1, 1, 7, 3]
    assert train_gpt.share_by_cost(costs, 2) == [[0, 1, 3], [4, 5, 2]]  # 10 + 1 + 1 and 7 + 3 + 1, the costliest first
    assert train_gpt.share_by_cost(costs, 1) == [[0, 4, 5, 1, 2, 3]] and train_gpt.share_by_cost([], 3) == [[], [], []]


TWO_PROCESS_SCRIPT = r'''
import dataclasses, json, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import torch
import train_gpt
from test_lora_ttt import cpu_runtime, kit_score, load_ttt_record, record_score, REDUCED_KIT, TTT

torch.set_num_threads(1)
runtime = train_gpt.setup_runtime(train_gpt.Settings(**REDUCED_KIT, **TTT, device="cpu"))
folder = Path(sys.argv[2])
record = load_ttt_record(folder / f"rank{runtime.rank}", folder, sys.argv[3], RANK=runtime.rank, WORLD_SIZE=2,
                         LOCAL_RANK=runtime.rank)
kit = kit_score(record, cpu_runtime(rank=runtime.rank, world_size=2))[0]
theirs = record_score(record)
if runtime.is_master:
    print("REPORT " + json.dumps({"kit": kit, "record": theirs}))
train_gpt.close_process_group()
'''


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lora_ttt_two")
    script = folder / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(REPO), str(folder), f"kit-test-two-{os.getpid()}"], capture_output=True,
                          text=True, timeout=600, cwd=folder, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("REPORT ", 1)[1].splitlines()[0])


def test_two_processes_score_as_one_and_as_the_records(one_process, two_processes):
    """Each batch is computed alike wherever it runs: the kit's two ranks differ from one only in the order of the
    float64 sums (relative 1e-12); the record's two ranks claim batches as they come, from a file counter."""
    assert two_processes["kit"] == pytest.approx(one_process.kit[0], rel=1e-12)
    assert two_processes["record"] == pytest.approx(one_process.record, rel=1e-12)
    assert two_processes["kit"] == pytest.approx(two_processes["record"], rel=RTOL)


def test_warm_up_compiles_every_graph_the_ttt_pass_runs(monkeypatch):
    """With COMPILE=1, compile_ttt (in the warm-up, on random tokens) traces one graph per batch size (the adapters'
    shapes are static: 3 and 1 here), each serving every window width (8 to 32): the timed pass then compiles nothing,
    and scores as the uncompiled forward. Graphs are counted with dynamo's eager backend (its guards are inductor's)."""
    compiled, phase, torch_compile = [], ["warm-up"], torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: torch_compile(*a, **k, backend=lambda graph, inputs: (
        compiled.append(phase[0]), graph.forward)[1]))
    settings = Settings(**{**REDUCED_KIT, **TTT, "num_layers": 3, "recur_layers": "1", "num_loops": 1,
                           "parallel_start_layer": 2, "xsa_last_n": 3})
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    split, table = split_and_table()
    scores = []
    for runtime in (cpu_runtime(), cpu_runtime(compile=True)):
        evaluator = train_gpt.Evaluator(split, table, settings, runtime)
        if runtime.compile:
            evaluator.compile_ttt(model, None)
            phase[0] = "pass"
        model.recurrence_active = True
        scores.append(evaluator.evaluate_with_lora_ttt(model))
        model.recurrence_active = False
    assert compiled == ["warm-up", "warm-up"]
    assert scores[1] == pytest.approx(scores[0], rel=1e-6)


def test_a_run_with_the_1_0714_evaluation_logs_its_passes_as_records_reads_them(tmp_path, tiny_dataset):
    """train_gpt.py with the default (the 1.0714 record's model, packed documents and evaluation), tiny, in
    PRECISION=bf16 (CUDA's configuration on the CPU): periodic validation and the round trip on packed rows, then the
    LoRA TTT pass, each announced and scored, and records/ reads the TTT pass's score."""
    from test_train_end_to_end import run_ok, values
    sys.path.insert(0, str(REPO / "records"))
    from run_log import read_run_log
    log = run_ok(tmp_path, tiny_dataset, "lora", PRESET="strong", ITERATIONS=6, VAL_LOSS_EVERY=3, GRAD_ACCUM_STEPS=8,
                 MAX_VAL_TOKENS=4096, PRECISION="bf16", NUM_LAYERS=4, RECUR_LAYERS="1", PARALLEL_START_LAYER=3,
                 TTT_CHUNK_TOKENS=32, TTT_BATCH_SIZE=2, TTT_LORA_RANK=4)
    assert values(log, r"^eval_pass:roundtrip stride:64 window:64 packed_rows:512$")
    assert values(log, r"^eval_pass:ttt stride:32 window:64 lora_rank:4 lr:0.0001 steps:1 docs_per_batch:2 "
                       r"chunk_tokens:32$")
    assert len(values(log, r"^step:\d/6 val_loss:")) == 3 and values(log, r"^progress:ttt_eval \d+/\d+ batches ")
    (ttt_bpb,) = values(log, r"^final_int6_brotli_roundtrip_exact val_loss:\S+ val_bpb:(\S+) val_scope:prefix$")[-1:]
    run = read_run_log(tmp_path / "logs" / "lora.txt")
    assert run.score_pass == "ttt" and run.val_bpb == float(ttt_bpb)


def scored_targets(split: train_gpt.ValidationSplit, table, monkeypatch) -> list[tuple[Tensor, Tensor]]:
    """The kit's LoRA TTT on `split` (a model of 1,024 tokens, drawn from seed 0): for each scoring forward, in order,
    the targets it scored and their nats (the entries add_scored adds)."""
    settings = Settings(**{**REDUCED_KIT, **TTT, "vocab_size": 1024})
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    model.recurrence_active = True
    calls, add_scored = [], train_gpt.add_scored
    evaluator = train_gpt.Evaluator(split, table, settings, cpu_runtime())
    forward = evaluator.adapter_forward(model)
    evaluator.lora_forward = lambda inputs, targets, lora: calls.append([targets]) or forward(inputs, targets, lora=lora)
    monkeypatch.setattr(train_gpt, "add_scored", lambda sums, nats, num_bytes, scored: (
        calls[-1].extend((nats.clone(), scored.clone())), add_scored(sums, nats, num_bytes, scored)))
    evaluator.evaluate_with_lora_ttt(model)
    return [(targets[scored], nats[scored]) for targets, nats, scored in calls if scored.any()]


def test_lora_ttt_scores_each_token_once_before_training_on_it_and_each_document_alone(monkeypatch):
    """Token g of the split is the number g + 2 (BOS, 1, starts each document), so a scored target says where it is.
    Every target is scored once. Then the tokens of the last document after its position 50 are changed: no score of a
    target up to there changes, although TTT trains that document's adapters on the changed tokens (chunks of 8
    after it), and no score of any other document changes, although they share its batch: each chunk is scored
    before its document's adapters train on it, and each document's adapters see only its own tokens."""
    lengths = np.array((14, 2, 61, 9, 33, 5, 90, 40, 7, 120))  # the last one the longest: in the last batch
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    tokens = np.arange(lengths.sum()) + 2
    tokens[starts] = train_gpt.BOS_ID
    table = train_gpt.ByteTable(np.ones(1024, np.int64), np.zeros(1024, bool), np.zeros(1024, bool))
    base = scored_targets(train_gpt.ValidationSplit(tokens.astype(np.uint16), True), table, monkeypatch)
    positions = torch.cat([t for t, _ in base])
    assert sorted(positions[positions != train_gpt.BOS_ID].tolist()) == sorted(set(tokens.tolist()) - {1})
    assert (positions == train_gpt.BOS_ID).sum() == len(lengths) - 1  # each document's last target: the next BOS

    t = starts[-1] + 50
    changed = tokens.copy()
    changed[t + 1:] = np.random.default_rng(0).integers(2, 1024, changed.size - t - 1)
    after = scored_targets(train_gpt.ValidationSplit(changed.astype(np.uint16), True), table, monkeypatch)
    assert [len(n) for _, n in after] == [len(n) for _, n in base]
    nats, nats_after = torch.cat([n for _, n in base]), torch.cat([n for _, n in after])
    inside = positions - 2 > t  # the changed targets (the BOS targets end other documents)
    assert inside.sum() == lengths[-1] - 51
    assert torch.equal(nats[~inside], nats_after[~inside])
    assert not torch.allclose(nats[inside], nats_after[inside])
