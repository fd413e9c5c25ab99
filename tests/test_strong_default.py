"""The techniques of the 1.0810 record's recipe (PRESET=1.0810, tiny), each by its defining property, and the
presets."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import REPO, score_lines, script_at_commit, trainer_env
from train_gpt import Settings

ORIGINAL_COMMIT = "20b470574e63b5fb92cf16ab85392385c01699ad"  # train_gpt.py before the strong default


def tiny(preset: str = "1.0810", **overrides) -> Settings:
    return Settings.for_preset(preset, **{**dict(vocab_size=96, num_layers=4, model_dim=64, num_heads=4,
                                                 num_kv_heads=2, recur_layers="1,2"), **overrides})


def perturbed_model(settings: Settings, seed: int = 0, scale: float = 0.1) -> train_gpt.GPT:
    """A model whose zero-initialised projections are not zero, so every path contributes."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(settings)
    for p in model.parameters():
        p.data.add_(scale * torch.randn_like(p))
    return model


# ---- presets ---------------------------------------------------------------------------------------


def test_baseline_preset_restores_the_naive_baseline_with_every_technique_off():
    s = Settings.from_env({"PRESET": "baseline"})
    assert sum(p.numel() for p in train_gpt.GPT(s).parameters()) == 17_059_912  # SPEC.md
    assert (s.preset, s.num_layers, s.mlp_mult, s.train_seq_len, s.train_batch_tokens, s.qk_gain_init) == \
        ("baseline", 9, 2, 1024, 524_288, 1.5)
    assert (s.matrix_lr, s.scalar_lr, s.tied_embed_lr, s.muon_momentum, s.muon_momentum_warmup_start) == \
        (0.04, 0.04, 0.05, 0.95, 0.85)
    assert (s.warmdown_iters, s.muon_momentum_warmup_steps, s.grad_clip_norm, s.muon_ns_coeffs) == \
        (1200, 500, 0, "fixed")
    assert (s.export_format, s.eval_stride) == ("int8+zlib", 0)
    off = dict(warmdown_frac=0, mlp_leaky_slope=0, muon_weight_decay=0, embed_weight_decay=0, scalar_weight_decay=0,
               muon_row_norm=0, ema_decay=0, rope_dims=0, ln_scale=0, xsa_last_n=0, parallel_last_n=0, recur_layers="",
               skip_gates=0, ortho_init=0, smear_gate=0)
    assert {k: getattr(s, k) for k in off} == off


def test_strong_is_the_default_and_variables_override_either_preset():
    strong = Settings.from_env({})
    assert strong == Settings() and strong.preset == "strong"
    assert (strong.num_layers, strong.mlp_mult, strong.train_seq_len, strong.export_format) == \
        (11, 4, 2048, "int6+brotli")
    assert Settings.for_preset("baseline") == Settings.from_env({"PRESET": "baseline"})
    assert Settings.from_env({"PRESET": "baseline", "EMA_DECAY": "0.9"}).ema_decay == 0.9
    assert Settings.from_env({"PRESET": "strong", "NUM_LAYERS": "9", "RECUR_LAYERS": "3"}).num_layers == 9
    with pytest.raises(train_gpt.SettingsError, match="^PRESET="):
        Settings.from_env({"PRESET": "fast"})
    with pytest.raises(train_gpt.SettingsError, match="^RECUR_LAYERS="):
        Settings.from_env({"RECUR_LAYERS": "4,6"})


DEFAULT_BEFORE_1_0714 = "6429374"  # the last commit whose default (PRESET=strong) was the 1.0810 record's recipe


@pytest.mark.parametrize("old, new", [("strong", "1.0810"), ("baseline", "baseline"), ("strong", "strong")])
def test_1_0810_preset_and_baseline_are_the_settings_of_before_the_1_0714_default(tmp_path, old, new):
    """Every setting, from the script of that commit (git history): PRESET=1.0810 is the default it had, PRESET=baseline
    the same; the default now differs (the 1.0714 record's recipe)."""
    spec = importlib.util.spec_from_file_location("before", script_at_commit(DEFAULT_BEFORE_1_0714, tmp_path / "b.py"))
    module = sys.modules["before"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["before"]
    before = {k: v for k, v in dataclasses.asdict(module.Settings.for_preset(old)).items() if k != "preset"}
    now = {k: v for k, v in dataclasses.asdict(Settings.for_preset(new)).items() if k != "preset"}
    assert (before == now) == (new != "strong"), {k: (v, now[k]) for k, v in before.items() if v != now[k]}


def test_baseline_preset_trains_the_same_math_as_the_original_script(tmp_path, tiny_dataset):
    """Losses, val scores and the int8+zlib round trip, against train_gpt.py as it was before this change."""
    env = trainer_env(tiny_dataset, RUN_ID="same", ITERATIONS=12, VAL_LOSS_EVERY=6, GRAD_CLIP_NORM=0)
    original = score_lines(script_at_commit(ORIGINAL_COMMIT, tmp_path / "original.py"), env, tmp_path)
    (tmp_path / "now").mkdir()  # its own logs/: a RUN_ID used before is refused
    assert len(original) == 12 + 3 + 2 and score_lines(REPO / "train_gpt.py", env, tmp_path / "now") == original


# ---- model ----------------------------------------------------------------------------------------


def test_xsa_output_is_orthogonal_to_the_tokens_own_value():
    torch.manual_seed(0)
    y, v = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)  # (batch, seq, heads, dim): 4 query heads, 2 values
    out = train_gpt.exclude_self_value(y, v)
    own_value = v[:, :, [0, 0, 1, 1]]
    assert torch.allclose((out * own_value).sum(-1), torch.zeros(2, 7, 4), atol=1e-5)
    assert torch.allclose(y - out, own_value * ((y * own_value).sum(-1) / own_value.square().sum(-1))[..., None],
                          atol=1e-5)  # only the component along v was removed


def test_xsa_blocks_are_the_last_n_and_feed_the_projection_orthogonal_outputs():
    model = perturbed_model(tiny(xsa_last_n=2))
    assert [b.attn.exclusive for b in model.blocks] == [False, False, True, True]
    attn, seen = model.blocks[3].attn, {}
    attn.c_v.register_forward_hook(lambda m, i, o: seen.update(v=o))
    attn.proj.register_forward_pre_hook(lambda m, i: seen.update(y=i[0]))
    with torch.no_grad():
        model.logits(torch.randint(0, 96, (2, 10)))
    y, v = seen["y"].view(2, 10, 4, 16), seen["v"].view(2, 10, 2, 16)[:, :, [0, 0, 1, 1]]
    assert (y * v).sum(-1).abs().max() < 1e-4 * y.abs().max() * v.abs().max()


def test_partial_rope_rotates_only_the_first_dims():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 32)
    out = train_gpt.Rotary(32, 10000.0, dims=8)(x)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert torch.allclose(out[..., :8], train_gpt.Rotary(8, 10000.0)(x[..., :8]))
    assert torch.allclose(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)  # a rotation
    assert not torch.allclose(out[..., 1, :8], x[..., 1, :8])


def test_leaky_relu_squared_mlp():
    torch.manual_seed(0)
    mlp, x = train_gpt.MLP(8, 2, leaky_slope=0.5), torch.randn(5, 8)
    mlp.proj.weight.data.normal_()
    h = x @ mlp.fc.weight.T
    expected = torch.where(h > 0, h, 0.5 * h).square() @ mlp.proj.weight.T
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    mlp.leaky_slope = 0.0
    assert torch.allclose(mlp(x), torch.relu(h).square() @ mlp.proj.weight.T, atol=1e-5)


def test_ln_scale_gives_block_i_inputs_of_rms_one_over_sqrt_i_plus_1():
    model = perturbed_model(tiny(ln_scale=1))
    rms = {}

    def record(key):
        def hook(module, args):
            rms[key] = args[0].square().mean(-1).sqrt()
        return hook
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(record(("attn", i)))
        block.mlp.register_forward_pre_hook(record(("mlp", i)))
    with torch.no_grad():
        model.logits(torch.randint(0, 96, (2, 10)))
    assert len(rms) == 8
    for (_, i), value in rms.items():  # per token
        assert torch.allclose(value, torch.full_like(value, 1 / math.sqrt(i + 1)), rtol=1e-3)


def test_parallel_blocks_feed_the_mlp_the_block_input_not_the_attention_output():
    model = perturbed_model(tiny(parallel_last_n=1, ln_scale=0))
    assert [b.parallel for b in model.blocks] == [False, False, False, True]
    block, seen = model.blocks[3], {}
    block.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], x0=a[1]))
    block.mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0]))
    with torch.no_grad():
        model.logits(torch.randint(0, 96, (2, 10)))
        mix = block.resid_mix
        mixed = mix[0] * seen["x"] + mix[1] * seen["x0"]
    assert torch.allclose(seen["mlp_in"], F.rms_norm(mixed, (64,)), atol=1e-5)


def test_depth_recurrence_reruns_the_same_blocks_num_loops_times_once_switched_on():
    model = perturbed_model(tiny(recur_layers="1,2"))
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    tokens = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        off = model.logits(tokens)
        model.recurrence_active = True
        on = model.logits(tokens)
    assert calls == [0, 1, 2, 3] + [0, 1, 2, 1, 2, 1, 2, 3]  # 1 + NUM_LOOPS=2 passes: their own weights, no copies
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in perturbed_model(tiny()).parameters())
    assert not torch.allclose(off, on)


def test_trainer_switches_recurrence_on_at_its_fraction_of_training(tiny_dataset):
    settings = tiny(data_path=tiny_dataset.data_path, vocab_size=tiny_dataset.vocab_size, train_seq_len=32,
                    train_batch_tokens=256, recur_start_frac=0.5, iterations=10)
    trainer = train_gpt.Trainer(settings, cpu_runtime())
    trainer.step(4, 1.0, progress=0.4)
    assert not trainer.model.recurrence_active
    trainer.step(5, 1.0, progress=0.5)
    assert trainer.model.recurrence_active


# ---- optimizer and schedules ----------------------------------------------------------------------


def cpu_runtime() -> train_gpt.Runtime:
    return train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.float32, False)


def test_muon_weight_decay_is_decoupled_from_the_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.grad = torch.zeros_like(p)  # a zero update: only the decay acts
    before = p.detach().clone()
    train_gpt.Muon([p], lr=0.5, momentum=0.9, backend_steps=5, rank=0, world_size=1, ns_dtype=torch.float32,
                   weight_decay=0.1).step()
    assert torch.allclose(p.detach(), before * (1 - 0.5 * 0.1))


def test_muon_row_norm_feeds_newton_schulz_rows_of_unit_norm():
    torch.manual_seed(0)
    seen = []
    p = torch.nn.Parameter(torch.randn(6, 10))
    p.grad = torch.randn(6, 10) * torch.logspace(-2, 1, 6)[:, None]  # rows of very different norms
    train_gpt.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, rank=0, world_size=1, ns_dtype=torch.float32,
                   orthogonalize=lambda g, steps: seen.append(g) or g, row_norm=True).step()
    assert seen[0].shape == (1, 6, 10)  # a batch of the same-shaped matrices (here one)
    assert torch.allclose(seen[0].norm(dim=-1), torch.ones(1, 6))


def test_polar_express_coefficients_orthogonalise_better_than_the_fixed_quintic():
    torch.manual_seed(0)
    g = torch.randn(64, 192) @ torch.diag(torch.logspace(-2, 0, 192))
    errors = {name: (torch.linalg.svdvals(train_gpt.newton_schulz_orthogonalize(g, 5, coeffs=c)) - 1).abs().max()
              for name, c in train_gpt.NS_COEFFS.items()}
    assert errors["polar"] < 0.2 < errors["fixed"]


def test_lr_warmdown_follows_training_progress_down_to_zero():
    s = Settings(iterations=1000, max_wallclock_seconds=100, warmdown_frac=0.5,
                 export_quant="rtn")  # no GPTQ time reserved: the clock runs to the full cap
    assert train_gpt.training_progress(100, 0, s) == 0.1
    assert train_gpt.training_progress(100, 50_000, s) == 0.5  # the clock is further along than the steps
    lr = [train_gpt.lr_multiplier(k, 0, s) for k in (50, 300, 750, 1000)]
    assert lr == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert train_gpt.lr_multiplier(10, 75_000, s) == pytest.approx(0.5)


def test_muon_momentum_warms_up_over_steps_whatever_the_clock():
    s = Settings(muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500)
    assert [train_gpt.muon_momentum(k, s) for k in (0, 750, 1500, 4000)] == pytest.approx([0.92, 0.955, 0.99, 0.99])


def test_ema_follows_its_formula():
    layer = torch.nn.Linear(3, 2)
    w0 = layer.weight.detach().clone()
    ema = train_gpt.WeightEMA(layer, decay=0.9)
    w1, w2 = torch.randn(2, 3), torch.randn(2, 3)
    for w in (w1, w2):
        layer.weight.data.copy_(w)
        ema.update()
    ema.copy_to_model()
    expected = 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * w2
    assert torch.allclose(layer.weight.detach(), expected, atol=1e-6)


# ---- evaluation -----------------------------------------------------------------------------------


def test_sliding_windows_score_every_token_once_with_the_most_context():
    for num_scored, seq_len, stride in [(64, 16, 4), (70, 16, 5), (16, 16, 3), (64, 16, 16)]:
        ends = train_gpt.window_ends(num_scored, seq_len, stride)
        times_scored, context = np.zeros(num_scored, int), np.zeros(num_scored, int)
        previous = 0
        for end in ends:
            targets = np.arange(previous, end)
            times_scored[targets] += 1
            context[targets] = targets - (end - seq_len) + 1  # tokens the window shows before each target
            previous = end
        assert (times_scored == 1).all() and (ends - seq_len >= 0).all()
        assert (context >= np.minimum(np.arange(num_scored) + 1, seq_len - stride + 1)).all()


def split_of(tokens: np.ndarray) -> train_gpt.ValidationSplit:
    return train_gpt.ValidationSplit(tokens.astype(np.uint16), True)


def evaluator(split, settings, table=None) -> train_gpt.Evaluator:
    table = table or train_gpt.ByteTable(np.ones(96, np.int64), np.zeros(96, bool), np.zeros(96, bool))
    return train_gpt.Evaluator(split, table, settings, cpu_runtime())


@torch.inference_mode()
def token_nats(evaluator: train_gpt.Evaluator, model, stride: int) -> torch.Tensor:
    """The nats of every token the evaluator scores, in token order."""
    return torch.cat([nats[scored.bool()] for nats, _, scored in evaluator.scored_windows(model, stride)])


def test_sliding_evaluation_with_stride_1_scores_each_token_after_a_full_window():
    settings = tiny(train_seq_len=16, val_batch_size=16 * 5)
    model = perturbed_model(settings)
    tokens = np.random.default_rng(0).integers(0, 96, 3 * 16 + 1)
    nats = token_nats(evaluator(split_of(tokens), settings), model, stride=1)
    with torch.no_grad():
        first = F.log_softmax(model.logits(torch.tensor(tokens[None, :16])).double(), -1)[0]
        expected = [-first[j, tokens[j + 1]] for j in range(16)]
        for j in range(16, 48):  # the window of the 16 tokens ending at j
            last = F.log_softmax(model.logits(torch.tensor(tokens[None, j - 15:j + 1])).double(), -1)[0, -1]
            expected.append(-last[tokens[j + 1]])
    assert torch.allclose(nats.double(), torch.stack(expected), atol=1e-5)


def test_sliding_evaluation_with_stride_equal_to_the_window_is_the_plain_evaluation():
    settings = tiny(train_seq_len=16, val_batch_size=16 * 3)
    model = perturbed_model(settings)
    ev = evaluator(split_of(np.random.default_rng(1).integers(0, 96, 5 * 16 + 1)), settings)
    assert ev.evaluate(model, stride=16) == ev.evaluate(model) == ev.evaluate(model, stride=0)
    assert ev.evaluate(model, stride=4) != ev.evaluate(model)


@pytest.mark.parametrize("stride", [0, 4, 1])  # plain, sliding, sliding with full context
def test_every_eval_mode_is_causal_and_scores_a_normalised_distribution(stride):
    settings = tiny(train_seq_len=16, val_batch_size=16 * 4)
    model = perturbed_model(settings)
    model.recurrence_active = True  # the strong model as exported: every technique on
    tokens = np.random.default_rng(2).integers(0, 96, 4 * 16 + 1)
    changed = tokens.copy()
    t = 37
    changed[t + 1:] = (changed[t + 1:] + 1 + np.arange(changed.size - t - 1)) % 96
    before = token_nats(evaluator(split_of(tokens), settings), model, stride)
    after = token_nats(evaluator(split_of(changed), settings), model, stride)
    assert before.numel() == 64
    assert torch.equal(before[:t], after[:t])  # targets 0..t-1 are tokens 1..t
    assert not torch.allclose(before[t:], after[t:])
    inputs = torch.tensor(tokens[None, :16]).expand(96, 16)
    with torch.no_grad():
        every_target = model(inputs, torch.arange(96)[:, None].expand(96, 16))  # each row: one candidate token
    assert torch.allclose(every_target.double().neg().exp().sum(0), torch.ones(16, dtype=torch.float64), atol=1e-5)


# ---- export ---------------------------------------------------------------------------------------


def test_plain_int6_rounding_keeps_each_row_within_half_a_step_inside_its_clip():
    torch.manual_seed(0)
    w = torch.randn(64, 1024) * torch.linspace(0.01, 0.1, 64)[:, None]
    q, scale = train_gpt.quantize_rows(w, 6, 3.0)
    assert q.dtype == torch.int8 and q.abs().max() <= 31 and scale.dtype == torch.float16
    step = scale.float()[:, None]
    assert torch.allclose(step, (3.0 * w.std(1, keepdim=True) / 31).half().float())  # the clip: 3 row stds
    inside = w.abs() <= 31 * step
    restored = train_gpt.dequantize_int8(q, scale)
    assert torch.all((restored - w).abs()[inside] <= step.expand_as(w)[inside] / 2 + 1e-6)
    assert torch.all(restored[~inside].abs() == 31 * step.expand_as(w)[~inside])


PLAIN_AT_3 = ({}, 3.0, 20.0)  # no hessians: int6 matrices rounded plainly at 3 row stds


def test_int6_lzma_model_round_trip_keeps_the_embedding_in_int8():
    model = perturbed_model(tiny(vocab_size=1024, model_dim=256), scale=0.02)
    state = model.state_dict()
    packed = train_gpt.quantize_state_dict(state, model.control_tensor_names(), 6, gptq=PLAIN_AT_3)
    blob = train_gpt.compress_packed(packed, "int6+lzma")
    assert blob.startswith(train_gpt.XZ_MAGIC)
    restored = train_gpt.decompress_model(blob)
    packed = train_gpt.quantize_state_dict(state, model.control_tensor_names(), bits=6, gptq=PLAIN_AT_3)
    assert packed["int8"]["tok_emb.weight"].abs().max() > 31  # int8 range
    assert packed["int8"]["blocks.0.mlp.fc.weight"].abs().max() <= 31
    for name, t in state.items():
        assert restored[name].shape == t.shape and restored[name].dtype == t.dtype
        assert (restored[name] - t).norm() <= 0.05 * t.norm(), name  # Gaussian rows: ~3% in int6
