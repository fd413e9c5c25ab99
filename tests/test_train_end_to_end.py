"""train_gpt.py run as users run it, on a tiny model and tiny shards, on CPU."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_log, run_trainer, trainer_env

SPEC_LINES = {  # SPEC.md "Log lines that people's scripts parse"
    "train": r"^step:\d+/\d+ train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    "val": r"^step:\d+/\d+ val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    "serialized": r"^Serialized model int8\+zlib: \d+ bytes",
    "total": r"^Total submission size int8\+zlib: \d+ bytes$",
    "final": r"^final_int8_zlib_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms$",
    "final_exact": r"^final_int8_zlib_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$",
}


def values(log: str, pattern: str) -> list:
    """Matches in the log's lines after the embedded source."""
    return re.findall(pattern, log.split("\nend_of_source\n", 1)[1], flags=re.MULTILINE)


def train_losses(log: str) -> list[float]:
    return [float(v) for v in values(log, r"^step:\d+/\d+ train_loss:(\S+)")]


def final_exact(log: str) -> tuple[float, float]:
    (loss, bpb), = values(log, r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)")
    return float(loss), float(bpb)


def run_ok(tmp_path, dataset, run_id: str, nproc: int = 1, **overrides) -> str:
    result = run_trainer(trainer_env(dataset, RUN_ID=run_id, **overrides), tmp_path, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_log(tmp_path, run_id)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dataset):
    cwd = tmp_path_factory.mktemp("tiny_run")
    return cwd, run_ok(cwd, tiny_dataset, "tiny", ITERATIONS=30, VAL_LOSS_EVERY=15)


def test_tiny_run_logs_every_spec_line(tiny_run):
    _, log = tiny_run
    for name, pattern in SPEC_LINES.items():
        assert values(log, pattern), f"no {name} line matching {pattern}"
    assert log.rstrip().splitlines()[-2].startswith("time_ledger warmup_compile:")  # before the summary


def test_tiny_run_loss_falls(tiny_run):
    _, log = tiny_run
    losses = train_losses(log)
    val_bpbs = [float(v) for v in values(log, r"^step:\d+/\d+ val_loss:\S+ val_bpb:(\S+)")]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < losses[0] - 1.0
    # Both later scores below the first, one of them by a bit per byte; not necessarily the last below the middle one:
    # the data is the repository's own text, whose validation documents (a fifth of them) may drift away from the
    # training ones as it grows.
    assert len(val_bpbs) == 3 and val_bpbs[0] > max(val_bpbs[1:]) and val_bpbs[0] > min(val_bpbs[1:]) + 1.0


def test_roundtrip_score_is_close_to_the_pre_export_score(tiny_run):
    _, log = tiny_run
    pre_export = float(values(log, r"^step:30/30 val_loss:\S+ val_bpb:(\S+)")[0])
    _, roundtrip = final_exact(log)
    assert abs(roundtrip - pre_export) < 0.02


def test_artifact_sizes_add_up(tiny_run):
    cwd, log = tiny_run
    (model_bytes,) = values(log, r"^Serialized model int8\+zlib: (\d+) bytes")
    ((code_bytes, packed_bytes),) = values(log, r"^Code size: (\d+) bytes packed:(\d+) ")
    (total,) = values(log, r"^Total submission size int8\+zlib: (\d+) bytes")
    assert int(model_bytes) == (Path(cwd) / "logs" / "tiny.int8.ptz").stat().st_size
    assert int(code_bytes) == (REPO / "train_gpt.py").stat().st_size
    assert int(total) == int(model_bytes) + int(packed_bytes)  # EXPORT_PACKED_CODE=1: the code as shipped


def test_log_embeds_the_exact_source(tiny_run):
    _, log = tiny_run
    header = re.match(r"source train_gpt.py bytes:(\d+) sha256:([0-9a-f]{64})\n", log)
    source = log.encode("utf-8")[header.end():header.end() + int(header.group(1))]
    assert source == (REPO / "train_gpt.py").read_bytes()
    assert log.encode("utf-8")[header.end() + len(source):].startswith(b"end_of_source\n")


def test_two_processes_train_the_same_math_as_one(tmp_path, tiny_dataset):
    one = run_ok(tmp_path, tiny_dataset, "one", ITERATIONS=6, GRAD_ACCUM_STEPS=2)
    two = run_ok(tmp_path, tiny_dataset, "two", nproc=2, ITERATIONS=6, GRAD_ACCUM_STEPS=1)
    assert "world_size:2" in two
    assert train_losses(one) == pytest.approx(train_losses(two), abs=2e-4)
    assert final_exact(one) == pytest.approx(final_exact(two), rel=1e-5)


def test_warmup_steps_are_undone(tmp_path, tiny_dataset):
    cold = run_ok(tmp_path, tiny_dataset, "cold", ITERATIONS=6, WARMUP_STEPS=0)
    warm = run_ok(tmp_path, tiny_dataset, "warm", ITERATIONS=6, WARMUP_STEPS=3)
    assert "warmup_step:3/3" in warm
    assert train_losses(cold) == train_losses(warm)
    assert final_exact(cold) == final_exact(warm)


@pytest.mark.parametrize("nproc", [1, 2])  # two ranks must agree on the step to stop after
def test_wallclock_cap_stops_training_and_still_exports(tmp_path, tiny_dataset, nproc):
    log = run_ok(tmp_path, tiny_dataset, "capped", nproc=nproc, ITERATIONS=1_000_000, MAX_WALLCLOCK_SECONDS=1.5,
                 TRAIN_LOG_EVERY=50, VAL_LOSS_EVERY=0)
    (train_ms, step), = values(log, r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/1000000$")
    assert 1000 < int(train_ms) <= 1500 and 0 < int(step) < 1_000_000  # the last step ends inside the cap
    assert values(log, SPEC_LINES["final_exact"])


def test_non_finite_loss_stops_the_run_without_export(tmp_path, tiny_dataset):
    result = run_trainer(trainer_env(tiny_dataset, RUN_ID="diverged", TIED_EMBED_LR="1e30", SCALAR_LR="1e30"),
                         tmp_path)
    assert result.returncode != 0
    assert "NaN or inf" in result.stderr
    assert not list((Path(tmp_path) / "logs").glob("*.ptz"))


def test_prefix_scores_are_marked_on_every_val_line(tmp_path, tiny_dataset):
    log = run_ok(tmp_path, tiny_dataset, "prefix", ITERATIONS=3, MAX_VAL_TOKENS=1024)
    assert "val_split tokens:1024 " in log and "scope:prefix" in log
    val_lines = values(log, r"^.*val_bpb:.*$")
    assert len(val_lines) >= 4 and all(line.endswith(" val_scope:prefix") for line in val_lines)


def test_unpublished_validation_split_is_flagged(tiny_run):
    _, log = tiny_run
    assert values(log, r"^WARNING: \d+ validation tokens is not the published split's count")


def test_missing_data_stops_with_the_download_command(tmp_path, tiny_dataset):
    result = run_trainer(trainer_env(tiny_dataset, RUN_ID="nodata", DATA_PATH=tmp_path / "empty"), tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: no val shards match" in result.stderr and "data/cached_challenge_fineweb.py" in result.stderr


def test_default_tiny_run_exports_int6_brotli_and_is_scored_by_lora_ttt(tmp_path, tiny_dataset):
    sys.path.insert(0, str(REPO / "records"))
    from run_log import read_run_log
    log = run_ok(tmp_path, tiny_dataset, "default", PRESET="strong", NUM_LAYERS=3, RECUR_LAYERS="1",
                 PARALLEL_START_LAYER=2, ITERATIONS=12, VAL_LOSS_EVERY=0, EMA_DECAY=0.9, MAX_VAL_TOKENS=8192)
    assert values(log, r"^recurrence:on layers:1 step:5$")  # 5 / 12 >= RECUR_START_FRAC=0.35 > 4 / 12
    assert values(log, r"^ema:applied decay:0.9$")
    assert values(log, r"^train_data: packed documents; the shards repeat after \d+ steps$")
    assert values(log, r"^eval_pass:roundtrip stride:64 window:64 packed_rows:512$")  # VAL_BATCH_SIZE / 8
    assert values(log, r"^eval_pass:ttt stride:48 window:64 lora_rank:96 ")  # the score: documents' chunks of 48
    (model_bytes,) = values(log, r"^Serialized model int6\+brotli: (\d+) bytes")
    (total,) = values(log, r"^Total submission size int6\+brotli: (\d+) bytes$")
    assert int(model_bytes) == (tmp_path / "logs" / "default.int6.ptz").stat().st_size
    ((code_bytes, packed_bytes),) = values(log, r"^Code size: (\d+) bytes packed:(\d+) ")
    assert int(code_bytes) == (REPO / "train_gpt.py").stat().st_size
    assert int(total) == int(model_bytes) + int(packed_bytes)  # EXPORT_PACKED_CODE=1: the code as shipped
    assert values(log, r"^final_int6_brotli_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms "
                       r"val_scope:prefix$")
    run = read_run_log(tmp_path / "logs" / "default.txt")  # the records/ tools read it as any other format
    assert (run.export_format_id, run.artifact_bytes, run.score_pass) == ("int6_brotli", int(total), "ttt")
    assert 0 < run.val_bpb < 10
