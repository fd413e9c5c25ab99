"""Attention on packed rows of documents, and the attention kernel: document_cu_seqlens cuts a row as the 1.0714
record's loader does; every path of `attention` (FA3's varlen call, per-segment SDPA, the compiled paths' masks) lets
each segment attend causally within itself only; ATTENTION=fa3 calls FlashAttention 3 with the record's layout."""
from __future__ import annotations

import sys

import pytest
import torch

import train_gpt
from reference_record import FLASH_STANDIN, load_record
from train_gpt import Settings, SettingsError

BOS = train_gpt.BOS_ID
SMALL = dict(vocab_size=96, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, recur_layers="1,2",
             rope_dims=8, train_seq_len=32)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_record(tmp_path_factory.mktemp("record_1_0714"), {"VOCAB_SIZE": "96"}, record="1.0714")


@pytest.fixture
def fa3_stand_in(tmp_path, monkeypatch):
    """The tests' FlashAttention 3 (SDPA in FA3's layout) importable as flash_attn_interface, each call's arguments
    noted; the kit finds it as it finds the real one."""
    (tmp_path / "flash_attn_interface.py").write_text(FLASH_STANDIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(train_gpt, "FLASH_ATTENTION_3", None)
    calls = []
    try:
        assert train_gpt.pick_attention("fa3", "cpu") == "fa3"
        module = train_gpt.FLASH_ATTENTION_3
        for name in ("flash_attn_func", "flash_attn_varlen_func"):
            def noted(*args, _original=getattr(module, name), _name=name, **kwargs):
                calls.append((_name, args, kwargs))
                return _original(*args, **kwargs)
            monkeypatch.setattr(module, name, noted)
        yield calls
    finally:
        sys.modules.pop("flash_attn_interface", None)


def row(length: int, bos_at: list[int], seed: int = 0) -> torch.Tensor:
    ids = torch.randint(2, 96, (length,), generator=torch.Generator().manual_seed(seed))
    ids[bos_at] = BOS
    return ids


def within_segments(q, k, v, cu_seqlens) -> torch.Tensor:
    """The definition, in fp64: softmax(q k^T / sqrt(d)) v over the earlier tokens of the same segment (GQA: query
    head h reads KV head h // group); layout (1, seq, heads, dim)."""
    q, k, v = (t[0].double() for t in (q, k, v))
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    segment = torch.zeros(q.size(0), dtype=torch.long)
    for start in cu_seqlens.tolist()[1:-1]:
        segment[start:] += 1
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(q.size(0), q.size(0), dtype=torch.bool).tril()
    scores = torch.einsum("thd,shd->hts", q, k) / q.size(-1) ** 0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", weights, v)[None]


def test_cu_seqlens_cut_at_the_row_start_every_bos_and_every_max_len_tokens_of_a_document():
    cu_seqlens, longest = train_gpt.document_cu_seqlens(row(100, [5, 40, 41]), max_len=16)
    # 0..5 (before the first BOS), 5..40 cut at 21 and 37, 40..41, 41..100 cut at 57, 73, 89; then 100s to 64 entries
    bounds = [0, 5, 21, 37, 40, 41, 57, 73, 89, 100]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == bounds + [100] * (64 - len(bounds))
    assert longest == 16
    assert train_gpt.document_cu_seqlens(row(10, [0]), 16)[0].tolist()[:3] == [0, 10, 10]  # no empty first segment


@pytest.mark.parametrize("seed", range(4))
def test_cu_seqlens_equal_the_records(record, seed):
    """Rows with few or many documents (more than 64 segments: a second bucket), BOS first or not, long documents."""
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(50, 3000, (1,), generator=g))
    ids = row(length, torch.randperm(length, generator=g)[:int(torch.randint(0, 90, (1,), generator=g))].tolist(), seed)
    bos = (ids == BOS).nonzero().flatten().tolist()
    assert [t.tolist() if torch.is_tensor(t) else t for t in train_gpt.document_cu_seqlens(ids, 32)] == \
        [t.tolist() if torch.is_tensor(t) else t for t in record._build_cu_seqlens(bos, length, ids.device, 32, 64)]


@pytest.mark.parametrize("path", ["segments", "dense_mask", "flex", "fa3_varlen"])
def test_every_attention_path_attends_causally_within_each_segment(path, fa3_stand_in):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 90, 4, 16), torch.randn(1, 90, 2, 16), torch.randn(1, 90, 2, 16)
    cu_seqlens, longest = train_gpt.document_cu_seqlens(row(90, [7, 30, 31, 60]), max_len=20)
    if path in ("segments", "fa3_varlen"):  # the uncompiled SDPA path; FlashAttention 3's varlen call
        y = train_gpt.attention(q, k, v, "sdpa" if path == "segments" else "fa3", cu_seqlens, longest)
    else:  # what the compiled model runs: a dense mask (CPU), FlexAttention (CUDA; here its forward on the CPU)
        with torch.no_grad():
            y = train_gpt.document_masked_attention(*(t.transpose(1, 2) for t in (q, k, v)), cu_seqlens, True,
                                                    flex=path == "flex").transpose(1, 2)
    assert y.shape == q.shape and torch.allclose(y.double(), within_segments(q, k, v, cu_seqlens), atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_fa3_kernel_gets_the_records_layout_and_gives_sdpas_logits(fa3_stand_in, packed):
    """ATTENTION=fa3: flash_attn_func on (batch, seq, heads, dim), or flash_attn_varlen_func on the packed row's
    (tokens, heads, dim) with its int32 cu_seqlens: the same logits as SDPA up to fp32 rounding."""
    settings = Settings(**SMALL)
    torch.manual_seed(0)
    sdpa = train_gpt.GPT(settings)
    with torch.no_grad():
        for p in sdpa.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fa3 = train_gpt.GPT(settings, attention_kernel="fa3")
    fa3.load_state_dict(sdpa.state_dict())
    sdpa.recurrence_active = fa3.recurrence_active = True
    ids = row(64, [20, 45])[None] if packed else torch.randint(0, 96, (2, 32))
    segments = train_gpt.document_cu_seqlens(ids[0], 32) if packed else (None, 0)
    with torch.no_grad():
        expected = sdpa.logits(ids, *segments)
        assert torch.allclose(fa3.logits(ids, *segments), expected, atol=1e-5 * expected.abs().max().item())
    name = "flash_attn_varlen_func" if packed else "flash_attn_func"
    calls = [call for call in fa3_stand_in if call[0] == name]  # (the stand-in's varlen calls its dense function)
    assert len(calls) == 8  # one a block pass: blocks 0, 1, 2, 1, 2, 1, 2, 3 (looped)
    name, args, kwargs = calls[0]
    if packed:
        assert [tuple(t.shape) for t in args] == [(64, 4, 16), (64, 2, 16), (64, 2, 16)]
        assert kwargs["cu_seqlens_q"] is kwargs["cu_seqlens_k"] is segments[0]
        assert kwargs["max_seqlen_q"] == kwargs["max_seqlen_k"] == 25 and kwargs["causal"]  # the longest: 20..45
    else:
        assert [tuple(t.shape) for t in args] == [(2, 32, 4, 16), (2, 32, 2, 16),
                                                                              (2, 32, 2, 16)]
        assert kwargs == {"causal": True}


def test_attention_setting_takes_fa3_only_where_installed(monkeypatch):
    monkeypatch.setattr(train_gpt, "FLASH_ATTENTION_3", None)
    monkeypatch.setattr(train_gpt, "find_flash_attention_3", lambda: None)  # neither the wheel nor `kernels`
    assert train_gpt.pick_attention("auto", "cpu") == train_gpt.pick_attention("auto", "cuda") == "sdpa"
    with pytest.raises(SettingsError, match="^ATTENTION=fa3 .*pip install kernels"):
        train_gpt.pick_attention("fa3", "cuda")
    monkeypatch.setattr(train_gpt, "find_flash_attention_3", lambda: object())
    assert train_gpt.pick_attention("auto", "cuda") == train_gpt.pick_attention("fa3", "cpu") == "fa3"
    assert train_gpt.pick_attention("sdpa", "cuda") == train_gpt.pick_attention("auto", "mps") == "sdpa"
    assert train_gpt.setup_runtime(Settings(device="cpu")).attention == "sdpa"


def test_run_header_names_the_kernel_and_on_cuda_what_missing_fa3_costs(monkeypatch):
    class Lines(list):  # a RunLog's call and path
        path = "logs/run.txt"

        def __call__(self, line, console=True, source=False):
            self.append(line)

    lines = log = Lines()
    cpu = train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.float32, False, attention="sdpa")
    train_gpt.log_run_header(log, Settings(), cpu, b"# code\n")
    assert " attention:sdpa " in next(line for line in lines if line.startswith("device:"))
    assert not any("FlashAttention 3" in line for line in lines)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "H100")
    lines.clear()
    cuda = train_gpt.Runtime(torch.device("cuda", 0), 0, 1, 0, 1, torch.bfloat16, True, attention="sdpa")
    train_gpt.log_run_header(log, Settings(), cuda, b"# code\n")
    assert any("not the records' FlashAttention 3" in line and "estimate" in line and "pip install kernels" in line
               for line in lines)


@pytest.mark.parametrize("packed", [False, True])
def test_model_traces_as_one_graph_on_packed_rows_and_with_adapters(packed):
    """fullgraph (a graph break is an error), as the trainer compiles: the traced forward (the dense-mask path on a
    CPU) and its gradients equal the uncompiled model's (per-segment SDPA); with TTT's adapters on dense rows."""
    torch._dynamo.reset()
    settings = Settings(**{**SMALL, "parallel_start_layer": 3})
    torch.manual_seed(0)
    model = train_gpt.GPT(settings)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.recurrence_active = True
    ids = row(65, [20, 45])[None] if packed else torch.randint(0, 96, (2, 33))
    if packed:
        extra = dict(zip(("cu_seqlens", "max_seqlen"), train_gpt.document_cu_seqlens(ids[0, :-1], 32)))
    else:
        extra = dict(lora=train_gpt.BatchedTTTLoRA(2, model, 4))
        with torch.no_grad():
            for p in extra["lora"].parameters():
                p.add_(0.1 * torch.randn_like(p))  # B non-zero: every adapter counts
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    losses = []
    for forward in (model, compiled):
        model.zero_grad()
        loss = forward(ids[:, :-1], ids[:, 1:], **extra)
        loss.sum().backward()
        losses.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(losses[1][0], losses[0][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(losses[1][1], losses[0][1]))
    torch._dynamo.reset()
