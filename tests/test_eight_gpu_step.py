"""The 1.0714 record's training step on its 8 GPUs, reproduced on any world size (GRAD_CLIP_PER_RANK,
WARMUP_KEEP_MOMENTUM, MUON_ROUNDING): each GPU clips its own gradient before the mean (no DDP), Muon's momentum
outlives the warm-up, and Muon computes each matrix's update as the record's Muon computes its bank's. The step's
semantics do not depend on the model: these tests train the kit's own small model on fixed batches."""
from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import train_gpt
from conftest import REPO, run_on_ranks
from record_pieces import FP32_MUON, record_pieces

VOCAB, SEQ_LEN, ROWS = 128, 16, 2  # each of the 8 GPUs' micro-batch: 2 sequences of 16 tokens
TINY = dict(vocab_size=VOCAB, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, rope_dims=8,
            train_seq_len=SEQ_LEN, train_batch_tokens=8 * ROWS * SEQ_LEN, val_batch_size=8 * ROWS * SEQ_LEN,
            recur_layers="1", num_loops=1, xsa_last_n=0, parallel_last_n=1, ema_decay=0.9, iterations=100,
            max_wallclock_seconds=0, muon_momentum_warmup_steps=4, device="cpu")


def fixed_steps(count: int = 8) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, the 8 GPUs' micro-batches (inputs, targets)."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (count, 8, ROWS, SEQ_LEN + 1), generator=g)
    return [[(t[:, :-1], t[:, 1:]) for t in step] for step in tokens]


class FixedLoader:
    """TrainBatchLoader's interface over fixed_steps: micro-step m of rank r is GPU m x world + r; a new loader
    starts again from the first step, as the warm-up's restart does."""

    def __init__(self, settings, runtime):
        self.rt, self.steps, self.packed = runtime, iter(fixed_steps()), None

    def next_step(self):
        gpus = next(self.steps)
        return [gpus[m * self.rt.world_size + self.rt.rank] for m in range(self.rt.grad_accum_steps)]


def make_trainer(monkeypatch, world_size: int = 1, rank: int = 0, dtype=torch.float32, **overrides):
    monkeypatch.setattr(train_gpt, "TrainBatchLoader", FixedLoader)
    settings = train_gpt.Settings.for_preset("1.0810", **{**TINY, **overrides})  # each test turns on what it is about
    runtime = train_gpt.Runtime(torch.device("cpu"), rank, world_size, 0, 8 // world_size, dtype, False)
    return train_gpt.Trainer(settings, runtime)


def muon_momentum(trainer) -> list[torch.Tensor]:
    muon, = [opt for opt in trainer.optimizers if isinstance(opt, train_gpt.Muon)]
    return [muon.state[p]["momentum_buffer"] for p in muon.param_groups[0]["params"]]


# ----------------------------------------------------------------------------------------------
# GRAD_CLIP_PER_RANK: each GPU's gradient clipped by its own norm, then the mean of the 8.


def gradients_by_hand(model: nn.Module, gpus: list[tuple], clip: float) -> tuple[list, list[torch.Tensor]]:
    """Each GPU's gradient of its mean loss, computed alone; its norm over all parameters; the mean of the clipped."""
    per_gpu = []
    for inputs, targets in gpus:
        model.zero_grad(set_to_none=True)
        model(inputs, targets).mean().backward()
        per_gpu.append([p.grad.clone() for p in model.parameters()])
    norms = [torch.cat([g.flatten() for g in grads]).norm().item() for grads in per_gpu]
    scales = [min(1.0, clip / (norm + 1e-6)) for norm in norms]
    return norms, [sum(s * grads[i] for s, grads in zip(scales, per_gpu)) / 8 for i in range(len(per_gpu[0]))]


def test_each_gpu_clips_its_own_gradient_before_the_mean(monkeypatch):
    probe = make_trainer(monkeypatch, grad_clip_per_rank=1)
    initial = copy.deepcopy(probe.model)
    norms, _ = gradients_by_hand(copy.deepcopy(initial), fixed_steps()[0], 1.0)
    clip = float(np.median(norms))  # half of the GPUs are clipped, half are not
    _, expected = gradients_by_hand(copy.deepcopy(initial), fixed_steps()[0], clip)
    trainer = make_trainer(monkeypatch, grad_clip_per_rank=1, grad_clip_norm=clip)
    trainer.model.load_state_dict(initial.state_dict())
    seen = []
    for opt in trainer.optimizers:
        monkeypatch.setattr(opt, "step", lambda: seen.append([p.grad.clone() for p in trainer.model.parameters()]))
    trainer.step(0, 1.0)
    assert len(seen) == len(trainer.optimizers) and min(norms) < clip < max(norms)
    for ours, theirs in zip(seen[0], expected):  # float rounding: fp32 sums in another order
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_clipping_the_mean_instead_gives_another_gradient(monkeypatch):
    """The test above can fail: the one-process way (clip the mean of the 8) is measurably different."""
    initial = copy.deepcopy(make_trainer(monkeypatch).model)
    norms, _ = gradients_by_hand(copy.deepcopy(initial), fixed_steps()[0], 1.0)
    _, per_gpu = gradients_by_hand(copy.deepcopy(initial), fixed_steps()[0], float(np.median(norms)))
    model = copy.deepcopy(initial)
    model.zero_grad()
    for inputs, targets in fixed_steps()[0]:
        (model(inputs, targets).mean() / 8).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(np.median(norms)))
    difference = max((p.grad - g).abs().max() / g.abs().max() for p, g in zip(model.parameters(), per_gpu))
    assert difference > 0.01


# ----------------------------------------------------------------------------------------------
# WARMUP_KEEP_MOMENTUM: the record's warm-up on 8 GPUs (one batch for its kernels, 2 x WARMUP_STEPS steps).


def test_the_warm_up_keeps_muon_momentum_and_restores_the_rest(monkeypatch):
    trainer = make_trainer(monkeypatch, warmup_keep_momentum=1, warmup_steps=2)
    initial = copy.deepcopy(trainer.model.state_dict())
    lines = []
    trainer.warm_up_and_restore(2, lines.append)
    # By hand: batches 1 to 4 (batch 0 fed the kernel warm-up), momentum steps 0, 1 then 0, 1 with recurrence.
    by_hand = make_trainer(monkeypatch)
    by_hand.loader.next_step()
    for step, progress in [(0, 0.0), (1, 0.0), (0, 1.0), (1, 1.0)]:
        by_hand.step(step, 1.0, progress)
        assert by_hand.model.recurrence_active == bool(progress)
    assert lines == [f"warmup_step:{i}/4" for i in range(1, 5)]
    for kept, expected in zip(muon_momentum(trainer), muon_momentum(by_hand)):
        assert kept.abs().sum() > 0 and torch.equal(kept, expected)
    assert all(torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())
    assert all(not opt.state for opt in trainer.optimizers if not isinstance(opt, train_gpt.Muon))
    assert not trainer.model.recurrence_active and all(torch.equal(a, p) for a, p in
                                                       zip(trainer.ema.shadow, trainer.model.parameters()))
    # The first timed step: batch 0 again, momentum step 0, from the kept momentum.
    after = make_trainer(monkeypatch)
    for buffer, kept in zip(muon_momentum(after), muon_momentum(by_hand)):
        buffer.copy_(kept)
    trainer.step(0, 1.0, 0.0)
    after.step(0, 1.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), after.model.parameters()))


@pytest.mark.parametrize("rounding, dtype", [("1.0810", torch.float32), ("1.0714", torch.bfloat16)])
def test_without_keeping_the_warm_up_momentum_is_zeroed_in_its_dtype(monkeypatch, rounding, dtype):
    trainer = make_trainer(monkeypatch, dtype=torch.bfloat16, muon_rounding=rounding, warmup_steps=2)
    trainer.warm_up_and_restore(2, lambda line: None)
    assert all(buffer.dtype == dtype and not buffer.any() for buffer in muon_momentum(trainer))


# ----------------------------------------------------------------------------------------------
# MUON_ROUNDING=1.0714: each matrix's update is the record's Muon's on a bank of such matrices.

BANKS = [(4, 32, 32), (4, 16, 32), (2, 128, 32), (2, 32, 64)]  # like its qo, kv, MLP up (scale 2) and down banks


def muon_steps(rounding: str, dtype, record) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """3 steps of the record's Muon on each bank and of the kit's on its matrices: (initial, record, kit) per bank."""
    g = torch.Generator().manual_seed(0)
    banks = [0.05 * torch.randn(shape, generator=g) for shape in BANKS]
    theirs = [nn.Parameter(bank.clone()) for bank in banks]
    ours = [nn.Parameter(matrix.clone()) for bank in banks for matrix in bank]
    reference = record.Muon(theirs, lr=0.026, momentum=0.92, backend_steps=5, weight_decay=0.095, row_normalize=True)
    kit = train_gpt.Muon(ours, 0.026, 0.92, 5, 0, 1, dtype, row_norm=True, weight_decay=0.095,
                         orthogonalize=partial(train_gpt.newton_schulz_orthogonalize, rounding=rounding),
                         state_dtype=dtype if rounding == "1.0714" else torch.float32)
    for step in range(3):
        grads = [torch.randn(shape, generator=g) for shape in BANKS]
        for p, grad in zip(theirs, grads):
            p.grad = grad.clone()
        for p, grad in zip(ours, [matrix for grad in grads for matrix in grad]):
            p.grad = grad.clone()
        for opt in reference, kit:
            opt.param_groups[0]["momentum"] = 0.92 + 0.02 * step
            opt.step()
    split = np.cumsum([0] + [shape[0] for shape in BANKS])
    return [(bank, p.detach(), torch.stack(ours[a:b]).detach()) for bank, p, a, b in zip(banks, theirs, split, split[1:])]


def test_muon_in_bf16_is_the_records_bank_muon_bit_for_bit():
    """bf16 gradient, momentum and Newton-Schulz as the record (its Muon unedited; scales 1 and 2 are exact)."""
    for _, theirs, ours in muon_steps("1.0714", torch.bfloat16, record_pieces({"zeropower_via_newtonschulz5", "Muon"})):
        assert torch.equal(ours, theirs)


def test_muon_in_fp32_is_the_records_edited_to_fp32():
    """Float rounding only (the kit adds the sqrt(rows / cols) scale in another place): 1e-6 of the update."""
    record = record_pieces({"zeropower_via_newtonschulz5", "Muon"}, FP32_MUON)
    for initial, theirs, ours in muon_steps("1.0714", torch.float32, record):
        assert ((ours - theirs).abs().max() / (theirs - initial).abs().max()) < 1e-6


def test_muon_in_bf16_with_the_1_0810_rounding_differs_from_the_records():
    """The test above can fail: fp32 momentum and the 1.0810 record's order of operations round otherwise in bf16."""
    record = record_pieces({"zeropower_via_newtonschulz5", "Muon"})
    errors = [((ours - theirs).abs().max() / (theirs - initial).abs().max()).item()
              for initial, theirs, ours in muon_steps("1.0810", torch.bfloat16, record)]
    assert min(errors) > 0.01


# ----------------------------------------------------------------------------------------------
# Two processes (gloo): the sum over ranks, and Muon's sharding, give the one-process result.

TWO_RANKS = '''import os, sys
import torch, torch.distributed as dist
sys.path[:0] = [{repo!r}, {tests!r}]
import pytest, train_gpt
from test_eight_gpu_step import make_trainer
dist.init_process_group("gloo")
with pytest.MonkeyPatch.context() as mp:
    trainer = make_trainer(mp, world_size=2, rank=dist.get_rank(), **{settings!r})
    trainer.warm_up_and_restore(1, lambda line: None)
    for step in range(2):
        trainer.step(step, 1.0, 0.0)
torch.save(trainer.model.state_dict(), os.path.join({out!r}, f"rank{{dist.get_rank()}}.pt"))
dist.destroy_process_group()
'''


def test_two_processes_train_as_one(tmp_path, monkeypatch):
    """Warm-up (momentum kept) and 2 steps with each GPU's gradient clipped: both ranks hold the weights of one
    process (float rounding: the ranks' sums are added in another order), identical on both."""
    settings = dict(grad_clip_per_rank=1, warmup_keep_momentum=1, warmup_steps=1, grad_clip_norm=0.05)
    run_on_ranks(TWO_RANKS.format(repo=str(REPO), tests=str(REPO / "tests"), settings=settings, out=str(tmp_path)),
                 tmp_path)
    one = make_trainer(monkeypatch, **settings)
    one.warm_up_and_restore(1, lambda line: None)
    for step in range(2):
        one.step(step, 1.0, 0.0)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, expected in one.model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-5, atol=1e-6)
