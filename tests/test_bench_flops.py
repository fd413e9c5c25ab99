"""bench/flops.py: the FLOP count behind MFU, checked against numbers worked out by hand."""
from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from bench.flops import (attention_flops_per_token, flops_per_token, matmul_params, model_flops_utilisation,
                         peak_tflops)
from train_gpt import GPT, Settings

BASELINE = Settings.for_preset("baseline")  # SPEC.md: 9 x 512, 8 heads, 4 KV heads, MLP 2x, vocab 1024, seq 1024, tied
# An 11 x 512 model with MLP 3x, vocab 8192, seq 2048 and an untied head.
WIDE_UNTIED = Settings.for_preset("baseline", num_layers=11, mlp_mult=3, vocab_size=8192, train_seq_len=2048,
                                  tie_embeddings=0)


def test_matmul_params_of_the_baseline():
    # Per block: c_q, proj 512x512; c_k, c_v 512x256 (4 KV heads x 64); fc, proj 512x1024.
    block = 512 * 512 * 2 + 512 * 256 * 2 + 512 * 1024 * 2  # 524,288 + 262,144 + 1,048,576 = 1,835,008
    assert block == 1_835_008
    assert matmul_params(BASELINE) == 9 * 1_835_008 + 1024 * 512 == 17_039_360


def test_flops_per_token_of_the_baseline():
    # 6 x 17,039,360 = 102,236,160 (matmuls) + 6 x 9 x 1024 x 512 = 28,311,552 (causal attention).
    assert attention_flops_per_token(BASELINE) == 28_311_552
    assert flops_per_token(BASELINE) == 102_236_160 + 28_311_552 == 130_547_712


def test_flops_per_token_of_a_wide_untied_model():
    # Per block: c_q, proj 512x512 = 262,144 each; c_k, c_v 512x256 = 131,072 each; fc, proj 512x1536 =
    # 786,432 each: 2,359,296. 11 blocks: 25,952,256; head 8192 x 512 = 4,194,304 (the untied embedding
    # is a lookup and does not count): 30,146,560. Attention: 6 x 11 x 2048 x 512 = 69,206,016.
    assert matmul_params(WIDE_UNTIED) == 30_146_560
    assert attention_flops_per_token(WIDE_UNTIED) == 69_206_016
    assert flops_per_token(WIDE_UNTIED) == 6 * 30_146_560 + 69_206_016 == 250_085_376


def test_attention_flops_scale_linearly_with_seq_len_and_matmuls_do_not_change():
    at = {t: dataclasses.replace(BASELINE, train_seq_len=t) for t in (256, 512, 1024, 4096)}
    for t, s in at.items():
        assert attention_flops_per_token(s) == attention_flops_per_token(at[256]) * t // 256
        assert matmul_params(s) == matmul_params(BASELINE)


def test_attention_flops_count_query_heads_not_kv_heads():
    # Grouped-query attention shares K and V, but every query head does its own QK^T and AV.
    mha = dataclasses.replace(BASELINE, num_kv_heads=8)
    assert attention_flops_per_token(mha) == attention_flops_per_token(BASELINE)
    assert matmul_params(mha) - matmul_params(BASELINE) == 9 * 2 * 512 * 256  # wider c_k and c_v


def test_matmul_params_plus_control_tensors_are_all_of_the_tied_models_parameters():
    model = GPT(BASELINE)
    # Control tensors by hand: per block attn_scale 512 + mlp_scale 512 + resid_mix 2 x 512 + q_gain 8
    # = 2,056, x 9 = 18,504; skip_weights 4 x 512 = 2,048. SPEC.md's total: 17,059,912.
    control = sum(p.numel() for n, p in model.named_parameters() if n in model.control_tensor_names())
    assert control == 9 * (512 + 512 + 2 * 512 + 8) + 4 * 512 == 20_552
    assert matmul_params(BASELINE) + 20_552 == sum(p.numel() for p in model.parameters()) == 17_059_912


def test_an_untied_models_embedding_is_the_only_parameter_outside_matmuls_and_controls():
    small = Settings.for_preset("1.0810", num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3, vocab_size=300,
                                tie_embeddings=0, recur_layers="")
    model = GPT(small)
    # Matmuls: 3 x (64x64 x 2 + 64x32 x 2 + 64x192 x 2) + head 300 x 64 = 3 x 36,864 + 19,200 = 129,792.
    assert matmul_params(small) == 129_792
    control = 3 * (64 + 64 + 2 * 64 + 4) + 1 * 64 + 1 * 64  # 3 blocks of scales and gains; 1 skip weight and gate row
    embedding = 300 * 64
    assert sum(p.numel() for p in model.parameters()) == 129_792 + control + embedding


def test_mfu_of_the_reference_run():
    # SPEC.md: 524,288 tokens per step in 43.54 ms on 8 x H100 SXM. Per device 65,536 / 0.04354 s =
    # 1.50519e6 tokens/s; x 130,547,712 FLOPs = 1.96499e14 FLOP/s; / 989.4e12 = 0.19860.
    mfu = model_flops_utilisation(130_547_712, 65_536 / 0.04354, 989.4)
    assert mfu == pytest.approx(0.19860, abs=1e-5)


def test_mfu_is_none_without_a_peak():
    assert model_flops_utilisation(130_547_712, 1e6, None) is None


@pytest.mark.parametrize("device_type, name, expected", [
    ("cuda", "NVIDIA H100 80GB HBM3", 989.4),
    ("cuda", "NVIDIA H100 PCIe", 756.0),
    ("cuda", "NVIDIA H200", 989.4),
    ("cuda", "NVIDIA A100-SXM4-80GB", 312.0),
    ("cuda", "NVIDIA A100-PCIE-40GB", 312.0),
    ("cuda", "NVIDIA H100 NVL", None),  # lower clocks than the SXM part: not guessed
    ("cuda", "NVIDIA GeForce RTX 4090", None),
    ("cpu", "AMD EPYC", None),
    ("mps", "arm", None),
])
def test_peak_tflops_by_device_name(device_type, name, expected):
    assert peak_tflops(device_type, name)[0] == expected


def test_bench_peak_tflops_overrides_the_table_and_serves_cpus():
    assert peak_tflops("cuda", "NVIDIA H100 80GB HBM3", 500.0) == (500.0, "BENCH_PEAK_TFLOPS")
    assert peak_tflops("cpu", "AMD EPYC", 2.5) == (2.5, "BENCH_PEAK_TFLOPS")


def test_depth_recurrence_counts_the_rerun_blocks_each_time_they_run():
    strong = Settings()  # 11 x 512, MLP 4x, seq 2048, vocab 8192, RECUR_LAYERS=3,4,5 run 1 + NUM_LOOPS=2 times
    block = 512 * 512 * 2 + 512 * 256 * 2 + 512 * 2048 * 2 + 12 * 8  # 2,883,584 + the attention output gate
    assert matmul_params(strong) == 11 * block + 12 + 8192 * 512  # + SmearGate's 12 -> 1
    assert matmul_params(strong, recurrence=True) == 17 * block + 12 + 8192 * 512  # the record's 17 virtual layers
    assert attention_flops_per_token(strong, recurrence=True) == 6 * 17 * 2048 * 512


def test_the_defaults_gates_are_matmuls_and_its_two_lanes_add_none():
    strong = Settings()  # GATE_ATTN_OUT=1: 12 channels -> 8 heads per block; SMEAR_GATE=1: 12 -> 1 once
    plain = 11 * (512 * 512 * 2 + 512 * 256 * 2 + 512 * 2048 * 2) + 8192 * 512  # 31,719,424 + 4,194,304
    assert matmul_params(dataclasses.replace(strong, gate_attn_out=0, smear_gate=0)) == plain == 35_913_728
    assert matmul_params(strong) == plain + 11 * 96 + 12 == 35_914_796
    assert matmul_params(dataclasses.replace(strong, parallel_start_layer=0)) == matmul_params(strong)


def test_matmul_params_are_every_weight_the_default_models_matmuls_use():
    """A small model of the default's structure (gates, SmearGate, two lanes from its last block, depth recurrence):
    its linear layers, SmearGate's weight and the tied embedding, counted from the model itself."""
    small = Settings.for_preset("strong", num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2,
                                vocab_size=300, recur_layers="1", parallel_start_layer=2, xsa_last_n=3)
    model = GPT(small)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert model.parallel_post_lambdas is not None and model.smear_gate is not None
    assert matmul_params(small) == linear + model.smear_gate.numel() + model.tok_emb.weight.numel()
