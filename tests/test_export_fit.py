"""EXPORT_FIT_CAP: an artifact a few KB over the cap fits by zeroing a few +-1 codes (prune_to_fit), far fewer
changed weights than the bit step-down (FIT_CAP_STEPS) changes."""
from __future__ import annotations

import dataclasses

import torch

import train_gpt
from train_gpt import Settings

MODEL = dict(num_layers=2, model_dim=384, num_heads=4, num_kv_heads=2, mlp_mult=2, vocab_size=512, recur_layers="",
             device="cpu", xsa_last_n=0, parallel_last_n=0, export_format="int6+lzma",
             export_quant="rtn")


def gaussian_rows_model(settings: Settings) -> train_gpt.GPT:
    model = train_gpt.GPT(settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape) * 0.02 * (0.5 + torch.rand(p.shape[0], 1)))
    return model


def changed_weights(blob_a: bytes, blob_b: bytes) -> int:
    a, b = train_gpt.decompress_model(blob_a), train_gpt.decompress_model(blob_b)
    return sum(int((a[name] != b[name]).sum()) for name in a)


def test_a_cap_a_few_kb_below_the_artifact_is_met_by_pruning_few_codes(monkeypatch):
    settings = Settings.for_preset("strong", **MODEL, export_fit_cap=0)
    model = gaussian_rows_model(settings)
    unfitted = train_gpt.export_artifact(model, settings, 0, print)
    cap = len(unfitted) - 3000
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", cap)
    lines = []
    fitted = train_gpt.export_artifact(model, dataclasses.replace(settings, export_fit_cap=1), 0, lines.append)
    assert len(fitted) <= cap
    assert len(lines) == 1 and lines[0].startswith("export_fit: pruned "), lines
    pruned = int(lines[0].split()[2])
    stepped = train_gpt.compress_packed(train_gpt.quantize_state_dict(
        model.state_dict(), model.control_tensor_names(), *train_gpt.FIT_CAP_STEPS[0]),
        settings.export_format)
    assert changed_weights(unfitted, fitted) == pruned
    assert 10 * pruned < changed_weights(unfitted, stepped)


def test_pruning_only_zeroes_plus_minus_one_codes(monkeypatch):
    settings = Settings.for_preset("strong", **MODEL, export_fit_cap=0)
    model = gaussian_rows_model(settings)
    unfitted = train_gpt.export_artifact(model, settings, 0, print)
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", len(unfitted) - 2000)
    fitted = train_gpt.export_artifact(model, dataclasses.replace(settings, export_fit_cap=1), 0, print)
    before, after = (train_gpt.torch.load(__import__("io").BytesIO(__import__("lzma").decompress(b)))["int8"]
                     for b in (unfitted, fitted))
    for name in before:
        changed = before[name] != after[name]
        assert (before[name][changed].abs() == 1).all() and (after[name][changed] == 0).all()


def test_an_excess_past_the_pruning_limit_steps_bits_down(monkeypatch):
    settings = Settings.for_preset("strong", **MODEL, export_fit_cap=0)
    model = gaussian_rows_model(settings)
    unfitted = train_gpt.export_artifact(model, settings, 0, print)
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", int(0.8 * len(unfitted)))
    lines = []
    train_gpt.export_artifact(model, dataclasses.replace(settings, export_fit_cap=1), 0, lines.append)
    assert "now int6 matrices, int5 MLP matrices" in lines[0]
