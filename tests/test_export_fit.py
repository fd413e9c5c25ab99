"""EXPORT_FIT_CAP: an artifact a little over the cap fits by zeroing a few +-1 codes (prune_to_fit), far fewer
changed weights than the bit step-down (FIT_CAP_STEPS) changes; a deep excess still steps bits down.

FIT_PRUNE_MAX (0.14) was measured (lzma; re-check under brotli) on test_gptq's Gaussian-rows model (2 layers,
dim 384, 2.26M quantised weights, 28% of them +-1 codes; int6 GPTQ artifact 1,058,288 B) with correlated-input Hessians.
The first step-down (int5 MLP) saves 136,872 B. Pruning a share of the weights in prune_to_fit's order:
    share pruned        2%     8%     14%    18%    22%    26%
    bytes saved        436  24,320 41,352 64,580 95,200 141,956  (lzma: not in proportion)
    bytes per code    0.01   0.13   0.13   0.16   0.19   0.24
    output error added 0.19   0.51   0.95   1.37   1.95   2.78   (x the step-down's; tr(dW H dW^T))
Pruning adds less error up to ~14%; past it the step-down is cheaper. (The sum of squared changes of the weights is
0.15x the step-down's at 11.6%, but no guide under GPTQ: zeroing its +-1 codes first lowers the error to the float
weights, -0.05x the step-down's increase at 4.6%. With clip-search rounding only 7.6% of the codes are +-1;
pruning 5.7% adds 0.2x the step-down's output error, 0.24x its weight error.)"""
from __future__ import annotations

import dataclasses
import io
import lzma
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train_gpt
from train_gpt import Settings


class Matrices(nn.Module):
    """An attention and an MLP matrix, big enough to be quantised, with Gaussian rows of varied scale (the method
    of test_gptq.gaussian_rows_model); small enough that a compression takes a fraction of a second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(256, 320, bias=False),
                                                    "mlp": nn.Linear(256, 512, bias=False)})])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape) * 0.02 * (0.5 + torch.rand(p.shape[0], 1)))

    def control_tensor_names(self) -> set[str]:
        return set()


SETTINGS = Settings.for_preset("1.0810", export_format="int6+lzma", export_quant="rtn", export_fit_cap=1,
                                gptq_clip_sigmas=3.0)  # rtn: plain rounding at 3 row stds


@pytest.fixture(scope="module")
def unfitted() -> bytes:
    """The int6 artifact, with no cap to meet."""
    return train_gpt.export_artifact(Matrices(), SETTINGS, -10**9, print)


def export_under_cap(monkeypatch, cap: int) -> tuple[bytes, list[str]]:
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", cap)
    lines = []
    blob = train_gpt.export_artifact(Matrices(), SETTINGS, 0, lines.append)
    return blob, [line for line in lines if line.startswith("export_fit:")]  # not the stages' progress and times


def codes(blob: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(lzma.decompress(blob)))["int8"]


def changed(a: dict, b: dict) -> int:
    return sum(int((a[name] != b[name]).sum()) for name in a)


def test_a_cap_a_little_below_the_artifact_is_met_by_pruning_few_codes(monkeypatch, unfitted):
    cap = len(unfitted) - 500
    fitted, lines = export_under_cap(monkeypatch, cap)
    assert len(fitted) <= cap
    assert len(lines) == 1 and lines[0].startswith("export_fit: pruned "), lines
    pruned = int(lines[0].split()[2])
    model = Matrices()
    stepped = train_gpt.quantize_state_dict(model.state_dict(), set(), *train_gpt.FIT_CAP_STEPS[0])["int8"]
    assert changed(codes(unfitted), codes(fitted)) == pruned
    assert 10 * pruned < changed(codes(unfitted), stepped)


def test_pruning_only_zeroes_plus_minus_one_codes(monkeypatch, unfitted):
    before, after = codes(unfitted), codes(export_under_cap(monkeypatch, len(unfitted) - 500)[0])
    for name in before:
        moved = before[name] != after[name]
        assert moved.any() and (before[name][moved].abs() == 1).all() and (after[name][moved] == 0).all()


def test_an_excess_past_the_pruning_limit_steps_bits_down(monkeypatch, unfitted):
    _, lines = export_under_cap(monkeypatch, int(0.8 * len(unfitted)))
    assert "now int6 matrices, int5 MLP matrices" in lines[0]


def int7_embedding_state(with_mlp: bool) -> dict[str, torch.Tensor]:
    """A 320 x 256 embedding (the tied head; int7 as the 1.0714 record exports it), and an MLP matrix."""
    torch.manual_seed(1)
    shapes = {"tok_emb.weight": (320, 256), **({"blocks.0.mlp.fc.weight": (320, 256)} if with_mlp else {})}
    return {name: torch.randn(shape) * 0.02 * (0.5 + torch.rand(shape[0], 1)) for name, shape in shapes.items()}


INT7_EMBEDDING = dataclasses.replace(SETTINGS, export_embed_bits=7, gptq_embed_clip_sigmas=15.0)


def test_step_down_keeps_the_int7_embedding_as_it_is(monkeypatch):
    """Fewer bits for the matrices, never for the embedding: its int7 codes are those of the export with no cap."""
    state = int7_embedding_state(with_mlp=True)
    model = SimpleNamespace(state_dict=lambda: state)
    unfitted = torch.load(io.BytesIO(lzma.decompress(train_gpt.export_artifact(model, INT7_EMBEDDING, -10**9, print))))
    emb = state["tok_emb.weight"]
    assert torch.equal(unfitted["scales"]["tok_emb.weight"], (15 * emb.std(1) / 63).half())  # int7 at 15 row stds
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", 1)  # every plan overflows: the last one is taken
    lines = []
    stepped = codes(train_gpt.export_artifact(model, INT7_EMBEDDING, 0, lines.append))
    fit_lines = [line for line in lines if line.startswith("export_fit:")]  # not the progress and stage lines
    assert len(fit_lines) == len(train_gpt.FIT_CAP_STEPS) and stepped["blocks.0.mlp.fc.weight"].abs().max() <= 7
    assert torch.equal(stepped["tok_emb.weight"], unfitted["int8"]["tok_emb.weight"])


def test_pruning_zeroes_only_plus_minus_one_codes_of_an_int7_embedding(monkeypatch):
    state = int7_embedding_state(with_mlp=False)
    model = SimpleNamespace(state_dict=lambda: state)
    unfitted = train_gpt.export_artifact(model, INT7_EMBEDDING, -10**9, print)
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", len(unfitted) - 300)
    lines = []
    before, after = codes(unfitted), codes(train_gpt.export_artifact(model, INT7_EMBEDDING, 0, lines.append))
    moved = before["tok_emb.weight"] != after["tok_emb.weight"]
    assert [line for line in lines if line.startswith("export_fit:")][0].startswith(
        f"export_fit: pruned {int(moved.sum())} of ")
    assert moved.any() and (before["tok_emb.weight"][moved].abs() == 1).all()
    assert (after["tok_emb.weight"][moved] == 0).all()
