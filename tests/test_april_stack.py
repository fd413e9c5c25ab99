"""The 1.0810 record's stack (PRESET=1.0810): the 8192 vocabulary, its settings, and its legal score-first test-time
training (TTT_METHOD=full) over the whole split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import train_gpt
from conftest import read_log, run_trainer, trainer_env
from test_strong_default import cpu_runtime, evaluator, perturbed_model, split_of, tiny
from test_train_end_to_end import values
from train_gpt import Settings

# ---- settings ----------------------------------------------------------------------------------------


def test_data_and_tokenizer_paths_follow_vocab_size_unless_set():
    assert (Settings().vocab_size, Settings().data_path, Settings().tokenizer_path) == \
        (8192, "./data/datasets/fineweb10B_sp8192", "./data/tokenizers/fineweb_8192_bpe.model")
    s = Settings.from_env({"VOCAB_SIZE": "4096"})
    assert (s.data_path, s.tokenizer_path) == ("./data/datasets/fineweb10B_sp4096",
                                               "./data/tokenizers/fineweb_4096_bpe.model")
    s = Settings.from_env({"DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"})
    assert (s.vocab_size, s.data_path, s.tokenizer_path) == (8192, "/d", "/t.model")


def test_baseline_preset_keeps_the_1024_vocabulary_and_its_files_with_every_april_technique_off():
    s = Settings.from_env({"PRESET": "baseline"})
    assert (s.vocab_size, s.data_path, s.tokenizer_path) == \
        (1024, "./data/datasets/fineweb10B_sp1024", "./data/tokenizers/fineweb_1024_bpe.model")
    assert (s.smear_gate, s.ttt_epochs) == (0, 0)


def test_the_1_0810_records_settings_are_its_preset():
    s = Settings.for_preset("1.0810")
    assert (s.recur_layer_ids, s.num_loops, s.recur_start_frac, s.qk_gain_init, s.mlp_mult) == \
        ([3, 4, 5], 2, 0.35, 5.25, 4)
    assert (s.matrix_lr, s.muon_momentum, s.muon_momentum_warmup_start, s.muon_momentum_warmup_steps) == \
        (0.022, 0.99, 0.92, 1500)
    assert (s.muon_weight_decay, s.embed_weight_decay, s.scalar_weight_decay, s.muon_ns_coeffs) == \
        (0.095, 0.085, 0.02, "fixed")
    assert (s.tied_embed_lr, s.scalar_lr, s.warmdown_frac, s.ema_decay, s.grad_clip_norm) == \
        (0.03, 0.02, 0.72, 0.9965, 0.3)
    assert (s.skip_gates, s.ortho_init, s.val_loss_every, s.train_log_every) == (1, 1, 4000, 500)
    assert (s.smear_gate, s.ttt_epochs, s.ttt_lr, s.ttt_chunk_tokens) == (0, 3, 0.005, 32_768)


@pytest.mark.parametrize("env, variable", [({"TTT_EPOCHS": "-1"}, "TTT_EPOCHS"), ({"TTT_LR": "-0.1"}, "TTT_LR"),
                                           ({"TTT_CHUNK_TOKENS": "0"}, "TTT_CHUNK_TOKENS"),
                                           ({"SMEAR_GATE": "2"}, "SMEAR_GATE")])
def test_bad_april_setting_is_rejected_with_its_name(env, variable):
    with pytest.raises(train_gpt.SettingsError, match=rf"^{variable}="):
        Settings.from_env(env)


def test_missing_data_names_the_variant_of_the_vocabulary(tmp_path):
    with pytest.raises(FileNotFoundError, match="--variant sp8192"):
        train_gpt.load_validation_split(Settings(data_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="--variant sp1024"):
        train_gpt.build_byte_table(str(tmp_path / "absent.model"), 1024)


# ---- legal score-first test-time training ------------------------------------------------------------


def ttt_settings(**overrides) -> Settings:
    return tiny(**{**dict(vocab_size=1024, train_seq_len=16, val_batch_size=16 * 3, ttt_epochs=2, ttt_lr=0.05,
                          ttt_chunk_tokens=40), **overrides})


def record_ttt(settings: Settings, tokens: np.ndarray, stride: int, model=None):
    """Runs TTT and records, in order, the events the model sees: ("score", scored target tokens, their nats)
    for each evaluation batch and ("train", every token of the batch) for each training batch."""
    model = model or perturbed_model(settings)
    model.recurrence_active = True
    ev = evaluator(split_of(tokens), settings, train_gpt.ByteTable(np.ones(1024, np.int64), np.zeros(1024, bool),
                                                                   np.zeros(1024, bool)))
    events, batch = [], {}

    def forward_hook(module, args, output):
        if module.training:
            events.append(("train", torch.cat(args, dim=1).flatten().tolist(), None))
        batch.update(targets=args[1])
    model.register_forward_hook(forward_hook)
    original = ev.scored_windows

    def recording(*args, **kwargs):
        for nats, num_bytes, scored in original(*args, **kwargs):
            mask = scored.bool()
            events.append(("score", batch["targets"][mask].tolist(), nats[mask].detach().clone()))
            yield nats, num_bytes, scored
    ev.scored_windows = recording
    result = ev.evaluate_with_ttt(model, stride)
    return result, events, model


@pytest.mark.parametrize("stride", [0, 4])  # TTT over plain and over sliding windows
def test_ttt_scores_every_token_once_and_trains_only_on_tokens_already_scored(stride):
    """Token i is the number i, so each event says which positions it used."""
    n = 12 * 16
    _, events, _ = record_ttt(ttt_settings(), np.arange(n + 1), stride)
    scored_in_order = [t for kind, tokens, _ in events if kind == "score" for t in tokens]
    assert sorted(scored_in_order) == list(range(1, n + 1))  # every target exactly once
    assert sum(kind == "train" for kind, _, _ in events) >= 2 * 4  # epochs x chunks: training did happen
    scored_so_far, trained_so_far = 0, -1
    for kind, tokens, _ in events:
        if kind == "score":  # the weights that score these were trained only on earlier positions
            assert trained_so_far < min(tokens)
            scored_so_far = max(scored_so_far, max(tokens))
        else:  # training sees only positions already scored
            assert max(tokens) <= scored_so_far
            trained_so_far = max(trained_so_far, max(tokens))


@pytest.mark.parametrize("stride", [0, 4])
def test_ttt_score_is_causal_and_normalised(stride):
    """Changing the tokens after position t changes no score of a token up to t, although TTT trains on them."""
    settings = ttt_settings()
    tokens = np.random.default_rng(3).integers(0, 96, 10 * 16 + 1)
    changed = tokens.copy()
    t = 97
    changed[t + 1:] = (changed[t + 1:] + 1 + np.arange(changed.size - t - 1)) % 96
    nats = []
    for toks in (tokens, changed):
        _, events, model = record_ttt(settings, toks, stride, perturbed_model(settings))
        nats.append(torch.cat([n for kind, _, n in events if kind == "score"]))
    assert nats[0].numel() == 160
    assert torch.equal(nats[0][:t], nats[1][:t])  # targets 0..t-1 are tokens 1..t
    assert not torch.allclose(nats[0][t:], nats[1][t:])
    inputs = torch.tensor(tokens[None, :16]).expand(1024, 16)
    with torch.no_grad():  # the trained model still scores a distribution over the whole vocabulary
        every_target = model.eval()(inputs, torch.arange(1024)[:, None].expand(1024, 16))
    assert torch.allclose(every_target.double().neg().exp().sum(0), torch.ones(16, dtype=torch.float64), atol=1e-5)


def test_ttt_with_zero_learning_rate_equals_the_evaluation_without_it():
    settings = ttt_settings(ttt_lr=0.0)
    tokens = np.random.default_rng(4).integers(0, 96, 8 * 16 + 1)
    model = perturbed_model(settings)
    model.recurrence_active = True
    ev = evaluator(split_of(tokens), settings)
    assert ev.evaluate_with_ttt(model, 4) == pytest.approx(ev.evaluate(model, 4), rel=1e-12)


def test_ttt_lowers_the_score_of_a_trained_tiny_model(tiny_dataset):
    settings = tiny(data_path=tiny_dataset.data_path, tokenizer_path=tiny_dataset.tokenizer_path,
                    vocab_size=tiny_dataset.vocab_size, train_seq_len=64, train_batch_tokens=512, iterations=30,
                    max_val_tokens=64 * 48, val_batch_size=64 * 8, ttt_chunk_tokens=512, ttt_lr=0.02)
    torch.manual_seed(0)
    trainer = train_gpt.Trainer(settings, cpu_runtime())
    for step in range(30):
        trainer.step(step, 1.0)
    ev = train_gpt.Evaluator(train_gpt.load_validation_split(settings),
                             train_gpt.build_byte_table(settings.tokenizer_path, settings.vocab_size), settings,
                             cpu_runtime())
    _, without = ev.evaluate(trainer.model, 16)
    _, with_ttt = ev.evaluate_with_ttt(trainer.model, 16)
    assert with_ttt < without - 0.01


def test_ttt_run_logs_both_scores_and_two_ranks_agree_with_one(tmp_path, tiny_dataset):
    """The last final exact line is the TTT score (records/ reads the last), the one before it the score
    without; two processes share each chunk and reach the same scores as one."""
    env = dict(PRESET="1.0810", NUM_LAYERS=3, RECUR_LAYERS="1", ITERATIONS=8, VAL_LOSS_EVERY=0, EVAL_STRIDE=16,
               TTT_CHUNK_TOKENS=1024, MAX_VAL_TOKENS=64 * 40)
    finals = []
    for run_id, nproc, accum in (("ttt1", 1, 2), ("ttt2", 2, 1)):
        result = run_trainer(trainer_env(tiny_dataset, RUN_ID=run_id, GRAD_ACCUM_STEPS=accum, **env), tmp_path, nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        log = read_log(tmp_path, run_id)
        assert values(log, r"^eval_pass:ttt stride:16 window:64 epochs:3 lr:0.005 chunk_tokens:1024$")
        finals.append([float(v) for v in values(log, r"^final_int6_brotli_roundtrip_exact val_loss:\S+ val_bpb:(\S+)")])
    assert len(finals[0]) == 2 and finals[0][1] < finals[0][0]
    assert finals[1] == pytest.approx(finals[0], rel=1e-4)
