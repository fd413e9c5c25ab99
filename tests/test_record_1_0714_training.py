"""The 1.0714 record's training, whole: 20 optimizer steps of the kit's default (its model, its packed documents, its
per-GPU clipping, its Muon, its warm-up, its optimizer settings) give the weights of the record's own train_model run
as on its 8 GPUs (tests/record_eight_gpus.py: 8 gloo processes), before and after its EMA, from the same seed and
shards; the kit runs as one process (8 micro-batches, one per GPU) and as two."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, run_on_ranks
from record_eight_gpus import run_record_training
from reference_record import kit_state_dict_1_0714, load_record
from shard_io import write_shard
from test_record_1_0714_model import LOGGED
from test_record_equivalence_model import one_thread  # noqa: F401
from train_gpt import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

# The record's model at 4 layers x 64 (loop over blocks 1-2, two lanes from block 3, XSA on all), each GPU's row of
# 64 tokens cut at every BOS and every 32 tokens. Its clock ticks 1 s a step and its cap less the GPTQ reserve
# (33 - 13 s) is 20 steps: the warm-down (from 0.25) and the looping (from 0.35, step 7) start within the run;
# ITERATIONS is far away, as in its runs. The warm-up runs 2 + 2 steps; the momentum warm-up is shortened to 10
# steps so that the run sees it end.
VOCAB, STEPS = 128, 20
SIZE = dict(VOCAB_SIZE=VOCAB, NUM_LAYERS=4, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8, TRAIN_SEQ_LEN=32,
            TRAIN_BATCH_TOKENS=8 * 64, XSA_LAST_N=4, PARALLEL_START_LAYER=3)
CLOCK = dict(MAX_WALLCLOCK_SECONDS=33, ITERATIONS=1000, WARMUP_STEPS=2, MUON_MOMENTUM_WARMUP_STEPS=10, SEED=7)
RECORD_ENV = dict(LOGGED, **SIZE, **CLOCK, EMBEDDING_DIM=64, LOOP_START=1, LOOP_END=2)
KIT = dict(**{k.lower(): v for k, v in {**SIZE, **CLOCK}.items()}, recur_layers="1,2", device="cpu")
# Float rounding only: both run fp32 on the CPU, the same operations in another order (Newton-Schulz batched or
# one matrix a rank, sums over the 8 GPUs, fused or unfused AdamW, per-segment attention), compounded by 24 steps
# of clipped, orthogonalised updates. Measured: 1e-5 of the largest change the 20 steps make to a tensor.
WEIGHTS_RTOL = 1e-4


def write_documents(folder: Path) -> None:
    """6 shards of 1,100 to 1,600 tokens (2 or 3 steps of 8 x 65 each: the 8 GPUs change shard together every few
    steps, and wrap around), documents of 1 to 90 tokens; the first shard begins mid-document."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, n in enumerate([1400, 1100, 1600, 1250, 1500, 1300]):
        tokens = rng.integers(2, VOCAB, n)
        starts = 5 * (i == 0) + np.concatenate(([0], np.cumsum(rng.integers(1, 91, n))))
        tokens[starts[starts < n]] = train_gpt.BOS_ID
        write_shard(folder / f"fineweb_train_{i:06d}.bin", tokens)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("record_1_0714_training")
    write_documents(root / "datasets" / f"fineweb10B_sp{VOCAB}")
    return root


@pytest.fixture(scope="module")
def record_run(shards):
    return run_record_training(shards / "record", dict(RECORD_ENV, DATA_DIR=shards, RUN_ID="record"))


def kit_training(settings: Settings, runtime: train_gpt.Runtime) -> dict:
    """The kit's Trainer driven as train() drives it, on the record's clock (1 s a step): the initial weights, the
    weights before and after the EMA, each step's (learning rates, Muon momentum, recurrence)."""
    trainer = train_gpt.Trainer(settings, runtime)
    out = dict(initial={k: v.clone() for k, v in trainer.model.state_dict().items()}, schedule=[])
    trainer.warm_up_and_restore(settings.warmup_steps, lambda line: None)
    for step in range(STEPS):
        elapsed_ms = 1000.0 * step
        trainer.step(step, train_gpt.lr_multiplier(step, elapsed_ms, settings),
                     train_gpt.training_progress(step, elapsed_ms, settings))
        tok, scalars, muon = (opt.param_groups[0] for opt in trainer.optimizers)
        out["schedule"].append(([tok["lr"], muon["lr"], scalars["lr"]], muon["momentum"],
                                trainer.model.recurrence_active))
    out["raw"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.ema.copy_to_model()
    return dict(out, final=trainer.model.state_dict())


def kit_run(shards: Path, **overrides) -> dict:
    settings = Settings(**{**KIT, "data_path": str(shards / "datasets" / f"fineweb10B_sp{VOCAB}"), **overrides})
    return kit_training(settings, train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 8, torch.float32, False))


def largest_error(ours: dict, record_run, stage: str) -> float:
    """Of every tensor, the largest difference from the record's, as a share of the largest change the record's 20
    steps made to it (the SmearGate, which neither trains, is compared exactly)."""
    errors = []
    for name, theirs in getattr(record_run, stage).items():
        moved = (record_run.raw[name] - record_run.initial[name]).abs().max()
        errors.append(((ours[name] - theirs).abs().max() / moved).item() if moved > 0 else
                      float("inf") * (not torch.equal(ours[name], theirs)))
    return max(errors)


def optimizer_groups(optimizers, names: dict) -> list[tuple]:
    """Per parameter group: the tensors it trains (by name), its LR, weight decay, betas, eps, momentum."""
    return sorted((sorted(n for p in g["params"] for n in names[id(p)]), g["lr"], g["weight_decay"], g.get("betas"),
                   g.get("eps"), g.get("momentum"), g.get("backend_steps"))
                  for opt in optimizers for g in opt.param_groups)


def test_parameter_groups_are_the_records_and_its_ema_covers_the_parameters(tmp_path):
    """Its Optimizers (its banks counted as the kit's matrices), no DDP: the same tensors in each group with the same
    hyperparameters; the SmearGate in none. Its EMA runs over its state_dict: the parameters, no buffer."""
    record = load_record(tmp_path, {k: str(v) for k, v in RECORD_ENV.items()}, record="1.0714")
    h = record.Hyperparameters()
    model = record.GPT(h)
    banked = {id(p): list(kit_state_dict_1_0714(record, {n: p.detach()})) for n, p in model.named_parameters()}
    theirs = optimizer_groups(record.Optimizers(h, model), banked)
    ours = train_gpt.GPT(Settings(**KIT))
    ours_names = {id(p): [n] for n, p in ours.named_parameters()}
    optimizers = train_gpt.build_optimizers(ours, Settings(**KIT), train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 8,
                                                                                   torch.float32, False))
    assert optimizer_groups(optimizers, ours_names) == theirs
    trained = {n for group in theirs for n in group[0]}
    assert {n for n, _ in ours.named_parameters()} - trained == {"smear_gate", "smear_lambda"}
    assert model.state_dict().keys() == dict(model.named_parameters()).keys()


def test_twenty_steps_give_the_records_weights_before_and_after_the_ema(shards, record_run):
    ours = kit_run(shards)
    assert ours["initial"].keys() == record_run.initial.keys()
    assert all(torch.equal(t, record_run.initial[name]) for name, t in ours["initial"].items())
    for (lrs, momentum, looping), (their_lrs, their_momentum, their_looping) in zip(ours["schedule"],
                                                                                   record_run.schedule[4:]):
        assert lrs == pytest.approx(their_lrs, rel=1e-12) and momentum == pytest.approx(their_momentum)
        assert looping == their_looping
    # the record's schedule: 4 warm-up steps, then the LR flat to 0.25 and down to 0 (1 - 19 / 20) / 0.75 at step 19,
    # the looping on from step 7, the momentum 0.97 from step 10
    schedule = record_run.schedule[4:]
    assert len(schedule) == STEPS and [lrs[1] / 0.026 for lrs, _, _ in schedule][5::14] == pytest.approx([1, 0.0666667])
    assert [looping for *_, looping in schedule].index(True) == 7 and schedule[10][1] == pytest.approx(0.97)
    assert not record_run.raw["smear_lambda"].any() and not ours["raw"]["smear_lambda"].any()
    assert largest_error(ours["raw"], record_run, "raw") <= WEIGHTS_RTOL
    assert largest_error(ours["final"], record_run, "final") <= WEIGHTS_RTOL


def no_kernel_warm_up(trainer, batches, looping):
    """The warm-up without the record's kernel passes, whose SmearGate gradients its first steps carry."""


@pytest.mark.parametrize("changed_back", [dict(muon_momentum=0.99), dict(smear_frozen=0), "no kernel warm-up"])
def test_weights_differ_when_one_setting_is_changed_back(shards, record_run, monkeypatch, changed_back):
    """The tolerance is tight enough: Muon's momentum at the default's 0.99 (the optimizer value with the least
    effect; the others change the learning rates, which the test above compares step by step), the SmearGate trained,
    its gradients not carried from the kernel warm-up: each moves the weights by over 30 times the tolerance."""
    if changed_back == "no kernel warm-up":
        monkeypatch.setattr(train_gpt.Trainer, "carry_kernel_warm_up", no_kernel_warm_up)
    ours = kit_run(shards, **(changed_back if isinstance(changed_back, dict) else {}))
    assert largest_error(ours["raw"], record_run, "raw") > 30 * WEIGHTS_RTOL


TWO_RANKS = '''import sys
import torch, torch.distributed as dist
sys.path[:0] = [{repo!r}, {tests!r}]
import train_gpt
from test_record_1_0714_training import kit_training
dist.init_process_group("gloo")
runtime = train_gpt.Runtime(torch.device("cpu"), dist.get_rank(), 2, 0, 4, torch.float32, False)
out = kit_training(train_gpt.Settings(**{settings!r}), runtime)
torch.save(out, {out!r} + f"/rank{{dist.get_rank()}}.pt")
dist.destroy_process_group()
'''


def test_two_processes_give_the_records_weights(shards, record_run, tmp_path):
    """Rank r's micro-step m is the record's GPU m x 2 + r; both ranks hold the same weights."""
    settings = dict(KIT, data_path=str(shards / "datasets" / f"fineweb10B_sp{VOCAB}"))
    run_on_ranks(TWO_RANKS.format(repo=str(REPO), tests=str(REPO / "tests"), settings=settings, out=str(tmp_path)),
                 tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(t, ranks[1]["final"][name]) for name, t in ranks[0]["final"].items())
    assert largest_error(ranks[0]["raw"], record_run, "raw") <= WEIGHTS_RTOL
    assert largest_error(ranks[0]["final"], record_run, "final") <= WEIGHTS_RTOL
