"""Model FLOPs per trained token of train_gpt.GPT, and the peak FLOP/s that turn speed into MFU.

For L blocks of width d (= NUM_HEADS x head_dim), sequence length T, and N_matmul the parameters that
take part in a matrix multiply for every token:

    flops_per_token = 6 * N_matmul + 6 * L * T * d

L counts block passes: NUM_LAYERS, plus NUM_LOOPS x the RECUR_LAYERS blocks once depth recurrence is on (they
run again with the same weights, so their matrices count 1 + NUM_LOOPS times in N_matmul as well).

Matrix multiplies, 6 * N_matmul. A weight of m x n entries costs 2*m*n FLOPs per token forward (one
multiply and one add per entry) and 4*m*n backward (the gradient of the input and of the weight),
so 6 FLOPs per parameter. N_matmul is, per block, c_q (d x d), c_k and c_v (d x kv each, kv =
NUM_KV_HEADS x head_dim), proj (d x d), mlp.fc and mlp.proj (d x MLP_MULT*d each), plus the output
head (VOCAB_SIZE x d). The embedding lookup is a gather, not a matmul: with tied embeddings the head
matmul uses the embedding matrix and counts once; untied, the embedding does not count. The gates are
matmuls too, small ones: GATE_ATTN_OUT's per block (its first 12 input channels -> one gate per head) and
SMEAR_GATE's once (12 -> 1), 17 x 96 + 12 = 1,644 parameters of the default's 17 block passes. The two residual
lanes of PARALLEL_START_LAYER add none: they mix the same attention and MLP outputs element-wise.

Causal attention, 6 * L * T * d. Per layer and per token, each query head (head_dim wide) takes a dot
product with T keys (QK^T: 2 * T * head_dim) and a weighted sum of T values (AV: 2 * T * head_dim);
over all heads that is 4 * T * d forward with full attention. Causal attention sees on average
(T + 1) / 2 ~ T / 2 keys, halving it to 2 * T * d; backward costs twice forward (both operands of each
product get a gradient), so forward + backward is 3 * 2 * T * d = 6 * T * d. With PACK_DOCUMENTS=1 a token
attends only within its document (cut every T tokens): 6 * T * d is then the count for documents of T tokens
or more, an upper bound for shorter ones. Grouped-query attention
shares K and V between heads, but every query head still does its own products, so the width here is
d, not the KV width. (nanoGPT's estimate_mfu and PaLM count 12 * L * T * d, without the causal half:
the same speed reads as a higher MFU there.)

Not counted, as is the convention for MFU: element-wise work (norms, rotary, relu^2, softcap, softmax,
cross-entropy), FlashAttention's backward recomputation, and the optimizer (Muon's Newton-Schulz is
per step, not per token: about 0.3% of the baseline's model FLOPs at 524,288 tokens per step).
"""
from __future__ import annotations

import re

from train_gpt import GATE_INPUTS

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor data sheets), keyed by a pattern on the
# lower-cased torch.cuda.get_device_name(). The H100 SXM reports itself as "NVIDIA H100 80GB HBM3".
PEAK_BF16_DENSE_TFLOPS = (
    ("H100 SXM", r"h100.*(hbm3|sxm)", 989.4),
    ("H100 PCIe", r"h100.*pcie", 756.0),
    ("H200", r"h200", 989.4),
    ("A100", r"a100", 312.0),
)


def block_passes(settings, recurrence: bool = False) -> int:
    """Blocks run per token: every block once, the RECUR_LAYERS blocks 1 + NUM_LOOPS times while recurrence is on."""
    return settings.num_layers + (settings.num_loops * len(settings.recur_layer_ids) if recurrence else 0)


def matmul_params(settings, recurrence: bool = False) -> int:
    """N_matmul: the parameters that a matrix multiply uses for every token (the head included)."""
    s = settings
    head_dim = s.model_dim // s.num_heads
    kv_dim = s.num_kv_heads * head_dim
    attention = s.model_dim * s.model_dim + 2 * s.model_dim * kv_dim + s.model_dim * s.model_dim
    mlp = 2 * s.model_dim * (s.mlp_mult * s.model_dim)
    attention_gate = GATE_INPUTS * s.num_heads if s.gate_attn_out else 0
    smear_gate = GATE_INPUTS if s.smear_gate else 0
    return block_passes(s, recurrence) * (attention + mlp + attention_gate) + smear_gate + s.vocab_size * s.model_dim


def attention_flops_per_token(settings, recurrence: bool = False) -> int:
    """Causal QK^T and AV, forward + backward: 6 * L * T * d."""
    s = settings
    return 6 * block_passes(s, recurrence) * s.train_seq_len * s.model_dim


def flops_per_token(settings, recurrence: bool = False) -> int:
    """Model FLOPs of one trained token, forward + backward: 6 * N_matmul + 6 * L * T * d."""
    return 6 * matmul_params(settings, recurrence) + attention_flops_per_token(settings, recurrence)


def peak_tflops(device_type: str, device_name: str, override: float = 0.0) -> tuple[float | None, str | None]:
    """(peak TFLOP/s of one device, where that number came from); (None, None) when unknown.
    A positive `override` (BENCH_PEAK_TFLOPS) wins; CPUs and MPS have no table entry."""
    if override > 0:
        return override, "BENCH_PEAK_TFLOPS"
    name = device_name.lower()
    if device_type != "cuda" or "nvl" in name:  # NVL parts run lower clocks than their SXM siblings
        return None, None
    for label, pattern, tflops in PEAK_BF16_DENSE_TFLOPS:
        if re.search(pattern, name):
            return tflops, f"table:{label}"
    return None, None


def model_flops_utilisation(flops_per_token: int, tokens_per_s_per_device: float,
                            peak_tflops_per_device: float | None) -> float | None:
    """Achieved model FLOP/s of one device as a fraction of its peak; None without a peak."""
    if not peak_tflops_per_device:
        return None
    return flops_per_token * tokens_per_s_per_device / (peak_tflops_per_device * 1e12)
