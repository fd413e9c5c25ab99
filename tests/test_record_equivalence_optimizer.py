"""PRESET=1.0810's optimizers, schedules and EMA are the 1.0810 record's: from the same weights and
batches, 20 steps of the kit's Trainer give the weights of the record's own training loop, on the CPU."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import train_gpt
from reference_record import load_record
from test_record_equivalence_model import REDUCED_KIT, REDUCED_RECORD, assert_close_relative, one_thread  # noqa: F401
from train_gpt import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, ACCUM, SEQS = 20, 2, 2  # 2 accumulation steps of 2 sequences
# The record at 4 layers (loops of 1-2, parallel from 2) for speed; the model tests cover its full layout. It runs
# as one process, WORLD_SIZE=4 only setting its accumulation to 8 // 4 = 2.
SMALL_RECORD = {**REDUCED_RECORD, "NUM_LAYERS": 4, "LOOP_START": 1, "LOOP_END": 2, "PARALLEL_RESIDUAL_START": 2,
                "WORLD_SIZE": 4}
SMALL_KIT = {**REDUCED_KIT, "num_layers": 4, "recur_layers": "1,2", "parallel_last_n": 2}
# Deterministic wall clock: every step takes 1 s, and the cap less the GPTQ reserve (32 - 12 s) is 20 steps, so
# training progress is step / 20: the warmdown (from 0.28) and looping (from 0.35) start within the run.
# ITERATIONS is far away, so the progress is the clock's, as in the record's runs. The momentum warm-up is
# shortened to 10 steps so that the run sees it end.
CLOCK = dict(MAX_WALLCLOCK_SECONDS=32, GPTQ_RESERVE_SECONDS=12, ITERATIONS=1000, MUON_MOMENTUM_WARMUP_STEPS=10)
# Float rounding of 20 steps: the kit orthogonalises same-shaped matrices in one batched call, the record one at
# a time (fp32, differing in the last bits), and the steps compound it; measured: at most 3e-6 of a tensor's
# largest value.
WEIGHTS_RTOL = 1e-5


def batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(5)
    steps = []
    for _ in range(STEPS):
        tokens = [torch.randint(0, 128, (SEQS, 33), generator=g) for _ in range(ACCUM)]
        steps.append([(t[:, :-1], t[:, 1:]) for t in tokens])
    return steps


@pytest.fixture(scope="module")
def record_run(tmp_path_factory, one_thread):
    """The record's train_model, as it is, on fixed batches and a fake clock; its evaluation returns 0. Returns
    the initial weights, the weights before and after the EMA, and each step's (LRs, Muon momentum)."""
    env = {**SMALL_RECORD, **CLOCK, "TRAIN_BATCH_TOKENS": 4 * ACCUM * SEQS * 32, "WARMUP_STEPS": 0}
    record = load_record(tmp_path_factory.mktemp("record_optimizer"), {k: str(v) for k, v in env.items()})
    h, clock, flat = record.Hyperparameters(), [0.0], [b for step in batches() for b in step]
    torch.manual_seed(0)
    model = record.GPT(h)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out = SimpleNamespace(initial=initial, schedule=[])

    class FixedBatches:
        def __init__(self, *args):
            self.i = 0

        def next_batch(self, global_tokens, grad_accum_steps):
            assert (global_tokens // (4 * ACCUM * 32), grad_accum_steps) == (SEQS, ACCUM)
            clock[0] += 1.0 / ACCUM  # exact in binary: every step is exactly 1 s
            self.i += 1
            return tuple(t.clone() for t in flat[self.i - 1])

    class RecordingOptimizers(record.Optimizers):
        def step(self):
            muon = self.optimizer_muon.param_groups[0]
            lrs = [g["lr"] for opt in (self.optimizer_tok, self.optimizer_scalar, self.optimizer_muon)
                   for g in opt.param_groups]
            out.schedule.append((lrs, muon["momentum"], model.looping_active))
            super().step()

    def log(msg, console=True):
        if msg.startswith("ema:applying"):  # just before the record loads its EMA into the model
            out.raw = {k: v.clone() for k, v in model.state_dict().items()}

    mp = pytest.MonkeyPatch()
    for name, value in dict(GPT=lambda h: model, ShuffledSequenceLoader=FixedBatches, Optimizers=RecordingOptimizers,
                            eval_val=lambda *a, **k: (0.0, 0.0), log=log,
                            time=SimpleNamespace(perf_counter=lambda: clock[0])).items():
        mp.setattr(record, name, value)
    try:
        record.train_model(h, torch.device("cpu"), None)
    finally:
        mp.undo()
    out.final = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(out.schedule) == STEPS
    return out


def kit_run(initial: dict, monkeypatch, **overrides) -> SimpleNamespace:
    """The kit's Trainer from the same weights on the same batches, driven as train() drives it."""
    steps = iter(batches())
    monkeypatch.setattr(train_gpt, "TrainBatchLoader", lambda *a: SimpleNamespace(next_step=lambda: next(steps)))
    settings = Settings.for_preset("1.0810", **{**SMALL_KIT, **{k.lower(): v for k, v in CLOCK.items()}, **overrides})
    trainer = train_gpt.Trainer(settings, train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, ACCUM, torch.float32, False))
    trainer.model.load_state_dict(initial)
    trainer.ema = train_gpt.WeightEMA(trainer.model, settings.ema_decay)  # from these weights, as after warm-up
    out = SimpleNamespace(schedule=[])
    for step in range(STEPS):
        elapsed_ms = 1000.0 * step
        trainer.step(step, train_gpt.lr_multiplier(step, elapsed_ms, settings),
                     train_gpt.training_progress(step, elapsed_ms, settings))
        tok, scalars, muon = (opt.param_groups[0] for opt in trainer.optimizers)
        out.schedule.append(([tok["lr"], scalars["lr"], muon["lr"]], muon["momentum"],
                             trainer.model.recurrence_active))
    out.raw = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.ema.copy_to_model()
    out.final = trainer.model.state_dict()
    return out


def test_lr_momentum_and_looping_schedules_equal_the_records_step_by_step(record_run, monkeypatch):
    ours = kit_run(record_run.initial, monkeypatch)
    for step, (mine, theirs) in enumerate(zip(ours.schedule, record_run.schedule)):
        assert mine[0] == pytest.approx(theirs[0], rel=1e-12) and mine[1:] == pytest.approx(theirs[1:]), step
    lr_scale = [lrs[2] / 0.022 for lrs, _, _ in record_run.schedule]  # the record's: flat, then linear to 0
    assert lr_scale[5] == 1.0 and lr_scale[19] == pytest.approx(0.05 / 0.72)
    assert [looping for _, _, looping in record_run.schedule].index(True) == 7  # 7 / 20 = 0.35
    assert [m for _, m, _ in record_run.schedule][9:11] == pytest.approx([0.92 + 0.9 * 0.07, 0.99])


def test_twenty_steps_give_the_records_weights_before_and_after_the_ema(record_run, monkeypatch):
    ours = kit_run(record_run.initial, monkeypatch)
    for name, theirs in record_run.raw.items():
        assert not torch.equal(theirs, record_run.initial[name]), name  # every tensor was trained
        assert_close_relative(ours.raw[name], theirs, WEIGHTS_RTOL)
        assert_close_relative(ours.final[name], record_run.final[name], WEIGHTS_RTOL)


@pytest.mark.parametrize("changed_back", [dict(matrix_lr=0.025), dict(muon_momentum=0.97), dict(embed_weight_decay=0),
                                          dict(scalar_weight_decay=0), dict(muon_weight_decay=0.09),
                                          dict(muon_ns_coeffs="polar"), dict(warmdown_frac=0.6), dict(ema_decay=0.997)])
def test_weights_differ_when_one_setting_is_changed_back(record_run, monkeypatch, changed_back):
    ours = kit_run(record_run.initial, monkeypatch, **changed_back)
    errors = [(ours.final[n] - t).abs().max() / t.abs().max() for n, t in record_run.final.items()]
    assert max(errors) > 10 * WEIGHTS_RTOL

