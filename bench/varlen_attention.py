"""Times the exact ways train_gpt.py can attend within the documents of a packed row without FlashAttention 3, on
this machine (meant for the CPU): per-segment SDPA (what an uncompiled model runs), SDPA with a dense document mask
(what a compiled model runs off CUDA) and FlexAttention with a document mask (what a compiled model runs on CUDA;
on a CPU it has no backward, so only its forward is timed). Prints one line per way: ms forward, ms forward and
backward, compile seconds, and the largest difference from per-segment SDPA.

    python3 bench/varlen_attention.py                        # a row of 8192 tokens, documents of ~800 tokens
    ROW_TOKENS=2048 DOC_TOKENS=400 REPEATS=5 python3 bench/varlen_attention.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def packed_row(tokens: int, mean_doc: int, seed: int = 0) -> torch.Tensor:
    """Token ids with a BOS starting documents of exponentially distributed lengths (mean `mean_doc`)."""
    g = torch.Generator().manual_seed(seed)
    ids, start = torch.full((tokens,), 2), 0
    while start < tokens:
        ids[start] = train_gpt.BOS_ID
        start += 1 + int(torch.empty(1).exponential_(1 / mean_doc, generator=g))
    return ids


def timed(fn, q, k, v, repeats: int, backward: bool) -> float:
    """Median milliseconds of fn(q, k, v) (and its backward), after one untimed call."""
    times = []
    for _ in range(repeats + 1):
        q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            y = fn(q, k, v)
            if backward:
                y.sum().backward()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    tokens, mean_doc = int(os.environ.get("ROW_TOKENS", 8192)), int(os.environ.get("DOC_TOKENS", 800))
    repeats, heads, kv_heads, dim = int(os.environ.get("REPEATS", 3)), 8, 4, 64  # the records' attention shape
    cu_seqlens, longest = train_gpt.document_cu_seqlens(packed_row(tokens, mean_doc), max_len=2048)
    segments = int((cu_seqlens.diff() > 0).sum())
    torch.manual_seed(0)
    q, k, v = torch.randn(1, heads, tokens, dim), torch.randn(1, kv_heads, tokens, dim), torch.randn(1, kv_heads,
                                                                                                     tokens, dim)
    ways = {"per-segment SDPA": lambda q, k, v: train_gpt.segment_attention(q, k, v, cu_seqlens, True),
            "dense-mask SDPA": lambda q, k, v: train_gpt.document_masked_attention(q, k, v, cu_seqlens, True, False),
            "FlexAttention": lambda q, k, v: train_gpt.document_masked_attention(q, k, v, cu_seqlens, True, True)}
    print(f"row of {tokens} tokens, {segments} segments (longest {longest}), {heads} heads / {kv_heads} KV heads "
          f"of {dim}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.no_grad():
        reference = ways["per-segment SDPA"](q, k, v)
    for name, fn in ways.items():
        for compiled in (False, True) if name != "per-segment SDPA" else (False,):
            torch._dynamo.reset()
            call = torch.compile(fn, fullgraph=True) if compiled else fn
            start = time.perf_counter()
            with torch.no_grad():
                difference = (call(q, k, v) - reference).abs().max().item()
            compile_s = time.perf_counter() - start if compiled else 0.0
            forward = timed(call, q, k, v, repeats, backward=False)
            both = "n/a (no CPU backward)" if name == "FlexAttention" and q.device.type == "cpu" else \
                f"{timed(call, q, k, v, repeats, backward=True):.1f} ms"
            print(f"{name + (' compiled' if compiled else ''):28s} forward {forward:8.1f} ms   forward+backward "
                  f"{both:>22s}   compile {compile_s:5.1f} s   max |difference| {difference:.2g}")


if __name__ == "__main__":
    main()
