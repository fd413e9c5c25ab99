"""Settings come from the environment; a bad value stops the run with an error naming the variable."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO
from train_gpt import Settings, SettingsError


@pytest.mark.parametrize("env, variable", [
    ({"ITERATIONS": "abc"}, "ITERATIONS"),
    ({"MODEL_DIM": "-4"}, "MODEL_DIM"),
    ({"MODEL_DIM": "500"}, "MODEL_DIM"),  # not a multiple of NUM_HEADS=8
    ({"MODEL_DIM": "48", "NUM_HEADS": "16", "NUM_KV_HEADS": "4"}, "MODEL_DIM"),  # odd head dim: RoPE pairs
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"MODEL_DIM": "64", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "ROPE_DIMS"),  # 16 rotary dims, heads of 8
    ({"MUON_MOMENTUM": "1.5"}, "MUON_MOMENTUM"),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, "MAX_WALLCLOCK_SECONDS"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"DEVICE": "tpu"}, "DEVICE"),
    ({"MATRIX_LR": "fast"}, "MATRIX_LR"),
    ({"RUN_ID": "../escape"}, "RUN_ID"),
    ({"NUM_LOOPS": "-1"}, "NUM_LOOPS"),
    ({"SKIP_GATES": "2"}, "SKIP_GATES"),
    ({"ORTHO_INIT": "3"}, "ORTHO_INIT"),
    ({"ATTENTION": "flash"}, "ATTENTION"),
    ({"SMEAR_BOS_MASK": "2"}, "SMEAR_BOS_MASK"),
    ({"GATE_ATTN_OUT": "2"}, "GATE_ATTN_OUT"),
    ({"PARALLEL_START_LAYER": "11", "PARALLEL_LAST_N": "0"}, "PARALLEL_START_LAYER"),  # no such block
    ({"PARALLEL_LAST_N": "4"}, "PARALLEL_START_LAYER"),  # 8 with PARALLEL_LAST_N=4's one-lane parallel blocks
    ({"PARALLEL_START_LAYER": "4", "PARALLEL_LAST_N": "0"}, "PARALLEL_START_LAYER"),  # inside RECUR_LAYERS=3,4,5
    ({"EMBED_WEIGHT_DECAY": "-0.1"}, "EMBED_WEIGHT_DECAY"),
    ({"SCALAR_WEIGHT_DECAY": "-0.1"}, "SCALAR_WEIGHT_DECAY"),
    ({"TTT_METHOD": "sgd"}, "TTT_METHOD"),
    ({"TTT_CHUNK_TOKENS": "4096"}, "TTT_CHUNK_TOKENS"),  # tokens of a document in a window of TRAIN_SEQ_LEN=2048
    ({"TTT_LORA_RANK": "0"}, "TTT_LORA_RANK"),
    ({"TTT_BETA2": "1"}, "TTT_BETA2"),
])
def test_bad_setting_is_rejected_with_its_name(env, variable):
    with pytest.raises(SettingsError, match=rf"^{variable}="):
        Settings.from_env(env)


def test_batch_that_does_not_split_into_sequences_and_ranks_is_rejected():
    settings = Settings.from_env({"PRESET": "1.0810", "TRAIN_BATCH_TOKENS": str(516 * 1024), "TRAIN_SEQ_LEN": "1024"})
    settings.check_batch_layout(world_size=4, grad_accum_steps=1)  # 516 sequences split over 4 ranks
    with pytest.raises(SettingsError, match=r"TRAIN_BATCH_TOKENS=528384 .* 1024 x 8 x 1 = 8192"):
        settings.check_batch_layout(world_size=8, grad_accum_steps=1)


def test_empty_values_fall_back_to_defaults():
    assert Settings.from_env({"ITERATIONS": "", "SEED": " "}) == Settings()


def test_baseline_preset_is_the_reference_baseline():
    s = Settings.from_env({"PRESET": "baseline"})
    assert (s.num_layers, s.model_dim, s.num_heads, s.num_kv_heads, s.mlp_mult, s.vocab_size) == (9, 512, 8, 4, 2, 1024)
    assert (s.train_batch_tokens, s.train_seq_len, s.warmdown_iters, s.warmup_steps) == (524_288, 1024, 1200, 20)
    assert (s.matrix_lr, s.scalar_lr, s.tied_embed_lr, s.muon_momentum, s.max_wallclock_seconds) == \
        (0.04, 0.04, 0.05, 0.95, 600.0)
    assert sum(p.numel() for p in train_gpt.GPT(s).parameters()) == 17_059_912  # SPEC.md


def test_script_exits_with_the_error_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, capture_output=True,
                            text=True, env={"ITERATIONS": "abc", "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "error: ITERATIONS='abc' is not a valid int" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_lr_warmdown_follows_whichever_end_comes_first():
    by_steps = Settings.for_preset("baseline", iterations=1000, warmdown_iters=100, max_wallclock_seconds=0)
    assert train_gpt.lr_multiplier(800, 0, by_steps) == 1.0
    assert train_gpt.lr_multiplier(950, 0, by_steps) == pytest.approx(0.5)
    by_clock = Settings.for_preset("baseline", iterations=10**6, warmdown_iters=100, max_wallclock_seconds=10)
    # 10 ms per step so far: 100 warmdown steps take 1000 ms, so the warmdown starts 1 s before the cap.
    assert train_gpt.lr_multiplier(500, 5000, by_clock) == 1.0
    assert train_gpt.lr_multiplier(950, 9500, by_clock) == pytest.approx(0.5)
    assert train_gpt.lr_multiplier(1000, 10_000, by_clock) == 0.0


def test_muon_momentum_warms_up_linearly():
    s = Settings.for_preset("baseline", muon_momentum=0.95, muon_momentum_warmup_start=0.85,
                            muon_momentum_warmup_steps=500)
    assert [train_gpt.muon_momentum(k, s) for k in (0, 250, 500, 900)] == pytest.approx([0.85, 0.90, 0.95, 0.95])


# Empty means what a setting's help says it means: a text setting set empty is empty.

@pytest.mark.parametrize("preset", ["strong", "baseline"])
def test_empty_recur_layers_turns_recurrence_off_in_every_preset(preset):
    settings = Settings.from_env({"PRESET": preset, "RECUR_LAYERS": ""})
    assert (settings.recur_layers, settings.recur_layer_ids) == ("", [])


def test_empty_paths_and_run_id_take_their_documented_defaults():
    settings = Settings.from_env({"DATA_PATH": "", "TOKENIZER_PATH": " ", "RUN_ID": "", "PRESET": ""})
    assert (settings.data_path, settings.tokenizer_path, settings.run_id, settings.preset) == \
        ("./data/datasets/fineweb10B_sp8192", "./data/tokenizers/fineweb_8192_bpe.model", "", "strong")


def test_empty_choice_is_refused_naming_the_choices():
    with pytest.raises(SettingsError, match=r"^DEVICE='' is invalid: it must be one of auto, cuda, cpu, mps"):
        Settings.from_env({"DEVICE": ""})


# Whole numbers are taken as they are: a seed never wraps onto another seed's run, no number overflows unnamed.

@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**64 - 1), str(2**64)])  # -1 and 2**64-1: one torch run
def test_a_seed_numpy_or_torch_would_refuse_or_wrap_is_refused_naming_seed(seed):
    with pytest.raises(SettingsError, match=rf"^SEED={seed} is invalid: it must be a whole number in \[0, 2\*\*32 - 1\]"):
        Settings.from_env({"SEED": seed})


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_the_ends_of_the_seed_range_are_seeds_as_they_are(seed):
    assert Settings.from_env({"SEED": str(seed)}).seed == seed
    np.random.seed(seed)  # numpy's legacy seeding takes exactly [0, 2**32 - 1]
    assert torch.manual_seed(seed).initial_seed() == seed


INT_SETTINGS = [f.name.upper() for f in dataclasses.fields(Settings) if f.type == "int"]


@pytest.mark.parametrize("variable", INT_SETTINGS)
def test_every_whole_number_setting_beyond_64_bits_is_refused_with_its_name(variable):
    with pytest.raises(SettingsError, match=rf"^{variable}={2**64} is invalid"):
        Settings.from_env({variable: str(2**64)})


@pytest.mark.parametrize("run_id", ["a\nstep:7/400 val_loss:1.0", "seed 1", ".hidden", "-x", "..", "naïve", "a/b",
                                    "tab\tx", "r" * 201])
def test_a_run_id_beyond_letters_digits_dot_underscore_and_dash_is_refused(run_id):
    rule = r"1 to 200 letters, digits, '\.', '_' or '-', not starting with '\.' or '-'"
    with pytest.raises(SettingsError, match=rf"^RUN_ID=.* is invalid: it must be {rule}"):
        Settings.from_env({"RUN_ID": run_id})


@pytest.mark.parametrize("run_id", ["seed1", "y.int6", "A-b_C.9", "_x", "r" * 200])
def test_a_run_id_of_safe_characters_is_accepted(run_id):
    assert Settings.from_env({"RUN_ID": run_id}).run_id == run_id
