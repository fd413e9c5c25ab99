"""GPTQ export: the rounding that minds each layer's outputs, its calibration (training tokens only), its size."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, read_log, run_trainer, trainer_env, write_shard
from reference_record import load_record
from train_gpt import Settings

# Matrices large enough to be quantised (more than INT8_KEEP_FLOAT_MAX_NUMEL weights), trained for seconds.
SMALL = dict(num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=2, train_seq_len=64,
             train_batch_tokens=2048, val_batch_size=8192, recur_layers="", device="cpu", warmup_steps=0,
             max_wallclock_seconds=0, xsa_last_n=2, parallel_last_n=1, grad_accum_steps=1)


def rtn_with_scales(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(w / scale[:, None]).clamp(-qmax, qmax) * scale[:, None]


def test_gptq_rounding_moves_the_layer_outputs_less_than_plain_rounding_with_the_same_scales():
    torch.manual_seed(0)
    x = torch.randn(4096, 256) @ (torch.randn(256, 256) / 16 + torch.eye(256))  # correlated inputs
    x[:, 7] = 0  # an input that never fires
    w = torch.randn(192, 256) * 0.02
    q, scale = train_gpt.gptq_quantize(w, x.T @ x, bits=6, clip_sigmas=12.85)
    assert q.dtype == torch.int8 and q.abs().max() <= 31 and scale.dtype == torch.float16
    assert torch.allclose(scale.float(), (12.85 * w.std(1) / 31).half().float())  # the std-based clip
    gptq_out_err = (x @ (train_gpt.dequantize_int8(q, scale) - w).T).norm()
    rtn_out_err = (x @ (rtn_with_scales(w, scale.float(), 31) - w).T).norm()
    assert gptq_out_err < 0.8 * rtn_out_err, (gptq_out_err, rtn_out_err)


def test_gptq_with_uncorrelated_inputs_is_plain_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 300) * 0.02
    q, scale = train_gpt.gptq_quantize(w, torch.diag(torch.rand(300) + 0.5), bits=6, clip_sigmas=4.0)
    assert torch.equal(train_gpt.dequantize_int8(q, scale), rtn_with_scales(w, scale.float(), 31))


def test_calibration_sees_the_output_head_input_as_the_model_computes_it(tiny_dataset):
    """The tied embedding's hessian comes from the final hidden states: its logits must be the model's. H is the
    mean over the calibration batches of X^T X, as the record's."""
    s = Settings.for_preset("strong", data_path=tiny_dataset.data_path, vocab_size=tiny_dataset.vocab_size,
                            **{**SMALL, "recur_layers": "1", "gptq_calibration_batches": 3})
    runtime = train_gpt.setup_runtime(s)
    torch.manual_seed(0)
    model = train_gpt.GPT(s)
    model.recurrence_active = True
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    hessians = train_gpt.collect_hessians(model, s, runtime)
    expected = 0
    for inputs, targets in train_gpt.TrainBatchLoader(s, runtime).calibration_batches(3):
        captured = []
        hook = model.blocks[-1].register_forward_hook(lambda m, args, out: captured.append(out))
        logits = model.logits(inputs)
        hook.remove()
        hidden = train_gpt.rms_norm(captured[-1])
        head = s.logit_softcap * torch.tanh(hidden @ model.tok_emb.weight.T / s.logit_softcap)
        assert torch.allclose(head, logits, atol=1e-5)
        flat = hidden.flatten(0, 1)
        expected = expected + flat.T @ flat / 3
    assert torch.allclose(hessians["tok_emb.weight"], expected, rtol=1e-4, atol=1e-3)
    assert {"blocks.0.attn.c_q.weight", "blocks.1.mlp.proj.weight"} <= hessians.keys()


def test_gptq_time_is_reserved_inside_the_wallclock_cap():
    s = Settings(iterations=10**6, max_wallclock_seconds=100, gptq_reserve_seconds=10)
    assert s.training_seconds == 90
    assert Settings.for_preset("baseline", max_wallclock_seconds=100).training_seconds == 100  # rtn: no reserve
    assert train_gpt.training_progress(1, 45_000, s) == 0.5  # the schedules end where training must stop
    with pytest.raises(train_gpt.SettingsError, match="^GPTQ_RESERVE_SECONDS="):
        Settings.from_env({"MAX_WALLCLOCK_SECONDS": "10", "GPTQ_RESERVE_SECONDS": "10"})
    assert Settings.from_env({"MAX_WALLCLOCK_SECONDS": "10", "GPTQ_RESERVE_SECONDS": "10", "EXPORT_QUANT": "rtn"})


def test_gptq_calibrates_and_reserves_time_as_the_record_by_default():
    s = Settings.from_env({})
    assert (s.gptq_calibration_batches, s.gptq_reserve_seconds) == (64, 12.0)
    with pytest.raises(train_gpt.SettingsError, match="^GPTQ_CALIBRATION_BATCHES=0 is invalid"):
        Settings.from_env({"GPTQ_CALIBRATION_BATCHES": "0"})


def test_export_quant_names_a_known_rounding():
    assert Settings.from_env({}).export_quant == "gptq"
    assert Settings.from_env({"PRESET": "baseline"}).export_quant == "rtn"  # the baseline stays exact
    with pytest.raises(train_gpt.SettingsError, match="^EXPORT_QUANT='awq' is invalid: it must be one of gptq, rtn"):
        Settings.from_env({"EXPORT_QUANT": "awq"})


def trained_model(dataset, seed: int, steps: int = 30):
    s = Settings.for_preset("strong", data_path=dataset.data_path, tokenizer_path=dataset.tokenizer_path,
                            vocab_size=dataset.vocab_size, seed=seed, iterations=steps, ema_decay=0.9,
                            max_val_tokens=4096, **{**SMALL, "train_batch_tokens": 1024})
    runtime = train_gpt.setup_runtime(s)
    trainer = train_gpt.Trainer(s, runtime)
    for step in range(steps):
        trainer.step(step, train_gpt.lr_multiplier(step, 0.0, s))
    trainer.ema.copy_to_model()
    split = train_gpt.load_validation_split(s)
    evaluator = train_gpt.Evaluator(split, train_gpt.build_byte_table(s.tokenizer_path, s.vocab_size), s, runtime)
    return s, runtime, trainer.model, evaluator


def round_trip_kl(model, evaluator, blob: bytes) -> float:
    """The export's damage: KL(model before || model after the round trip) per token on validation windows."""
    windows = torch.from_numpy(evaluator.split.tokens[:4096].astype(np.int64)).view(-1, 64)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = torch.log_softmax(model.logits(windows).float(), -1)
        model.load_state_dict(train_gpt.decompress_model(blob))
        after = torch.log_softmax(model.logits(windows).float(), -1)
    model.load_state_dict(weights)
    return (before.exp() * (before - after)).sum(-1).mean().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_round_trip_penalty_is_below_plain_rounding_at_the_same_clip(tiny_dataset, seed):
    """int6 both at the same clip (3 x std; the embedding 5 x std, near its int8 quantile clip), so that they differ
    in rounding only. The penalty is the KL of the round trip: the val-loss difference of a model trained for seconds
    is first-order noise (+-0.002 nats either way); the KL is second-order."""
    s, runtime, model, evaluator = trained_model(tiny_dataset, seed)
    s = dataclasses.replace(s, gptq_clip_sigmas=3.0, gptq_embed_clip_sigmas=5.0, export_format="int6+zlib")  # fast
    rtn = train_gpt.export_artifact(model, s, 0, print)
    gptq = train_gpt.export_artifact(model, s, 0, print, train_gpt.collect_hessians(model, s, runtime))
    rtn_kl, gptq_kl = round_trip_kl(model, evaluator, rtn), round_trip_kl(model, evaluator, gptq)
    assert gptq_kl < 0.8 * rtn_kl, (gptq_kl, rtn_kl)


def test_gptq_artifact_does_not_depend_on_the_validation_tokens(tmp_path, tiny_dataset):
    """Calibration reads training tokens only: poisoning the validation split leaves the artifact's bytes as
    they were (training never reads validation either, and validation scores do not steer anything)."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_dataset.data_path, poisoned)
    val_path = next(poisoned.glob("fineweb_val_*.bin"))
    tokens = train_gpt.read_shard(val_path)  # its documents in reverse order: other tokens, of the same tokenizer
    write_shard(val_path, np.concatenate(np.split(tokens, np.flatnonzero(tokens == train_gpt.BOS_ID)[1:])[::-1]))
    artifacts = []
    for run_id, data_path in (("clean", tiny_dataset.data_path), ("poisoned", poisoned)):
        env = trainer_env(tiny_dataset, RUN_ID=run_id, DATA_PATH=data_path, PRESET="strong", MODEL_DIM=256,
                          RECUR_LAYERS="1", ITERATIONS=4, VAL_LOSS_EVERY=2, MAX_VAL_TOKENS=1024, EVAL_STRIDE=0)
        result = run_trainer(env, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "gptq: " in read_log(tmp_path, run_id)
        artifacts.append((tmp_path / "logs" / f"{run_id}.int6.ptz").read_bytes())
    packed = train_gpt.decompress_packed(artifacts[0])
    assert packed["int8"]["blocks.0.mlp.fc.weight"].abs().max() <= 31  # a GPTQ-rounded int6 matrix is in it
    assert artifacts[0] == artifacts[1]


def test_two_ranks_export_the_same_gptq_artifact_as_one(tmp_path, tiny_dataset):
    """Each rank calibrates on its share of the calibration batches and the hessians are summed: rank 0 rounds
    with the same H as one process that saw all of them. Two ranks train the same math up to float rounding, so a few
    weights may round the other way (40 of 1.0M seen); rank 0 rounding with its own half-batch H: 14%."""
    artifacts = []
    for run_id, nproc, accum in (("one", 1, 2), ("two", 2, 1)):
        env = trainer_env(tiny_dataset, RUN_ID=run_id, PRESET="strong", MODEL_DIM=256, RECUR_LAYERS="1", ITERATIONS=4,
                          VAL_LOSS_EVERY=0, MAX_VAL_TOKENS=1024, EVAL_STRIDE=0, GRAD_ACCUM_STEPS=accum)
        result = run_trainer(env, tmp_path, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        artifacts.append(train_gpt.decompress_model((tmp_path / "logs" / f"{run_id}.int6.ptz").read_bytes()))
    differ = sum((artifacts[0][n] != artifacts[1][n]).sum().item() for n in artifacts[0])
    total = sum(t.numel() for t in artifacts[0].values())
    assert differ < 0.001 * total, (differ, total)


def gaussian_rows_model(settings: Settings) -> train_gpt.GPT:
    """Gaussian rows of varied scale: the least compressible realistic weights (see test_strong_default)."""
    model = train_gpt.GPT(settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape) * 0.02 * (0.5 + torch.rand(p.shape[0], 1)))
    return model


def correlated_inputs_hessian(dim: int) -> torch.Tensor:
    x = torch.randn(2 * dim, dim) @ (torch.eye(dim) + torch.randn(dim, dim) / dim**0.5)
    return x.T @ x


def test_gptq_export_over_the_cap_steps_down_bits(monkeypatch):
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", 1)  # every plan overflows: the last one is taken
    settings = Settings.for_preset("strong", **{**SMALL, "vocab_size": 512, "model_dim": 384,  # c_q: 147k weights
                                                "export_format": "int6+lzma", "export_fit_cap": 1})  # lzma: faster
    model = gaussian_rows_model(settings)
    hessians = {name: correlated_inputs_hessian(p.shape[1]) for name, p in model.state_dict().items() if p.ndim == 2}
    lines = []
    packed = train_gpt.decompress_packed(train_gpt.export_artifact(model, settings, 0, lines.append, hessians))
    assert [line.split("; ")[1] for line in lines if line.startswith("export_fit:")] == [
        f"now int{b} matrices, int{m} MLP matrices" for b, m in train_gpt.FIT_CAP_STEPS]
    assert packed["int8"]["blocks.0.mlp.fc.weight"].abs().max() <= 7  # int4
    assert packed["int8"]["blocks.0.attn.c_q.weight"].abs().max() <= 15  # int5
    assert packed["int8"]["tok_emb.weight"].abs().max() > 15  # the embedding keeps int8


# ----------------------------------------------------------------------------------------------
# GPTQ as the 1.0810 record rounds, run by the record's own code beside the kit's.

@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_record(tmp_path_factory.mktemp("record"), {"NUM_LAYERS": "1", "MODEL_DIM": "320", "NUM_HEADS": "4",
                                                           "NUM_KV_HEADS": "2", "VOCAB_SIZE": "1024", "NUM_LOOPS": "0"})


def test_gptq_gives_the_records_codes_and_scales_from_the_same_weights_and_hessian(record):
    """Exactly equal, with inputs that never fire (their weights are zeroed) and rows of varied scale, in int6 at
    the matrices' clip and int8 at the embedding's."""
    torch.manual_seed(0)
    for rows, cols, bits, sigmas in [(256, 192, 6, 12.85), (96, 384, 6, 12.85), (300, 128, 8, 20.0)]:
        x = torch.randn(2 * cols, cols) @ (torch.eye(cols) + torch.randn(cols, cols) / cols**0.5)
        x[:, [3, 50]] = 0
        w = torch.randn(rows, cols) * 0.02 * (0.5 + torch.rand(rows, 1))
        q, scale = train_gpt.gptq_quantize(w, x.T @ x, bits, sigmas)
        record_q, record_scale = record.gptq_quantize_weight(w, x.T @ x, clip_sigmas=sigmas,
                                                             clip_range=2**(bits - 1) - 1)
        assert torch.equal(q, record_q) and torch.equal(scale, record_scale)
        assert torch.equal(q[:, [3, 50]], torch.zeros(rows, 2, dtype=torch.int8))


def test_default_export_quantizes_a_state_dict_as_the_records(record):
    """The record's gptq_mixed_quantize on the same state dict and hessians: the default export has the same codes
    and scales, and every float tensor of at most 65,536 values (control tensors too) in fp16."""
    s = Settings(vocab_size=1024, num_layers=1, model_dim=320, num_heads=4, num_kv_heads=2, recur_layers="")
    torch.manual_seed(0)
    model = train_gpt.GPT(s)
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    state = model.state_dict()
    hessians = {name: correlated_inputs_hessian(t.shape[1]) for name, t in state.items() if t.numel() > 65536}
    assert {"tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.mlp.proj.weight"} <= hessians.keys()
    hessians["blocks.0.mlp.fc.weight"][7], hessians["blocks.0.mlp.fc.weight"][:, 7] = 0, 0  # an input never fires
    result, meta = record.gptq_mixed_quantize(state, hessians, record.Hyperparameters())
    packed = train_gpt.decompress_packed(train_gpt.export_artifact(model, s, 0, print, hessians))
    assert packed["int8"].keys() == hessians.keys() and packed["float"].keys() == state.keys() - hessians.keys()
    for name in hessians:
        assert torch.equal(packed["int8"][name], result[name + ".q"]), name
        assert torch.equal(packed["scales"][name], result[name + ".scale"]), name
    assert model.control_tensor_names() <= packed["float"].keys()
    for name, t in packed["float"].items():
        assert t.dtype == torch.float16 and torch.equal(t, result[name]), name
