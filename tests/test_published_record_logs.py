"""run_log.py on the published records' own logs (../shared/reference): scripts that print no `_exact` line, train
times in minutes on step lines, seeds in a Hyperparameters block, unix times before every line.

Every expected figure is read by hand from the logs' text and written here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_records import RECORDS  # noqa: F401  (puts records/ on sys.path)

from run_log import Refusal, read_run_log  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference")

# (log, its last final line's name, val_loss, val_bpb, eval_time ms, seed): the lines at the end of each log.
PUBLISHED_SCORES = [
    ("record_2026-04-09_sp8192_1.0810/train_seed42.log", "quantized_ttt", 2.79180191, 1.08079352, 366_525, 42),
    ("record_2026-04-09_sp8192_1.0810/train_seed314.log", "quantized_ttt", 2.79241542, 1.08103103, 368_074, 314),
    ("record_2026-04-09_sp8192_1.0810/train_seed999.log", "quantized_ttt", 2.79281076, 1.08118408, 318_003, 999),
    ("record_2026-04-10_sp8192_1.0734/logs/train0.txt", "quantized_ttt_lora", 2.77059090, 1.07258208, 338_190, 0),
    ("record_2026-04-10_sp8192_1.0734/logs/train1.txt", "quantized_ttt_lora", 2.77230836, 1.07324696, 343_324, 1),
    ("record_2026-04-10_sp8192_1.0734/logs/train2.txt", "quantized_ttt_lora", 2.77493185, 1.07426259, 312_976, 2),
    ("record_2026-04-16_sp8192_1.0714/train_seed0.log", "quantized_ttt_lora", 2.76751616, 1.07139175, 234_066, 0),
    ("record_2026-04-16_sp8192_1.0714/train_seed1337.log", "quantized_ttt_lora", 2.76539833, 1.07057187, 237_699, 1337),
    ("record_2026-04-16_sp8192_1.0714/train_seed42.log", "quantized_ttt_lora", 2.76962517, 1.07220821, 228_818, 42),
]


@needs_reference
@pytest.mark.parametrize("log, name, val_loss, val_bpb, eval_ms, seed", PUBLISHED_SCORES,
                         ids=[case[0] for case in PUBLISHED_SCORES])
def test_a_published_log_without_exact_lines_is_scored_by_its_last_final_line(log, name, val_loss, val_bpb, eval_ms,
                                                                             seed):
    run = read_run_log(REFERENCE / log)
    assert (run.score_line, run.val_loss, run.val_bpb, run.eval_time_ms, run.seed) == (
        name, val_loss, val_bpb, eval_ms, seed)


@needs_reference
def test_a_published_log_takes_its_train_time_from_the_stopping_line():
    # `stopping_early: wallclock_cap train_time: 588047ms step: 4550/20000`; the step lines say `train_time: 9.7m`
    run = read_run_log(REFERENCE / "record_2026-04-09_sp8192_1.0810/train_seed42.log")
    assert (run.train_time_ms, run.steps, run.iterations, run.stopped_by_wallclock_cap) == (588_047, 4550, 20000, True)


@needs_reference
def test_the_seed_of_a_hyperparameters_block_is_the_logs_own():
    # `  seed: 1` in its Hyperparameters block; no seed in its file name
    run = read_run_log(REFERENCE / "record_2026-04-10_sp8192_1.0734/logs/train1.txt")
    assert (run.seed, run.seed_from) == (1, "seed line")


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_diagnostic_passes_are_not_the_score(tmp_path):
    log = write(tmp_path / "train.log", [
        "stopping_early: wallclock_cap train_time: 587193ms step: 4867/20000",
        "diagnostic pre-quantization post-ema val_loss:2.76877360 val_bpb:1.07184400 eval_time:5993ms",
        "quantized_ttt_lora val_loss:2.77059090 val_bpb:1.07258208 eval_time:338190ms",
        "diagnostic quantized val_loss:2.79823422 val_bpb:1.08324876 eval_time:45933ms",
    ])
    run = read_run_log(log)
    assert (run.score_line, run.val_bpb) == ("quantized_ttt_lora", 1.07258208)


def test_a_log_of_lines_with_unix_times_is_read(tmp_path):
    log = write(tmp_path / "train0.txt", [
        "1776143349.278 stopping_early: wallclock_cap train_time: 587091ms step: 4832/20000",
        "1776143444.369 Total submission size quantized+brotli: 15996697 bytes",
        "1776144156.999 quantized_ttt_phased val_loss:2.76951521 val_bpb:1.07216564 eval_time:500104ms",
    ])
    run = read_run_log(log)
    assert (run.train_time_ms, run.artifact_bytes, run.score_line, run.val_bpb, run.eval_time_ms) == (
        587_091, 15_996_697, "quantized_ttt_phased", 1.07216564, 500_104)


def test_a_log_with_no_score_line_names_the_score_line_option(tmp_path):
    log = write(tmp_path / "train.log", [
        "stopping_early: wallclock_cap train_time: 587091ms step: 4832/20000",
        "diagnostic quantized val_loss:2.79823422 val_bpb:1.08324876 eval_time:45933ms",
    ])
    with pytest.raises(Refusal, match="--score-line NAME"):
        read_run_log(log)
