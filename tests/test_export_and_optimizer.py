"""int8+zlib export round trip, and the Muon orthogonalisation."""
from __future__ import annotations

import torch

import train_gpt
from train_gpt import Settings


def test_int8_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.linspace(0.001, 0.2, 64)[:, None]
    q, scale = train_gpt.quantize_int8(w)
    restored = train_gpt.dequantize_int8(q, scale)
    clip = torch.quantile(w.abs(), train_gpt.INT8_CLIP_QUANTILE, dim=1, keepdim=True)
    inside = w.abs() <= clip
    error = (restored - w).abs()
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert torch.all(error[inside] <= scale.float()[:, None].expand_as(w)[inside] / 2 + 1e-7)
    assert torch.all(error[~inside] <= (w.abs() - clip).expand_as(w)[~inside] + scale.float()[:, None].expand_as(w)[~inside])


def test_all_zero_matrix_round_trips_exactly():
    q, scale = train_gpt.quantize_int8(torch.zeros(4, 8))
    assert torch.equal(train_gpt.dequantize_int8(q, scale), torch.zeros(4, 8))


def test_model_round_trip_keeps_names_dtypes_and_control_tensors():
    torch.manual_seed(0)
    model = train_gpt.GPT(Settings(vocab_size=512, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2))
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    state = model.state_dict()
    packed = train_gpt.quantize_state_dict(state, model.control_tensor_names())
    restored = train_gpt.decompress_model(train_gpt.compress_packed(packed))
    assert restored.keys() == state.keys()
    for name, t in state.items():
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape
        if name in model.control_tensor_names():
            assert torch.equal(restored[name], t), name  # gains and mixes are kept exactly
        else:
            assert (restored[name] - t).abs().max() <= t.abs().max() / 127, name


def test_newton_schulz_gives_roughly_orthogonal_updates():
    torch.manual_seed(0)
    for shape in [(64, 128), (128, 64)]:
        g = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 0, shape[1]))
        singular_values = torch.linalg.svdvals(train_gpt.newton_schulz_orthogonalize(g, steps=5))
        assert singular_values.min() > 0.5 and singular_values.max() < 1.3
