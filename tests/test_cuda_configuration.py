"""The CUDA configuration, run on the CPU: PRECISION=bf16 makes every device-dependent choice as CUDA makes it
(device_choices: bf16 activations, bf16 token embedding, bf16 Newton-Schulz, fused AdamW), and every model comes
from build_model, as the Trainer's does. The default recipe runs end to end under it, on 1 and 2 processes.

The paths only CUDA took (a grep of train_gpt.py for cuda, device.type, is_available, pin_memory, fused, Event,
synchronize, tf32 and the bf16 casts), and what tests each on the CPU:
- the choices themselves (dtype, fused AdamW, compile, pinned memory, fp32 refused on CUDA): tests below.
- bf16 activations and the models' casts (`.to(x.dtype)`), the bf16 token embedding, Muon's bf16 Newton-Schulz and
  update buffer: the end-to-end runs below, build_model's dtypes, TTT with a bf16 embedding (below, and against the
  record's TTT in test_record_evaluation.py), and the record's dtypes (test_record_equivalence_model.py); the rotary
  tables' bf16 rounding, each record's (ROPE_ROUNDING): test_rotary_rounding.py.
- fused AdamW: the end-to-end runs (PRECISION=bf16 fuses on the CPU too).
- torch.compile: test_cuda_paths_on_cpu.py (one graph; five cache entries, in fp32 and in bf16), with dynamo's
  eager backend. Inductor compiles the default on a CPU too (PRESET=smoke PRECISION=bf16 COMPILE=1 runs end to end
  with gcc), but its C++ builds take minutes on 2 cores: too long for the suite.
- WallclockStop's CUDA events and its vote read from the device: test_reliability.py, with simulated events.
- every rank's clock started together, the process group's timeout, GPTQ's rounding without TF32, evaluation from
  the device copy of the tokens: tests below.
- no CPU test, as a CPU cannot take these paths: pinned memory (`pin_memory()` needs an accelerator in a CPU build
  of torch); TF32 itself (CUDA matmuls only: only its switch is tested, in GPTQ); NCCL and DDP's device_ids (the 2
  process runs take gloo); torch.cuda's synchronize, set_device, device name and memory statistics (they report,
  they compute nothing); the attention kernels (FlashAttention runs on CUDA only: tests/test_cuda.py on a GPU; the
  switches that pin it: test_cuda_paths_on_cpu.py).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, TINY_MODEL_ENV, read_log, run_trainer, trainer_env
from train_gpt import Settings

VOCAB, SEQ_LEN = 96, 16


def runtime(device: str = "cpu", world_size: int = 1, **settings) -> train_gpt.Runtime:
    """A Runtime as setup_runtime makes it for `device`, without touching the process (threads, groups)."""
    choices = train_gpt.device_choices(device, Settings(**settings))
    return train_gpt.Runtime(torch.device(device), 0, world_size, 0, 1, **choices)


def tiny(**overrides) -> Settings:
    return Settings.for_preset("1.0810", **{**dict(vocab_size=VOCAB, num_layers=4, model_dim=64, num_heads=4,
                                                   num_kv_heads=2, recur_layers="1,2", train_seq_len=SEQ_LEN),
                                            **overrides})


@pytest.fixture
def keeps_cpu_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- one place for the device's choices -------------------------------------------------------------


def test_precision_bf16_on_the_cpu_makes_cudas_choices_but_pinned_memory():
    on_cuda = train_gpt.device_choices("cuda", Settings())
    on_cpu = train_gpt.device_choices("cpu", Settings(precision="bf16", compile="1"))
    assert on_cuda.pop("attention") == train_gpt.pick_attention("auto", "cuda")  # FA3 where installed
    assert on_cpu.pop("attention") == "sdpa"  # the kernel is the one choice a CPU cannot share
    assert on_cuda == dict(compute_dtype=torch.bfloat16, fused_adam=True, compile=True, pin_memory=True)
    assert on_cpu == {**on_cuda, "pin_memory": False}


@pytest.mark.parametrize("device, precision, dtype", [("cuda", "auto", torch.bfloat16), ("cpu", "auto", torch.float32),
                                                      ("mps", "auto", torch.float32), ("cpu", "fp32", torch.float32),
                                                      ("mps", "bf16", torch.bfloat16)])
def test_precision_auto_is_bf16_on_cuda_only(device, precision, dtype):
    choices = train_gpt.device_choices(device, Settings(precision=precision))
    assert (choices["compute_dtype"], choices["fused_adam"]) == (dtype, dtype == torch.bfloat16)


def test_precision_must_be_one_of_its_choices():
    with pytest.raises(train_gpt.SettingsError, match="^PRECISION='fp16' is invalid: it must be one of auto, bf16"):
        Settings.from_env({"PRECISION": "fp16"})


def test_precision_fp32_on_cuda_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setattr(train_gpt, "pick_device_type", lambda requested: "cuda")  # as on a GPU machine
    with pytest.raises(train_gpt.SettingsError, match="^PRECISION=fp32 is invalid on CUDA"):
        train_gpt.setup_runtime(Settings(precision="fp32", device="cuda"))


def test_build_model_keeps_the_token_embedding_alone_in_bf16():
    model = train_gpt.build_model(tiny(), runtime(precision="bf16"))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32} and model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in train_gpt.build_model(tiny(), runtime()).parameters()} == {torch.float32}


# ---- TTT with a bf16 embedding ------------------------------------------------------------------------


def ttt_split(num_scored: int = 12 * SEQ_LEN) -> train_gpt.ValidationSplit:
    tokens = np.random.default_rng(2).integers(0, VOCAB, num_scored + 1).astype(np.uint16)
    return train_gpt.ValidationSplit(tokens, True)


def byte_table() -> train_gpt.ByteTable:
    return train_gpt.ByteTable(np.ones(VOCAB, np.int64), np.zeros(VOCAB, bool), np.zeros(VOCAB, bool))


def test_ttt_trains_the_model_the_trainer_builds_in_bf16(tiny_dataset):
    """The model as Trainer builds it for CUDA (token embedding in bf16): TTT trains it. A gradient buffer of one dtype
    cannot (torch refuses an fp32 gradient on a bf16 tensor): a crash after the whole training and export."""
    settings = tiny(vocab_size=tiny_dataset.vocab_size, data_path=tiny_dataset.data_path, train_batch_tokens=64,
                    val_batch_size=4 * SEQ_LEN, ttt_chunk_tokens=40, ttt_epochs=2)
    bf16 = train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.bfloat16, False)
    model = train_gpt.Trainer(settings, bf16).model
    model.recurrence_active = True  # as after training
    embedding = model.tok_emb.weight.detach().clone()
    tokens = np.random.default_rng(2).integers(0, tiny_dataset.vocab_size, 12 * SEQ_LEN + 1).astype(np.uint16)
    table = train_gpt.ByteTable(np.ones(tiny_dataset.vocab_size, np.int64), np.zeros(tiny_dataset.vocab_size, bool),
                                np.zeros(tiny_dataset.vocab_size, bool))
    evaluator = train_gpt.Evaluator(train_gpt.ValidationSplit(tokens, True), table, settings, bf16)
    val_loss, val_bpb = evaluator.evaluate_with_ttt(model, 4)
    assert math.isfinite(val_loss) and math.isfinite(val_bpb)
    assert model.tok_emb.weight.dtype == torch.bfloat16 and not torch.equal(model.tok_emb.weight, embedding)


def test_ttt_reduces_each_dtypes_gradients_in_one_all_reduce_per_step(monkeypatch):
    """Rank 0 of 2 (the all-reduce recorded, not run): every step, one bf16 buffer (the embedding's gradient, in its
    own dtype as the record keeps it) and one fp32 buffer (all the others); clipping sees each gradient so."""
    settings = tiny(val_batch_size=4 * SEQ_LEN, ttt_chunk_tokens=40, ttt_epochs=2)
    rt = runtime(world_size=2, precision="bf16")
    model = train_gpt.build_model(settings, rt)
    reduced, clipped = [], []
    monkeypatch.setattr(train_gpt.dist, "all_reduce", lambda t, **kw: reduced.append((t.dtype, t.numel())))
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, *a: clipped.append(
        {(p.dtype, p.grad.dtype) for p in params}) or clip(params, *a))
    train_gpt.Evaluator(ttt_split(), byte_table(), settings, rt).evaluate_with_ttt(model, 0)
    embedding = VOCAB * settings.model_dim
    others = sum(p.numel() for p in model.parameters()) - embedding
    steps = 2 * 4  # epochs x the chunks trained on (12 windows of 16 in chunks of 40 tokens: 5 chunks, the last not)
    ttt = [r for r in reduced if r[0] != torch.float64]  # float64: the score's sums
    assert len(ttt) == 2 * steps
    assert [set(ttt[i:i + 2]) for i in range(0, len(ttt), 2)] == [{(torch.bfloat16, embedding),
                                                                  (torch.float32, others)}] * steps
    assert clipped == [{(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}] * steps


# ---- the default recipe end to end, in the CUDA configuration ---------------------------------------------


def default_recipe_env(dataset, run_id: str) -> dict:
    """The default preset (whatever it is) at a tiny width, seq and batch, on the tiny dataset; depth, techniques,
    accumulation and evaluation as the default has them. 6 steps (recurrence switches on by its fraction), 1,024
    validation tokens."""
    env = trainer_env(dataset, RUN_ID=run_id, PRECISION="bf16", ITERATIONS=6, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=3,
                      MAX_VAL_TOKENS=1024, GPTQ_CALIBRATION_BATCHES=2)
    for name in ("PRESET", "NUM_LAYERS"):
        env.pop(name)
    return env


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_default_runs_end_to_end_in_bf16_on_the_cpu(tmp_path, tiny_dataset, nproc):
    default = Settings()
    result = run_trainer(default_recipe_env(tiny_dataset, "bf16"), tmp_path, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, "bf16").split("\nend_of_source\n", 1)[1]
    assert f"world_size:{nproc} " in log and " compute_dtype:bfloat16 " in log
    assert bool(re.search(r"^recurrence:on ", log, re.M)) == bool(default.recur_layers)
    assert bool(re.search(r"^gptq: \d+ms", log, re.M)) == (default.export_quant == "gptq")
    assert bool(re.search(r"^eval_pass:ttt ", log, re.M)) == (default.ttt_epochs > 0)
    scores = [float(v) for v in re.findall(r"^final_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log, re.M)]
    assert scores and all(0 < s < 20 for s in scores)
    assert re.search(r"^eval_total:\d+ms$", log, re.M)
    assert (tmp_path / "logs" / f"bf16.int{default.export_bits}.ptz").exists()


# ---- distributed details --------------------------------------------------------------------------------

LATE_RANK = """import sys, time
sys.path.insert(0, {repo!r})
import train_gpt
warm_up = train_gpt.Trainer.warm_up_and_restore
def late_on_rank_1(trainer, steps, log):
    warm_up(trainer, steps, log)
    if trainer.rt.rank == 1:
        time.sleep({late})
train_gpt.Trainer.warm_up_and_restore = late_on_rank_1
train_gpt.main()
"""


def test_training_clock_starts_together_when_a_rank_is_late(tmp_path, tiny_dataset):
    """Rank 1 ends its warm-up 4 s after rank 0. Rank 0's clock starts once both are there: its first step's
    train_time does not hold the wait (else it would be over 4000 ms: rank 0 would wait in that step's all-reduce)."""
    script = tmp_path / "late_rank.py"
    script.write_text(LATE_RANK.format(repo=str(REPO), late=4))
    env = trainer_env(tiny_dataset, RUN_ID="late", ITERATIONS=2, VAL_LOSS_EVERY=0, WARMUP_STEPS=1)
    result = run_trainer(env, tmp_path, nproc=2, script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    (first_step_ms,) = re.findall(r"^step:1/2 train_loss:\S+ train_time:(\d+)ms", read_log(tmp_path, "late"), re.M)
    assert int(first_step_ms) < 2000


def test_process_group_timeout_covers_rank_0s_longest_export(monkeypatch, keeps_cpu_threads):
    """EXPORT_FIT_CAP=1 tries up to 4 formats, each compressed once and by prune_to_fit up to 4 times more: 20
    brotli-11 compressions of ~60 s each on the default's weights, while the other ranks wait in a collective."""
    seen = {}
    monkeypatch.setattr(train_gpt.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    train_gpt.setup_runtime(Settings.from_env({**TINY_MODEL_ENV, "EXPORT_FIT_CAP": "1"}))
    trials = (1 + len(train_gpt.FIT_CAP_STEPS)) * (1 + 4)
    assert seen["backend"] == "gloo" and seen["timeout"] >= timedelta(seconds=60 * trials)


def test_gptq_rounds_with_tf32_off_and_puts_it_back(monkeypatch):
    """The run switches TF32 on for CUDA matmuls; GPTQ's rounding runs in exact fp32, as the record's (on the CPU)."""
    seen, cholesky, tf32 = [], torch.linalg.cholesky, torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(torch.linalg, "cholesky", lambda *a, **kw: seen.append(
        torch.backends.cuda.matmul.allow_tf32) or cholesky(*a, **kw))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        train_gpt.gptq_quantize(torch.randn(8, 16), x.T @ x, bits=6, clip_sigmas=12.85)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert seen == [False, False]  # H's factor, then its inverse's


class HostTokens(np.ndarray):
    """Validation tokens that fail when read: evaluation must gather its windows from the device copy."""

    def __getitem__(self, key):
        raise AssertionError("validation tokens read from host memory during evaluation")


@pytest.mark.parametrize("stride", [0, 4])
def test_evaluation_and_ttt_read_tokens_from_the_device_copy_made_once(stride):
    settings = tiny(val_batch_size=4 * SEQ_LEN, ttt_chunk_tokens=40, ttt_epochs=1)
    split = ttt_split()
    evaluator = train_gpt.Evaluator(split, byte_table(), settings, runtime())
    model = train_gpt.build_model(settings, runtime())
    expected = evaluator.evaluate(model, stride)
    evaluator.split = train_gpt.ValidationSplit(split.tokens.view(HostTokens), True)
    assert evaluator.evaluate(model, stride) == expected
    assert all(map(math.isfinite, evaluator.evaluate_with_ttt(model, stride)))


# ---- CPU threads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cores, torch_default, local_world, model_dim, expected", [
    (16, 8, 1, 512, 4),  # one per 128 of width
    (16, 8, 8, 512, 2),  # the process's share of the cores
    (16, 8, 1, 2048, 8),  # at most torch's default (the physical cores)
    (2, 2, 1, 64, 1),  # a narrow model: one
    (2, 2, 4, 512, 1),  # more processes than cores: still one
])
def test_cpu_threads_fit_the_cores_and_the_model(monkeypatch, cores, torch_default, local_world, model_dim, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(train_gpt.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_default)
    assert train_gpt.pick_cpu_threads(Settings(model_dim=model_dim), local_world) == expected


def test_cpu_threads_are_omp_num_threads_when_it_is_set():
    """torch reads OMP_NUM_THREADS when it starts: a new process, where the width alone would give 1."""
    code = "import train_gpt; print(train_gpt.pick_cpu_threads(train_gpt.Settings(model_dim=64), 1))"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "2", result.stderr[-2000:]
