"""GPTQ export: the rounding that minds each layer's outputs, its calibration (training tokens only), its size."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import re
import shutil
import sys
import types
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, read_log, run_trainer, trainer_env, write_shard
from reference_record import environment, load_record
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
    s = Settings.for_preset("1.0810", data_path=tiny_dataset.data_path, vocab_size=tiny_dataset.vocab_size,
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
    assert (s.gptq_calibration_batches, s.gptq_reserve_seconds) == (64, 13.0)  # the 1.0714 record's (1.0810: 12)
    with pytest.raises(train_gpt.SettingsError, match="^GPTQ_CALIBRATION_BATCHES=0 is invalid"):
        Settings.from_env({"GPTQ_CALIBRATION_BATCHES": "0"})


def test_per_kind_clips_at_0_follow_one_clip_as_the_1_0810_preset_with_its_int8_embedding():
    """GPTQ_MLP_CLIP_SIGMAS and GPTQ_ATTN_CLIP_SIGMAS at 0 follow GPTQ_CLIP_SIGMAS: PRESET=1.0810 clips every matrix
    alike and keeps the embedding in 8 bits, as the export did before they existed; the default clips by kind."""
    s = Settings.for_preset("1.0810")
    assert s.gptq_clips == {".mlp.": 12.85, ".attn.": 12.85, "": 12.85} and s.export_embed_bits == 8
    assert Settings.from_env({"PRESET": "1.0810", "GPTQ_CLIP_SIGMAS": "3"}).gptq_clips == {
        ".mlp.": 3.0, ".attn.": 3.0, "": 3.0}
    assert Settings.from_env({}).gptq_clips == {".mlp.": 12.0, ".attn.": 13.0, "": 12.85}
    assert [train_gpt.clip_sigmas_of(name, {".mlp.": 1, ".attn.": 2, "": 3}) for name in (
        "blocks.0.mlp.proj.weight", "blocks.0.attn.proj.weight", "lm_head.weight")] == [1, 2, 3]


@pytest.mark.parametrize("env, rule", [({"EXPORT_EMBED_BITS": "9"}, "a whole number from 2 to 8"),
                                       ({"EXPORT_EMBED_BITS": "1"}, "a whole number from 2 to 8"),
                                       ({"GPTQ_MLP_CLIP_SIGMAS": "-1"}, "a number >= 0"),
                                       ({"GPTQ_ATTN_CLIP_SIGMAS": "nan"}, "a finite number")])
def test_bad_embedding_bits_or_kind_clips_are_refused_by_name(env, rule):
    with pytest.raises(train_gpt.SettingsError, match=rf"^{next(iter(env))}=\S+ is invalid: it must be {rule}"):
        Settings.from_env(env)


def test_export_quant_names_a_known_rounding():
    assert Settings.from_env({}).export_quant == "gptq"
    assert Settings.from_env({"PRESET": "baseline"}).export_quant == "rtn"  # the baseline stays exact
    with pytest.raises(train_gpt.SettingsError, match="^EXPORT_QUANT='awq' is invalid: it must be one of gptq, rtn"):
        Settings.from_env({"EXPORT_QUANT": "awq"})


def trained_model(dataset, seed: int, steps: int = 30):
    s = Settings.for_preset("1.0810", data_path=dataset.data_path, tokenizer_path=dataset.tokenizer_path,
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
    is first-order noise (+-0.002 nats either way); the KL is second-order. 20 steps, 16 calibration batches: GPTQ's
    KL measured 0.08-0.16 of plain rounding's on these seeds (30 steps and 64 batches: 0.11-0.14)."""
    s, runtime, model, evaluator = trained_model(tiny_dataset, seed, steps=20)
    s = dataclasses.replace(s, gptq_clip_sigmas=3.0, gptq_embed_clip_sigmas=5.0, export_format="int6+zlib",  # fast
                            gptq_calibration_batches=16)
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
                          RECUR_LAYERS="1", PARALLEL_START_LAYER=1, ITERATIONS=4, VAL_LOSS_EVERY=2, MAX_VAL_TOKENS=1024,
                          TTT_EPOCHS=0)
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
    weights may round the other way (from 40 to 1,414 of 1.0M seen, as the repository's text, the data here, changed);
    rank 0 rounding with its own half-batch H: 14%."""
    artifacts = []
    for run_id, nproc, accum in (("one", 1, 8), ("two", 2, 4)):
        env = trainer_env(tiny_dataset, RUN_ID=run_id, PRESET="strong", MODEL_DIM=256, RECUR_LAYERS="1", ITERATIONS=4,
                          PARALLEL_START_LAYER=1, VAL_LOSS_EVERY=0, MAX_VAL_TOKENS=1024, TTT_EPOCHS=0,
                          GRAD_ACCUM_STEPS=accum)
        result = run_trainer(env, tmp_path, nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        artifacts.append(train_gpt.decompress_model((tmp_path / "logs" / f"{run_id}.int6.ptz").read_bytes()))
    differ = sum((artifacts[0][n] != artifacts[1][n]).sum().item() for n in artifacts[0])
    total = sum(t.numel() for t in artifacts[0].values())
    assert differ < 0.01 * total, (differ, total)


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
    settings = Settings.for_preset("1.0810", **{**SMALL, "vocab_size": 512, "model_dim": 384,  # c_q: 147k weights
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


def test_1_0810_export_quantizes_a_state_dict_as_the_records(record):
    """The record's gptq_mixed_quantize on the same state dict and hessians: PRESET=1.0810's export has the same codes
    and scales, and every float tensor of at most 65,536 values (control tensors too) in fp16."""
    s = Settings.for_preset("1.0810", vocab_size=1024, num_layers=1, model_dim=320, num_heads=4, num_kv_heads=2, recur_layers="")
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


# ----------------------------------------------------------------------------------------------
# Hessians as the record's hooks sum them, run by the 1.0810 record's own collect_hessians beside the kit's.

# Every matrix 272 x 272 (2 heads of 136; MLP 1x), above 65,536 weights: the record hooks only those.
LOOPED_RECORD = dict(VOCAB_SIZE=384, NUM_LAYERS=4, MODEL_DIM=272, EMBEDDING_DIM=272, NUM_HEADS=2, NUM_KV_HEADS=2,
                     MLP_MULT=1, LOOP_START=1, LOOP_END=2, NUM_LOOPS=2, PARALLEL_RESIDUAL_START=2, XSA_LAST_N=4,
                     QK_GAIN_INIT=5.25, TRAIN_SEQ_LEN=64)
LOOPED_KIT = dict(num_layers=4, model_dim=272, num_heads=2, num_kv_heads=2, mlp_mult=1, recur_layers="1,2",
                  num_loops=2, parallel_last_n=2, xsa_last_n=4, train_seq_len=64, train_batch_tokens=256,
                  grad_accum_steps=1, device="cpu", gptq_calibration_batches=3)
HESSIAN_RTOL = 1e-5  # both sum X^T X in fp32 over the same activations (logits equal to 1e-5): summation order only


def test_looped_layers_hessians_sum_every_pass_as_the_records_hooks(tmp_path, tiny_dataset):
    """Blocks 1-2 run three times with recurrence on: each pass adds its X^T X, as the record's hooks add one term
    per call; the embedding's H is the final norm's output. Same weights, same calibration batches (the record's
    loader is fed the kit's: the loaders' equality is proven elsewhere)."""
    record = load_record(tmp_path, {k: str(v) for k, v in LOOPED_RECORD.items()})
    s = Settings.for_preset("1.0810", data_path=tiny_dataset.data_path, vocab_size=tiny_dataset.vocab_size,
                            **LOOPED_KIT)
    runtime = train_gpt.setup_runtime(s)
    torch.manual_seed(0)
    theirs = record.GPT(record.Hyperparameters())
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = train_gpt.GPT(s)
    ours.load_state_dict(theirs.state_dict())
    theirs.looping_active = ours.recurrence_active = True
    batches = iter(list(train_gpt.TrainBatchLoader(s, runtime).calibration_batches(3)))
    expected = record.collect_hessians(theirs, SimpleNamespace(next_batch=lambda *_: next(batches)),
                                       record.Hyperparameters(), torch.device("cpu"), 3)
    hessians = train_gpt.collect_hessians(ours, s, runtime)
    assert len(expected) == 4 * 6 + 1  # c_q, c_k, c_v, proj, fc, mlp proj of each block, and the embedding
    for name, H in expected.items():
        error = (hessians[name] - H).abs().max().item()
        assert error <= HESSIAN_RTOL * H.abs().max().item(), (name, error)
    ours.recurrence_active = False
    once = train_gpt.collect_hessians(ours, s, runtime)  # block 0 runs once either way; 1 and 2 thrice when looping
    assert torch.equal(once["blocks.0.mlp.fc.weight"], hessians["blocks.0.mlp.fc.weight"])
    ratio = hessians["blocks.1.mlp.fc.weight"].trace() / once["blocks.1.mlp.fc.weight"].trace()
    assert ratio == pytest.approx(3, rel=1e-3)  # each pass's input is normed: the same trace, 3 passes


def test_1_0714_model_hessians_are_the_records(tmp_path, tiny_dataset):
    """The 1.0714 record's collect_hessians on its own model (reduced: 11 layers of 64, loops of 3-5 on, both gates,
    two lanes from block 8, weights perturbed): dense causal attention over each calibration sequence (no document
    cuts), one term per block pass, the output gate inside the projection's input, the head's H from the final norm
    of the two lanes' mean. The kit hooks the gates' 12-input projections too (their H go unused: passthrough)."""
    from test_record_1_0714_model import REDUCED_KIT, REDUCED_RECORD, perturbed_pair
    record = load_record(tmp_path, {k: str(v) for k, v in {**REDUCED_RECORD, "VOCAB_SIZE": 384}.items()},
                         record="1.0714")
    theirs, ours = perturbed_pair(record, seed=3, vocab_size=384)
    theirs.looping_active = ours.recurrence_active = True
    s = Settings(**{**REDUCED_KIT, "vocab_size": 384, "data_path": tiny_dataset.data_path, "train_batch_tokens": 256,
                    "grad_accum_steps": 1, "device": "cpu", "gptq_calibration_batches": 3,
                    "pack_documents": 0, "grad_clip_per_rank": 0})  # one process's calibration batches suffice here
    runtime = train_gpt.setup_runtime(s)
    batches = iter(list(train_gpt.TrainBatchLoader(s, runtime).calibration_batches(3)))
    expected = record.collect_hessians(theirs, SimpleNamespace(next_batch=lambda *_: next(batches)),
                                       record.Hyperparameters(), torch.device("cpu"), 3)
    hessians = train_gpt.collect_hessians(ours, s, runtime)
    assert len(expected) == 11 * 6 + 1 and hessians.keys() - expected.keys() == {
        f"blocks.{i}.attn.attn_gate_proj.weight" for i in range(11)}
    for name, H in expected.items():
        error = (hessians[name] - H).abs().max().item()
        assert error <= HESSIAN_RTOL * H.abs().max().item(), (name, error)
    ours.recurrence_active = False  # the loops count: blocks 3-5 run thrice with them
    assert not torch.allclose(train_gpt.collect_hessians(ours, s, runtime)["blocks.4.mlp.fc.weight"],
                              hessians["blocks.4.mlp.fc.weight"], rtol=0.1)


# ----------------------------------------------------------------------------------------------
# GPTQ as the 1.0714 record rounds (per-kind clips, int7 embedding), run by the record's own code beside the kit's.

RECORD_1_0714 = REPO.parent / "shared" / "reference" / "record_2026-04-16_sp8192_1.0714"
# One block of width 512 with 2 of 8 heads for K and V: c_k and c_v hold exactly 65,536 weights (the record's
# passthrough edge: fp16), c_q, the output projection, the MLP matrices (MLP_MULT 1, to keep GPTQ fast) and the
# 256 x 512 embedding are above it; the logged run's gates (SMEAR_GATE=1, GATE_ATTN_OUT=1) add their small tensors.
REDUCED_1_0714 = dict(VOCAB_SIZE=256, NUM_LAYERS=1, MODEL_DIM=512, EMBEDDING_DIM=512, NUM_HEADS=8, NUM_KV_HEADS=2,
                      MLP_MULT=1, NUM_LOOPS=0, SMEAR_GATE=1, GATE_ATTN_OUT=1)


def import_record_1_0714(env: dict):
    """The 1.0714 source, unedited, as a module: stand-ins for what it imports at the top and only calls on a GPU
    (FlashAttention 3, triton's kernel), torch.compile the identity while it loads; the stand-ins are removed after."""
    source = RECORD_1_0714 / "train_gpt.py"
    if not source.exists():
        pytest.skip(f"{source} is absent (../shared is not beside the repository)")
    import torch._dynamo  # noqa: F401  (it probes triton when first imported: before any stand-in)
    stubs = {name: types.ModuleType(name) for name in ("flash_attn_interface", "triton", "triton.language",
                                                       "triton.tools", "triton.tools.tensor_descriptor")}
    stubs["flash_attn_interface"].flash_attn_func = stubs["flash_attn_interface"].flash_attn_varlen_func = None
    stubs["triton"].jit = lambda fn: fn
    stubs["triton.language"].constexpr = type("constexpr", (), {})
    stubs["triton.tools.tensor_descriptor"].TensorDescriptor = type("TensorDescriptor", (), {})
    saved = {name: sys.modules.get(name) for name in stubs}  # e.g. the 1.0810 record's stand-in, or triton itself
    sys.modules.update(stubs)
    try:
        with environment({k: str(v) for k, v in env.items()}), \
                mock.patch.object(torch, "compile", lambda fn=None, **kwargs: fn or (lambda f: f)):
            spec = importlib.util.spec_from_file_location("record_1_0714", source)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    finally:
        for name, module_before in saved.items():
            sys.modules.pop(name) if module_before is None else sys.modules.update({name: module_before})
    return module


@pytest.fixture(scope="module")
def record_1_0714_export():
    """The record's gptq_mixed_quantize on its own un-banked state dict (perturbed, so that no tensor is at its
    init), with correlated-input Hessians and an input that never fires."""
    record = import_record_1_0714(REDUCED_1_0714)
    h = record.Hyperparameters()
    torch.manual_seed(0)
    model = record.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p) * (0.5 + torch.rand(p.shape[0], *[1] * (p.ndim - 1))))
    state = record._unbank_state_dict(model.state_dict(), h.num_layers)
    hessians = {name: correlated_inputs_hessian(t.shape[1]) for name, t in state.items() if t.numel() > 65536}
    hessians["blocks.0.mlp.proj.weight"][5], hessians["blocks.0.mlp.proj.weight"][:, 5] = 0, 0
    result, meta = record.gptq_mixed_quantize(state, hessians, h)
    s = Settings(export_format="int6+zlib")  # the default's export; zlib: the fastest; the compressor leaves codes alone
    blob = train_gpt.export_artifact(SimpleNamespace(state_dict=lambda: state), s, 0, print, hessians)
    return SimpleNamespace(record=record, h=h, state=state, hessians=hessians, result=result, meta=meta, blob=blob)


def test_record_1_0714_export_settings_are_its_runs_logged_ones(record_1_0714_export):
    h = record_1_0714_export.h
    for log in sorted(RECORD_1_0714.glob("train_seed*.log")):
        logged = dict(re.findall(r"(?m)^  (\w+): (.*)$", log.read_text(encoding="utf-8")))
        for name in ("matrix_bits", "embed_bits", "matrix_clip_sigmas", "mlp_clip_sigmas", "attn_clip_sigmas",
                     "embed_clip_sigmas", "compressor"):
            assert str(getattr(h, name)) == logged[name], (log.name, name)
    s = Settings()  # the default: the kit's names for them
    assert (h.matrix_bits, h.embed_bits, h.matrix_clip_sigmas, h.mlp_clip_sigmas, h.attn_clip_sigmas,
            h.embed_clip_sigmas) == (6, 7, 12.85, 12.0, 13.0, 15.0) == (
        s.export_bits, s.export_embed_bits, s.gptq_clip_sigmas, s.gptq_mlp_clip_sigmas, s.gptq_attn_clip_sigmas,
        s.gptq_embed_clip_sigmas)


def test_1_0714_export_gives_the_records_codes_scales_and_fp16_tensors(record_1_0714_export):
    """Exactly equal: the same GPTQ (this record's gptq_quantize_weight is the 1.0810 record's, whose codes the kit's
    gptq_quantize gives) at the same clip and width per tensor: int6 at 12 (MLP) or 13 (attention) row stds, int7 at
    15 for the embedding; every float tensor of at most 65,536 values in fp16, the gates among them."""
    ref = record_1_0714_export
    packed = train_gpt.decompress_packed(ref.blob)
    assert {name for name, what in ref.meta.items() if what == "gptq (int7)"} == {"tok_emb.weight"}
    assert packed["int8"].keys() == ref.hessians.keys()
    assert packed["float"].keys() == ref.state.keys() - ref.hessians.keys()
    small = {"blocks.0.attn.c_k.weight", "blocks.0.attn.attn_gate_proj.weight", "smear_gate.weight", "smear_lambda"}
    assert small <= packed["float"].keys()  # c_k: exactly 65,536 weights
    for name in ref.hessians:
        assert torch.equal(packed["int8"][name], ref.result[name + ".q"]), name
        assert torch.equal(packed["scales"][name], ref.result[name + ".scale"]), name
    for name, (sigmas, qmax) in {"tok_emb.weight": (15, 63), "blocks.0.mlp.fc.weight": (12, 31),
                                 "blocks.0.attn.proj.weight": (13, 31)}.items():  # clip / largest code, per kind
        assert torch.equal(packed["scales"][name], (sigmas * ref.state[name].std(1) / qmax).half()), name
        assert packed["int8"][name].abs().max() <= qmax
    for name, t in packed["float"].items():
        assert t.dtype == torch.float16 and torch.equal(t, ref.result[name]), name


def test_1_0714_export_loads_back_to_the_records_dequantized_weights(record_1_0714_export):
    """Exactly: the same codes times the same fp16 scales, one fp32 product per weight; fp16 tensors widen exactly."""
    ref = record_1_0714_export
    ours = train_gpt.decompress_model(ref.blob)
    theirs = ref.record.dequantize_mixed(ref.result, ref.meta, ref.state)
    assert ours.keys() == theirs.keys() == ref.state.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == torch.float32 and torch.equal(ours[name], t), name


@pytest.mark.parametrize("changed_back, differs", [(dict(gptq_mlp_clip_sigmas=0.0), "blocks.0.mlp.fc.weight"),
                                                   (dict(gptq_attn_clip_sigmas=0.0), "blocks.0.attn.c_q.weight"),
                                                   (dict(export_embed_bits=8), "tok_emb.weight"),
                                                   (dict(gptq_embed_clip_sigmas=20.0), "tok_emb.weight")])
def test_1_0714_codes_differ_when_one_export_setting_is_changed_back(record_1_0714_export, changed_back, differs):
    ref = record_1_0714_export
    s = Settings(**changed_back)
    packed = train_gpt.quantize_state_dict({differs: ref.state[differs]}, set(), 6, None,
                                           (ref.hessians, s.gptq_clips, s.gptq_embed_clip_sigmas), s.export_embed_bits)
    assert not torch.equal(packed["int8"][differs], ref.result[differs + ".q"])
