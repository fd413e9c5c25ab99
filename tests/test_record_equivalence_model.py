"""PRESET=1.0810's model is the 1.0810 record's: the same tensors, the same initial weights for the same seed, and the
same logits from the same weights, checked against the record's own code on the CPU."""
from __future__ import annotations

import pytest
import torch

import train_gpt
from reference_record import load_record
from train_gpt import Settings

# Reduced size: the record's defaults (11 layers, loops of 3-5, XSA on all, parallel from 7, MLP 4x, gated
# skips) at width 64 with 2 KV heads: c_k and c_v are 32 x 64, below the record's orthogonal-init threshold.
REDUCED_RECORD = dict(VOCAB_SIZE=128, MODEL_DIM=64, EMBEDDING_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=8,
                      TRAIN_SEQ_LEN=32, QK_GAIN_INIT=5.25)  # 5.25: the record's runs (its logs), not its default
REDUCED_KIT = dict(vocab_size=128, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, train_seq_len=32)
# Float rounding only: both compute in fp32 on the CPU, with the same operations up to their order.
LOGITS_RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a loaded machine two threads can be 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_record(tmp_path_factory.mktemp("record_reduced"), {k: str(v) for k, v in REDUCED_RECORD.items()})


def kit_model(**overrides) -> train_gpt.GPT:
    return train_gpt.GPT(Settings.for_preset("1.0810", **{**REDUCED_KIT, **overrides}))


def perturbed_record_model(record, seed: int = 0):
    """The record's model with every tensor moved off its init (zero projections, gates at 0), so that every path
    and every tensor contributes to the logits."""
    torch.manual_seed(seed)
    model = record.GPT(record.Hyperparameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def assert_close_relative(ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> None:
    """|ours - theirs| <= rtol x the largest |theirs|: values near 0 have no meaningful relative error."""
    error = (ours - theirs).abs().max().item()
    assert error <= rtol * theirs.abs().max().item(), f"max difference {error:.3g}, scale {theirs.abs().max():.3g}"


def test_model_has_the_records_35944536_parameters_in_tensors_of_the_same_names_and_shapes(tmp_path):
    record = load_record(tmp_path, {"QK_GAIN_INIT": "5.25"})
    with torch.device("meta"):  # full size, shapes only: no memory, no init work
        theirs, ours = record.GPT(record.Hyperparameters()), train_gpt.GPT(Settings.for_preset("1.0810"))
    assert sum(p.numel() for p in ours.parameters()) == 35_944_536  # the record's logs: model_params:35944536
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in theirs.named_parameters()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]  # same order


def test_model_starts_from_the_records_initial_weights_for_the_same_seed(record):
    """Exactly: the same random draws in the same order (default inits while building, then the embedding's
    normal(0, 0.005) and the orthogonal matrices; zero output projections), here at width 64 (11 layers)."""
    torch.manual_seed(3)
    theirs = dict(record.GPT(record.Hyperparameters()).named_parameters())
    torch.manual_seed(3)
    ours = dict(kit_model().named_parameters())
    assert ours["blocks.0.attn.c_k.weight"].shape == (32, 64)  # kept PyTorch's default init, as in the record
    for name, p in ours.items():
        assert torch.equal(p, theirs[name]), name


def test_default_init_setting_keeps_pytorchs_init_and_differs_from_the_records(record):
    torch.manual_seed(3)
    theirs = dict(record.GPT(record.Hyperparameters()).named_parameters())
    torch.manual_seed(3)
    ours = dict(kit_model(ortho_init=0).named_parameters())
    fc = ours["blocks.0.mlp.fc.weight"]
    assert fc.abs().max() <= 1 / 64 ** 0.5  # kaiming-uniform's bound: 1 / sqrt(fan_in)
    assert not torch.equal(fc, theirs["blocks.0.mlp.fc.weight"])
    assert torch.equal(ours["tok_emb.weight"], theirs["tok_emb.weight"])  # drawn first, before any matrix


@pytest.mark.parametrize("looping", [False, True])
def test_logits_equal_the_records_from_the_same_weights(record, looping):
    theirs = perturbed_record_model(record)
    ours = kit_model()
    ours.load_state_dict(theirs.state_dict())  # the same names: the name map is the identity
    theirs.looping_active = ours.recurrence_active = looping
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_relative(ours.logits(ids), theirs.forward_logits(ids), LOGITS_RTOL)


def test_eval_forward_with_looping_equals_the_records_loss(record):
    """As the record scores (eval mode, looping on): the mean cross-entropy of the targets."""
    theirs = perturbed_record_model(record, seed=1).eval()
    ours = kit_model().eval()
    ours.load_state_dict(theirs.state_dict())
    theirs.looping_active = ours.recurrence_active = True
    ids = torch.randint(0, 128, (3, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = ours(ids[:, :-1], ids[:, 1:]).mean()
        assert loss.item() == pytest.approx(theirs(ids[:, :-1], ids[:, 1:]).item(), rel=LOGITS_RTOL)


@pytest.mark.parametrize("changed_back", [dict(skip_gates=0), dict(mlp_mult=3), dict(num_loops=1),
                                          dict(recur_layers="4,5")])  # skips: 7 per half, not 8
def test_tensors_differ_when_one_setting_is_changed_back(record, changed_back):
    theirs = record.GPT(record.Hyperparameters())
    ours = kit_model(**changed_back)
    assert {n: p.shape for n, p in ours.named_parameters()} != {n: p.shape for n, p in theirs.named_parameters()}


@pytest.mark.parametrize("changed_back", [dict(parallel_last_n=3), dict(xsa_last_n=10), dict(rope_dims=16)])
def test_logits_differ_when_one_setting_is_changed_back(record, changed_back):
    """The equivalence is a property of the preset: each of these changes breaks it."""
    theirs = perturbed_record_model(record)
    ours = kit_model(**changed_back)
    ours.load_state_dict(theirs.state_dict())
    theirs.looping_active = ours.recurrence_active = True
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, theirs_logits = ours.logits(ids), theirs.forward_logits(ids)
    assert (ours_logits - theirs_logits).abs().max() > 1e-3 * theirs_logits.abs().max()


def test_bf16_runs_keep_the_same_tensors_in_bf16_as_the_record(record, monkeypatch):
    """The record casts its model to bf16 and restores the linear weights and control tensors to fp32: the token
    embedding (the tied head) stays bf16. The kit's Trainer with a bf16 compute dtype stores each tensor alike."""
    theirs = record.GPT(record.Hyperparameters()).bfloat16()
    record.restore_fp32_params(theirs)
    monkeypatch.setattr(train_gpt, "TrainBatchLoader", lambda *args: None)  # no data needed to build the model
    runtime = train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.bfloat16, False)
    ours = train_gpt.Trainer(Settings.for_preset("1.0810", **REDUCED_KIT), runtime).model
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert ours.tok_emb.weight.dtype == torch.bfloat16
