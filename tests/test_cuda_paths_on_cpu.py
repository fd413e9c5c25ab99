"""What a reading of the CUDA paths found, fixed and checked on the CPU: one evaluation batch shape (one
compiled graph), FlashAttention-sized heads, Muon state made once, and the model compiled as one graph."""
from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch

import train_gpt
from conftest import TINY_MODEL_ENV
from train_gpt import Settings

VOCAB = 96
SEQ_LEN = 16


def cpu_runtime(compile_model: bool = False) -> train_gpt.Runtime:
    return train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.float32, compile_model)


def tiny(**overrides) -> Settings:
    """PRESET=1.0810's plain windows and TTT over the whole split (the default's packed rows and LoRA TTT:
    tests/test_packed_attention.py and tests/test_lora_ttt.py)."""
    return Settings.for_preset("1.0810", **{**dict(vocab_size=VOCAB, num_layers=4, model_dim=64, num_heads=4,
                                                   num_kv_heads=2, recur_layers="1,2", train_seq_len=SEQ_LEN),
                                            **overrides})


def perturbed_model(settings: Settings) -> train_gpt.GPT:
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    for p in model.parameters():  # the zero-initialised projections too, so that every path counts
        p.data.add_(0.1 * torch.randn_like(p))
    return model


def evaluator(num_windows_of_tokens: int, batch_windows: int) -> train_gpt.Evaluator:
    tokens = np.random.default_rng(0).integers(0, VOCAB, num_windows_of_tokens * SEQ_LEN + 1).astype(np.uint16)
    table = train_gpt.ByteTable(np.random.default_rng(1).integers(1, 4, VOCAB), np.zeros(VOCAB, bool),
                                np.zeros(VOCAB, bool))
    settings = tiny(val_batch_size=batch_windows * SEQ_LEN)
    return train_gpt.Evaluator(train_gpt.ValidationSplit(tokens, True), table, settings, cpu_runtime())


class ShapeRecorder(torch.nn.Module):
    """The model, noting the shape of every batch it is given (one shape: one graph under compile)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, inputs, targets):
        self.shapes.append(tuple(inputs.shape))
        return self.model(inputs, targets)


# ---- evaluation: one batch shape ------------------------------------------------------------------


@pytest.mark.parametrize("stride", [0, 4])  # plain (5 windows), sliding (17 windows): neither a multiple of 3
def test_every_evaluation_batch_has_the_full_batch_shape(stride):
    recorder = ShapeRecorder(perturbed_model(tiny()))
    evaluator(5, batch_windows=3).evaluate(recorder, stride)
    assert len(recorder.shapes) > 1 and set(recorder.shapes) == {(3, SEQ_LEN)}


@pytest.mark.parametrize("stride", [0, 4])
def test_padding_of_the_last_batch_leaves_the_score_unchanged(stride):
    model = perturbed_model(tiny())
    padded = evaluator(5, batch_windows=3).evaluate(model, stride)
    one_window_per_batch = evaluator(5, batch_windows=1).evaluate(model, stride)  # nothing to pad
    assert padded == pytest.approx(one_window_per_batch, rel=1e-12)


@pytest.mark.parametrize("stride", [0, 4])
def test_padding_windows_score_nothing_and_every_token_is_scored_once(stride):
    ev = evaluator(5, batch_windows=3)
    with torch.inference_mode():
        scored = torch.cat([s for _, _, s in ev.scored_windows(perturbed_model(tiny()), stride)])
    assert scored.sum().item() == 5 * SEQ_LEN
    assert scored[-1].sum().item() == 0  # the last row is padding


# ---- attention: FlashAttention only -------------------------------------------------------------


def test_head_dim_flash_attention_cannot_take_is_rejected():
    env = {**TINY_MODEL_ENV, "MODEL_DIM": "96", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}  # heads of 12
    with pytest.raises(train_gpt.SettingsError, match="MODEL_DIM=96 is invalid.*multiple of 8"):
        Settings.from_env(env)


def test_head_dim_over_256_is_rejected():
    env = {**TINY_MODEL_ENV, "MODEL_DIM": "528", "NUM_HEADS": "2", "NUM_KV_HEADS": "1"}  # heads of 264
    with pytest.raises(train_gpt.SettingsError, match="MODEL_DIM=528 is invalid"):
        Settings.from_env(env)


def test_cuda_attention_is_pinned_to_flash_attention():
    backends = torch.backends.cuda
    kernels = ("flash", "math", "mem_efficient", "cudnn")
    before = {k: getattr(backends, f"{k}_sdp_enabled")() for k in kernels}
    try:
        train_gpt.pin_flash_attention()
        assert {k: getattr(backends, f"{k}_sdp_enabled")() for k in kernels} == dict(
            flash=True, math=False, mem_efficient=False, cudnn=False)
    finally:
        for k, on in before.items():
            getattr(backends, f"enable_{k}_sdp")(on)


# ---- Muon: state created once ---------------------------------------------------------------------


def test_muon_does_not_allocate_momentum_buffers_every_step(monkeypatch):
    matrices = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    muon = train_gpt.Muon(matrices, lr=0.01, momentum=0.9, backend_steps=2, rank=0, world_size=1,
                          ns_dtype=torch.float32)

    def step():
        for p in matrices:
            p.grad = torch.randn_like(p)
        muon.step()

    step()
    buffers = [muon.state[p]["momentum_buffer"] for p in matrices]
    calls = []
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: calls.append(a) or torch.empty(0))
    step()
    step()
    assert calls == []
    assert all(muon.state[p]["momentum_buffer"] is b for p, b in zip(matrices, buffers))
    assert all(b.abs().sum() > 0 for b in buffers)  # the buffers made once are the ones that accumulate


# ---- torch.compile: one graph, and a graph break is an error ---------------------------------------


@pytest.fixture(autouse=True)
def fresh_dynamo_caches():
    """Each test compiles from scratch: no graphs (or recompile-limit counts) left by another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("preset", ["1.0810", "baseline"])
def test_model_traces_as_one_graph_for_training_and_evaluation(preset):
    settings = dataclasses.replace(tiny(), **train_gpt.PRESETS[preset]) if preset == "baseline" else tiny()
    settings = dataclasses.replace(settings, train_seq_len=SEQ_LEN)
    model = perturbed_model(settings)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on any graph break
    inputs = torch.randint(0, VOCAB, (2, SEQ_LEN))
    for recurrence in (False, True) if settings.recur_layers else (False,):
        model.recurrence_active = recurrence
        compiled(inputs, inputs).mean().backward()
        with torch.inference_mode():
            compiled(inputs, inputs)


def test_evaluation_compiles_one_graph_per_recurrence_state():
    from torch._dynamo.utils import counters
    model = perturbed_model(tiny())
    compiled = torch.compile(model, backend="eager", dynamic=False, fullgraph=True)  # dynamo counts graphs
    ev = evaluator(5, batch_windows=3)  # plain: 3 + 2 windows; sliding: 17 = 5 x 3 + 2
    graphs = []
    for recurrence in (False, True):
        model.recurrence_active = recurrence
        before = counters["stats"]["unique_graphs"]
        ev.evaluate(compiled)
        ev.evaluate(compiled, stride=4)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 1]


def test_trainer_compiles_the_model_so_that_a_graph_break_is_an_error(tiny_dataset, monkeypatch):
    settings = tiny(data_path=tiny_dataset.data_path, vocab_size=tiny_dataset.vocab_size, train_batch_tokens=64)
    trainer = train_gpt.Trainer(settings, cpu_runtime(compile_model=True))
    original = train_gpt.GPT.logits

    def logits_with_a_graph_break(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_gpt.GPT, "logits", logits_with_a_graph_break)
    inputs = torch.randint(0, tiny_dataset.vocab_size, (1, SEQ_LEN))
    with pytest.raises(torch._dynamo.exc.Unsupported):
        trainer.compiled(inputs, inputs)


# ---- test-time training: one batch shape, its graph compiled in warm-up ------------------------------


def ttt_evaluator(num_scored: int, chunk_tokens: int) -> train_gpt.Evaluator:
    tokens = np.random.default_rng(2).integers(0, VOCAB, num_scored + 1).astype(np.uint16)
    table = train_gpt.ByteTable(np.ones(VOCAB, np.int64), np.zeros(VOCAB, bool), np.zeros(VOCAB, bool))
    settings = tiny(val_batch_size=4 * SEQ_LEN, ttt_chunk_tokens=chunk_tokens, ttt_epochs=2)
    return train_gpt.Evaluator(train_gpt.ValidationSplit(tokens, True), table, settings, cpu_runtime())


class ModeRecorder(ShapeRecorder):
    """Notes each call's (batch shape, training mode, grad enabled, recurrence on)."""

    def forward(self, inputs, targets):
        self.shapes.append((tuple(inputs.shape), self.model.training, torch.is_grad_enabled(),
                            self.model.recurrence_active))
        return self.model(inputs, targets)


def test_every_ttt_training_batch_has_the_shape_compiled_in_warm_up():
    """Plain windows of 16, chunks of 40 tokens (by each window's first target): 3 sequences (0-47), 2 (48-79), 3,
    2, then the last chunk (not trained). Batches of ceil(40 / 16) = 3 rows, filled when short: one shape."""
    ev = ttt_evaluator(12 * SEQ_LEN, chunk_tokens=40)
    model = perturbed_model(ev.settings)
    warm_up = ModeRecorder(model)
    ev.compile_ttt(model, warm_up)
    model.recurrence_active = True  # as after training
    during = ModeRecorder(model)
    ev.evaluate_with_ttt(during, 0)
    training = [call for call in during.shapes if call[1]]
    assert warm_up.shapes == [((3, SEQ_LEN), True, True, True)]
    assert len(training) == 2 * 4 and set(training) == {((3, SEQ_LEN), True, True, True)}  # epochs x chunks


def test_compile_ttt_leaves_weights_gradients_and_recurrence_as_they_were():
    ev = ttt_evaluator(12 * SEQ_LEN, chunk_tokens=40)
    model = perturbed_model(ev.settings)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev.compile_ttt(model, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.recurrence_active is False


def test_ttt_filler_rows_weigh_nothing():
    """The same TTT in batches of 3 rows (short ones filled with repeats) and of 1 row (nothing to fill)."""
    model = perturbed_model(tiny())
    model.recurrence_active = True
    scores = []
    for rows in (3, 1):
        ev = ttt_evaluator(12 * SEQ_LEN, chunk_tokens=40)
        ev.ttt_rows = rows
        scores.append(ev.evaluate_with_ttt(copy.deepcopy(model), 0))  # chunks of 3, 2, 3, 2 sequences
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)  # fp32 gradients summed in another grouping


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: as on CUDA (bf16 embedding, fused AdamW)
def test_a_compiled_run_uses_five_graph_cache_entries_all_made_before_the_final_evaluation(tmp_path, monkeypatch,
                                                                                         precision):
    """Under fullgraph=True dynamo keeps at most torch._dynamo.config.recompile_limit (8) graphs of GPT.forward;
    past it the run fails. Five: training with recurrence off and on, evaluation with recurrence off and on,
    TTT's training batch (compiled in warm-up). A new shape or mode would fail here first, not on 8 GPUs; and
    nothing compiles inside the timed final evaluation. Dynamo's eager backend: the same cache, no compiler."""
    from shard_io import write_shard
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(0, 256, 50_000).astype(np.uint16))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.r_[1, rng.integers(4, 256, 12 * 64)].astype(np.uint16))
    (tmp_path / "bytes.json").write_text('{"vocab_size": 256, "byte_offset": 4}')  # ids 0-3 special, as byte260's
    env = dict(PRESET="1.0810", DEVICE="cpu", COMPILE="1", VOCAB_SIZE="256", DATA_PATH=str(tmp_path),
               TOKENIZER_PATH=str(tmp_path / "bytes.json"), NUM_LAYERS="3", RECUR_LAYERS="1", MODEL_DIM="64",
               NUM_HEADS="1", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", VAL_BATCH_SIZE="1024",
               ITERATIONS="4", WARMUP_STEPS="2", VAL_LOSS_EVERY="2", MAX_WALLCLOCK_SECONDS="0", EVAL_STRIDE="16",
               TTT_EPOCHS="1", TTT_CHUNK_TOKENS="256", RUN_ID="entries", EXPORT_QUANT="rtn", PRECISION=precision)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    entries = lambda: len(_debug_get_cache_entry_list(train_gpt.GPT.forward.__code__))  # noqa: E731
    before_final = []
    export_and_rescore = train_gpt.export_and_rescore
    monkeypatch.setattr(train_gpt, "export_and_rescore", lambda *a: before_final.append(entries()) or
                        export_and_rescore(*a))
    settings = Settings.from_env(env)
    log = train_gpt.RunLog("entries", True)
    try:
        train_gpt.train(settings, train_gpt.setup_runtime(settings), log)
    finally:
        torch.set_num_threads(threads)
        log.file.close()
    assert before_final == [5] and entries() == 5 < torch._dynamo.config.recompile_limit
