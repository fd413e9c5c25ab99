"""records/: make_submission.py and compare_runs.py on crafted logs in the trainer's format.

Every refusal is driven by a log that breaks exactly one rule; the expected statistics are
computed here by hand from the values written into the logs.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECORDS = Path(__file__).resolve().parents[1] / "records"
sys.path.insert(0, str(RECORDS))

import compare_runs  # noqa: E402
import make_submission  # noqa: E402
from run_log import read_run_log  # noqa: E402

SOURCE = '"""A stand-in trainer."""\nprint("train")\n'
TOKENS_PER_BYTE = 0.41
DATE = "2026-05-01"
FULL_SPLIT = "tokens:62021632 sha256:0123456789abcdef scope:full"


def bpb_of(val_loss: float) -> float:
    return round(val_loss / math.log(2) * TOKENS_PER_BYTE, 8)


def render_log(seed: int = 1, val_loss: float = 2.0727, *, source: str = SOURCE, steps: int = 13_780,
               train_time_ms: int = 599_990, eval_time_ms: int = 1_400, artifact_bytes: int = 15_863_489,
               code_bytes: int | None = None, val_split: str = FULL_SPLIT, export_format: str = "int8+zlib",
               final_score: bool = True, prefix: bool = False, val_bpb: float | None = None,
               settings: dict | None = None, export_lines: tuple[str, ...] = (), ttt_loss: float | None = None,
               run_id: str | None = None, device: str = "cuda name:NVIDIA H100 80GB HBM3 world_size:8",
               header_lines: tuple[str, ...] = ()) -> str:
    """A log as train_gpt.py writes it, with the given values (val_bpb: bpb_of(val_loss) unless given; the
    first training loss differs by seed, as a seed's losses do). `settings` adds to the settings line,
    `header_lines` come after it (e.g. the tokenizer line), `export_lines` before the sizes (e.g. the gptq
    line), and `ttt_loss` adds the test-time-training pass (TTT_EPOCHS=3): its announcement and its pair, the
    score."""
    code = source.encode()
    code_bytes = len(code) if code_bytes is None else code_bytes
    bpb = bpb_of(val_loss) if val_bpb is None else val_bpb
    fid, scope = export_format.replace("+", "_"), " val_scope:prefix" if prefix else ""
    step_avg = train_time_ms / steps
    run_id = f"seed{seed}" if run_id is None else run_id
    settings = {"DATA_PATH": "./data/datasets/fineweb10B_sp1024", "RUN_ID": run_id, "SEED": seed,
                "ITERATIONS": 20000, "NUM_LAYERS": 9, "TTT_EPOCHS": 0 if ttt_loss is None else 3, **(settings or {})}
    lines = [
        f"source train_gpt.py bytes:{len(code)} sha256:{hashlib.sha256(code).hexdigest()}",
        source + "end_of_source",
        f"run_id:{run_id} started:2026-05-01T10:00:00+00:00",
        f"device:{device} grad_accum_steps:1 compute_dtype:bfloat16",
        "settings:" + json.dumps(settings),
        *header_lines,
        "model_params:17059912",
        "val_split " + (val_split.replace("scope:full", "scope:prefix") if prefix else val_split),
        "warmup_step:20/20",
        f"step:0/20000 val_loss:6.9357 val_bpb:4.1077 train_time:0ms step_avg:0.00ms{scope}",
        f"step:1/20000 train_loss:{6.9357 + seed / 10_000:.4f} train_time:44ms step_avg:44.00ms",
        "an informational line the reader must skip: step:99 val_bpb:0.1",
        f"step:{steps // 2}/20000 val_loss:2.2000 val_bpb:1.3000 train_time:{train_time_ms // 2}ms "
        f"step_avg:{step_avg:.2f}ms{scope}",
        f"step:{steps}/20000 val_loss:{val_loss - 0.012:.4f} val_bpb:{bpb - 0.0072:.4f} "
        f"train_time:{train_time_ms}ms step_avg:{step_avg:.2f}ms{scope}",
        f"stopping_early: wallclock_cap train_time:{train_time_ms}ms step:{steps}/20000",
        "peak_memory allocated:10184MiB reserved:10588MiB",
        *export_lines,
        f"Serialized model {export_format}: {artifact_bytes - code_bytes} bytes (payload:17178912)",
        f"Code size: {code_bytes} bytes",
        f"Total submission size {export_format}: {artifact_bytes} bytes",
        f"final_{fid}_roundtrip val_loss:{val_loss:.4f} val_bpb:{bpb:.4f} eval_time:{eval_time_ms}ms{scope}",
    ]
    if final_score:
        lines.append(f"final_{fid}_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{bpb:.8f}{scope}")
    if ttt_loss is not None:
        lines += ["ttt_eval epochs:3 lr:0.005 chunk_tokens:32768 (score-first test-time training; the final lines "
                  "below are the run's score)",
                  f"final_{fid}_roundtrip val_loss:{ttt_loss:.4f} val_bpb:{bpb_of(ttt_loss):.4f} eval_time:420000ms",
                  f"final_{fid}_roundtrip_exact val_loss:{ttt_loss:.8f} val_bpb:{bpb_of(ttt_loss):.8f}"]
    lines.append("time_ledger warmup_compile:20000ms training:599990ms total:640000ms")
    return "\n".join(lines) + "\n"


def write_logs(folder: Path, *texts: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts, start=1):
        path = folder / f"seed{i}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def submit(tmp_path: Path, logs, *options: str, track: str = "10min_16mb") -> int:
    return make_submission.main(["--track", track, "--name", "Test Idea", "--author", "Ada Lovelace",
                                 "--github-id", "ada", "--date", DATE, "--records-dir", str(tmp_path / "records"),
                                 "--no-pack-code", *options, *map(str, logs)])  # stand-in sources: ship as run


def folder_of(tmp_path: Path, track: str = "10min_16mb") -> Path:
    return tmp_path / "records" / f"track_{track}" / f"{DATE}_Test_Idea"


def read_summary(tmp_path: Path, track: str = "10min_16mb") -> dict:
    return json.loads((folder_of(tmp_path, track) / "submission.json").read_text())


LOSSES = (2.0542, 2.0560, 2.0551)


@pytest.fixture
def three_logs(tmp_path) -> list[Path]:
    return write_logs(tmp_path / "logs", *(render_log(seed, loss) for seed, loss in zip((1, 2, 3), LOSSES)))


# ----------------------------------------------------------------------------------------------
# Reading a log.


def test_reader_takes_the_last_step_line_and_the_scored_format(tmp_path):
    text = render_log(7, 2.0, steps=4_900, train_time_ms=597_000, eval_time_ms=88_000,
                      artifact_bytes=15_900_000, export_format="int6+lzma")
    run = read_run_log(write_logs(tmp_path, text)[0])
    assert (run.seed, run.steps, run.train_time_ms, run.eval_time_ms) == (7, 4_900, 597_000, 88_000)
    assert run.step_avg_ms == pytest.approx(round(597_000 / 4_900, 2))
    assert (run.export_format_id, run.artifact_bytes, run.code_bytes) == ("int6_lzma", 15_900_000, len(SOURCE))
    assert run.pre_export_val_bpb == pytest.approx(round(bpb_of(2.0) - 0.0072, 4))
    assert [p.step for p in run.val_curve] == [0, 2_450, 4_900]
    assert run.stopped_by_wallclock_cap and run.val_scope == "full"
    assert run.tokens_per_byte == pytest.approx(TOKENS_PER_BYTE, rel=1e-7)
    assert run.source == SOURCE.encode()


def test_a_later_score_pair_of_the_same_name_is_the_score_with_its_own_eval_time(tmp_path):
    # a test-time-training score printed after the round trip's, as `final_<format>_roundtrip(_exact)` again
    ttt = ("final_int8_zlib_roundtrip val_loss:2.0500 val_bpb:1.2126 eval_time:450000ms\n"
           f"final_int8_zlib_roundtrip_exact val_loss:2.05000000 val_bpb:{bpb_of(2.05):.8f}\n")
    text = render_log(1, 2.0727).replace("time_ledger", ttt + "time_ledger")
    run = read_run_log(write_logs(tmp_path, text)[0])
    assert (run.val_loss, run.val_bpb, run.eval_time_ms) == (2.05, bpb_of(2.05), 450_000)


# ----------------------------------------------------------------------------------------------
# The folder and its contents.


def test_folder_holds_the_logs_the_source_the_summary_the_readme_and_the_plot(tmp_path, three_logs):
    assert submit(tmp_path, three_logs) == 0
    folder = folder_of(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "submission.json", "train_gpt.py", "training_curves.png", "seed1.txt", "seed2.txt", "seed3.txt"])
    for log in three_logs:
        assert (folder / log.name).read_bytes() == log.read_bytes()
    assert (folder / "train_gpt.py").read_bytes() == SOURCE.encode()
    assert (folder / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left


def test_summary_has_the_spec_keys_means_and_sample_std(tmp_path, three_logs):
    submit(tmp_path, three_logs, "--blurb", "an idea")
    summary = read_summary(tmp_path)
    assert {"author": "Ada Lovelace", "github_id": "ada", "name": "Test Idea", "blurb": "an idea", "date": DATE,
            "track": "10min_16mb", "bytes_total": 15_863_489, "bytes_code": len(SOURCE)}.items() <= summary.items()
    mean = sum(LOSSES) / 3
    assert summary["val_loss"] == pytest.approx(mean, abs=1e-8)
    assert summary["val_bpb"] == pytest.approx(sum(bpb_of(x) for x in LOSSES) / 3, abs=1e-8)
    assert summary["val_loss_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in LOSSES) / 2), rel=1e-6)
    assert [s["seed"] for s in summary["seeds"]] == [1, 2, 3]
    assert [s["val_loss"] for s in summary["seeds"]] == list(LOSSES)
    assert summary["compliance"] == {"artifact_cap_bytes": 16_000_000, "artifact_under_cap": True, "time_cap_s": 600,
                                     "train_time_under_cap": True, "train_time_within_stop_rule": True,
                                     "eval_time_under_cap": True}
    assert "comparison" not in summary


def test_bytes_total_is_the_largest_seed(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, artifact_bytes=15_000_000),
                      render_log(2, artifact_bytes=15_900_000), render_log(3, artifact_bytes=15_100_000))
    submit(tmp_path, logs)
    summary = read_summary(tmp_path)
    assert summary["bytes_total"] == 15_900_000
    assert [s["bytes_total"] for s in summary["seeds"]] == [15_000_000, 15_900_000, 15_100_000]


def test_readme_has_a_row_per_seed_from_its_log(tmp_path, three_logs):
    submit(tmp_path, three_logs)
    readme = (folder_of(tmp_path) / "README.md").read_text()
    step_avg = f"{599_990 / 13_780:.2f}"
    for seed, loss in zip((1, 2, 3), LOSSES):
        row = (f"| {seed} | 13780 | {step_avg} | {bpb_of(loss) - 0.0072:.4f} | {bpb_of(loss):.8f} | "
               f"15,863,489 | [seed{seed}.txt](seed{seed}.txt) |")
        assert row in readme
    assert "for SEED in 1 2 3; do" in readme
    assert f"torchrun --standalone --nproc_per_node=8 records/track_10min_16mb/{DATE}_Test_Idea/train_gpt.py" in readme


def test_exactly_at_the_caps_is_accepted(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, artifact_bytes=16_000_000, train_time_ms=600_000,
                                                    eval_time_ms=600_000))
    assert submit(tmp_path, logs) == 0


def test_non_record_track_accepts_long_runs_and_flags_them(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, train_time_ms=3_600_000), render_log(2, eval_time_ms=700_000))
    assert submit(tmp_path, logs, track="non_record_16mb") == 0
    compliance = read_summary(tmp_path, "non_record_16mb")["compliance"]
    assert (compliance["train_time_under_cap"], compliance["eval_time_under_cap"]) == (False, False)
    assert "training <= 600 s: **no**" in (folder_of(tmp_path, "non_record_16mb") / "README.md").read_text()


def test_force_replaces_an_existing_folder(tmp_path, three_logs):
    submit(tmp_path, three_logs[:1])
    assert submit(tmp_path, three_logs, "--force") == 0
    assert len(read_summary(tmp_path)["seeds"]) == 3


def test_a_failure_while_building_leaves_nothing_behind(tmp_path, three_logs, monkeypatch):
    def broken_plot(curves, path):
        raise RuntimeError("plotting failed")
    monkeypatch.setattr(make_submission, "save_training_figure", broken_plot)
    with pytest.raises(RuntimeError):
        submit(tmp_path, three_logs)
    assert list(folder_of(tmp_path).parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Refusals: one broken rule each, in the second of three logs.


REFUSALS = {
    "no final exact score": (dict(final_score=False), "final exact score line"),
    "prefix of the validation split": (dict(prefix=True), "prefix of the validation split"),
    "another source": (dict(source='print("other")\n'), "differs from the one in"),
    "another validation split": (dict(val_split="tokens:62021632 sha256:fedcba9876543210 scope:full"),
                                 "different validation split"),
    "artifact over the cap": (dict(artifact_bytes=16_000_001), "exceeds the cap of 16,000,000 bytes"),
    # 100 ms over 600 s is more than two of this run's 43.55 ms steps (the official stop rule's overshoot)
    "training over 600 s": (dict(train_time_ms=600_100), "training took 600,100 ms, over the 10-minute track"),
    "evaluation over 600 s": (dict(eval_time_ms=600_001), "evaluation took 600,001 ms, over the 10-minute track"),
    # the round trip's 180,001 ms and TTT's 420,000 ms: each under 600 s, together over
    "evaluation passes over 600 s together": (dict(eval_time_ms=180_001, ttt_loss=2.05),
                                              "evaluation took 600,001 ms, over the 10-minute track"),
    "code size not the source": (dict(code_bytes=len(SOURCE) + 1), "'Code size' says"),
    "a repeated seed": (dict(seed=1, run_id="seed1_again"), "SEED=1 was already run"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_a_log_that_breaks_a_rule(tmp_path, capsys, case):
    broken, message = REFUSALS[case]
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(**{"seed": 2, **broken}),
                      render_log(3, 2.07))
    assert submit(tmp_path, logs) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(logs[1]) in err and message in err
    assert not (tmp_path / "records").exists()


def test_refuses_a_log_whose_source_was_edited(tmp_path, capsys):
    text = render_log(1).replace('print("train")', 'print("tuned")')
    assert submit(tmp_path, write_logs(tmp_path / "logs", text)) == 2
    assert "does not match the sha256 of its source header" in capsys.readouterr().err


def with_code_id(text: str, code_id: str) -> str:
    """The `Code size` line as the kit writes it: with the packed size and the code's identity (its sha256)."""
    return re.sub(r"^(Code size: \d+ bytes)$", rf"\1 packed:900 code_id:{code_id}", text, flags=re.MULTILINE)


def test_a_packed_and_a_plain_run_of_one_code_id_are_the_same_code(tmp_path):
    """A packed run logs the source it unpacks (no docstrings, as ast.unparse writes it), a plain run its file."""
    logs = write_logs(tmp_path / "logs", with_code_id(render_log(1, 2.06), "ab" * 32),
                      with_code_id(render_log(2, 2.07, source="print('train')"), "ab" * 32))
    assert submit(tmp_path, logs) == 0


def test_refuses_runs_of_two_code_ids(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", with_code_id(render_log(1, 2.06), "ab" * 32),
                      with_code_id(render_log(2, 2.07, source="print('tuned')"), "cd" * 32))
    assert submit(tmp_path, logs) == 2
    assert f"{logs[1]}: its train_gpt.py differs from the one in {logs[0]}" in capsys.readouterr().err


def line_number(text: str, prefix: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if line.startswith(prefix))


def test_refuses_a_nan_score_naming_the_log_and_the_line(tmp_path, capsys):
    # a diverged run: the trainer prints nan in both final lines
    text = re.sub(r"(final_int8_zlib_roundtrip(?:_exact)? val_loss:)\S+ val_bpb:\S+", r"\1nan val_bpb:nan",
                  render_log(2))
    logs = write_logs(tmp_path / "logs", render_log(1), text)
    assert submit(tmp_path, logs) == 2
    err = capsys.readouterr().err
    exact_line = line_number(text, "final_int8_zlib_roundtrip_exact")
    assert err.startswith(f"error: {logs[1]}: line {exact_line} 'final_int8_zlib_roundtrip_exact val_loss:nan")
    assert "not a positive finite number" in err and "Traceback" not in err
    assert not (tmp_path / "records").exists()


def test_refuses_an_exact_score_its_rounded_line_contradicts(tmp_path, capsys):
    text = render_log(2, 2.0727)  # val_bpb 1.22601194, printed rounded as 1.2260 on the line before
    doctored = re.sub(r"(final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:)\S+", r"\g<1>1.20000000", text)
    logs = write_logs(tmp_path / "logs", render_log(1), doctored)
    assert submit(tmp_path, logs) == 2
    err = capsys.readouterr().err.strip()
    exact_line, rounded_line = line_number(doctored, "final_int8_zlib_roundtrip_exact"), \
        line_number(doctored, "final_int8_zlib_roundtrip ")
    assert err.startswith(f"error: {logs[1]}: line {exact_line} 'final_int8_zlib_roundtrip_exact")
    assert f"contradicts line {rounded_line} 'final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2260" in err
    assert "val_bpb 1.2 does not round to 1.2260" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "records").exists()


def test_refuses_an_exact_score_written_over_a_nan_rounded_line(tmp_path, capsys):
    text = re.sub(r"(final_int8_zlib_roundtrip val_loss:)\S+ val_bpb:\S+", r"\1nan val_bpb:nan", render_log(1))
    assert submit(tmp_path, write_logs(tmp_path / "logs", text)) == 2
    assert "val_loss 2.0727 does not round to nan (the log was edited)" in capsys.readouterr().err


def test_an_exact_score_that_rounds_to_its_rounded_line_is_accepted(tmp_path):
    text = render_log(1, 2.0727)
    exact = re.search(r"final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", text).group(1)
    nudged = text.replace(f"val_bpb:{exact}", f"val_bpb:{float(exact) + 0.00003:.8f}")  # 1.2260 still, rounded
    assert submit(tmp_path, write_logs(tmp_path / "logs", nudged)) == 0


def test_refuses_an_existing_folder_and_leaves_it_alone(tmp_path, three_logs, capsys):
    submit(tmp_path, three_logs[:2])
    before = (folder_of(tmp_path) / "submission.json").read_bytes()
    assert submit(tmp_path, three_logs) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (folder_of(tmp_path) / "submission.json").read_bytes() == before


def test_command_line_refusal_exits_non_zero(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, final_score=False))
    result = subprocess.run([sys.executable, str(RECORDS / "make_submission.py"), "--track", "10min_16mb",
                             "--name", "x", "--author", "a", "--github-id", "a",
                             "--records-dir", str(tmp_path / "records"), str(logs[0])],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"error: {logs[0]}: no final exact score line" in result.stderr


# ----------------------------------------------------------------------------------------------
# Significance against a record.


def one_sample_p(improvements, margin):
    """One-sided p of H0 mean <= margin for 3 seeds: Student's t with 2 degrees of freedom, closed form."""
    mean = sum(improvements) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in improvements) / 2)
    t = (mean - margin) / (sd / math.sqrt(3))
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def test_compare_to_a_val_bpb_tests_the_improvement_in_nats(tmp_path, three_logs, capsys):
    record_bpb = 1.2244
    assert submit(tmp_path, three_logs, "--compare-to", str(record_bpb)) == 0
    comparison = read_summary(tmp_path)["comparison"]
    record_nats = record_bpb * math.log(2) / TOKENS_PER_BYTE
    improvements = [record_nats - loss for loss in LOSSES]
    assert comparison["improvement_nats"] == pytest.approx(sum(improvements) / 3, rel=1e-6)
    assert comparison["improvement_bpb"] == pytest.approx(record_bpb - sum(bpb_of(x) for x in LOSSES) / 3, rel=1e-6)
    assert comparison["p_value"] == pytest.approx(one_sample_p(improvements, 0.005), rel=1e-5)
    assert comparison["p_value"] < 0.01 and comparison["significant"] is True
    assert comparison["rule"]["unit"] == "nats" and comparison["rule"]["min_delta"] == 0.005
    assert comparison["rule"]["alpha"] == 0.01
    assert comparison["rule"]["test"] == "one-sample"
    assert capsys.readouterr().out.splitlines()[-2:][1].startswith("SIGNIFICANT IMPROVEMENT: significant")
    readme = (folder_of(tmp_path) / "README.md").read_text()
    assert "H0: improvement <= 0.005 nats; H1: improvement > 0.005 nats; required: one-sided p < 0.01" in readme


def test_a_claim_that_is_not_significant_is_written_and_says_so(tmp_path, three_logs, capsys):
    # the same logs, held to a larger margin
    assert submit(tmp_path, three_logs, "--compare-to", "1.2244", "--min-delta-nats", "0.014", "--alpha", "0.05") == 0
    comparison = read_summary(tmp_path)["comparison"]
    record_nats = 1.2244 * math.log(2) / TOKENS_PER_BYTE
    expected_p = one_sample_p([record_nats - loss for loss in LOSSES], 0.014)
    assert expected_p > 0.05
    assert comparison["p_value"] == pytest.approx(expected_p, rel=1e-5)
    assert comparison["significant"] is False
    assert comparison["rule"]["h0"] == "improvement <= 0.014 nats" and comparison["rule"]["alpha"] == 0.05
    assert "NOT A SIGNIFICANT IMPROVEMENT" in capsys.readouterr().out
    assert "**not significant: improvement" in (folder_of(tmp_path) / "README.md").read_text()


def test_one_seed_cannot_be_tested(tmp_path, three_logs):
    assert submit(tmp_path, three_logs[:1], "--compare-to", "1.2244") == 0
    comparison = read_summary(tmp_path)["comparison"]
    assert comparison["p_value"] is None and comparison["significant"] is False
    assert comparison["verdict"] == "not significant: needs >= 2 seeds"
    assert read_summary(tmp_path)["val_loss_std"] is None


def test_compare_to_a_record_with_seeds_uses_welch(tmp_path, three_logs):
    record_bpbs = [1.2244, 1.2251, 1.2236, 1.2262]
    record = tmp_path / "best_record"
    record.mkdir()
    (record / "submission.json").write_text(json.dumps(
        {"val_bpb": sum(record_bpbs) / 4, "seeds": [{"seed": i, "val_bpb": b} for i, b in enumerate(record_bpbs)]}))
    assert submit(tmp_path, three_logs, "--compare-to", str(record)) == 0
    comparison = read_summary(tmp_path)["comparison"]
    # Welch by hand: the record's seeds in nats of these logs' split, against the logs' val_loss
    a, b = [x * math.log(2) / TOKENS_PER_BYTE - 0.005 for x in record_bpbs], list(LOSSES)
    ma, mb = sum(a) / 4, sum(b) / 3
    va = sum((x - ma) ** 2 for x in a) / 3 / 4
    vb = sum((x - mb) ** 2 for x in b) / 2 / 3
    t, df = (ma - mb) / math.sqrt(va + vb), (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    from scipy.special import betainc
    assert comparison["p_value"] == pytest.approx(0.5 * betainc(df / 2, 0.5, df / (df + t * t)), rel=1e-4)
    assert comparison["improvement_nats"] == pytest.approx(ma + 0.005 - mb, rel=1e-6)
    assert (comparison["rule"]["test"], comparison["baseline_seeds"]) == ("welch", 4)


def test_compare_to_a_folder_made_by_the_tool_reads_its_seeds(tmp_path, three_logs):
    baseline_logs = write_logs(tmp_path / "baseline_logs", render_log(4, 2.0727), render_log(5, 2.0735))
    submit(tmp_path, baseline_logs, track="non_record_16mb")
    assert submit(tmp_path, three_logs, "--compare-to", str(folder_of(tmp_path, "non_record_16mb"))) == 0
    comparison = read_summary(tmp_path)["comparison"]
    assert (comparison["rule"]["test"], comparison["baseline_seeds"]) == ("welch", 2)
    assert comparison["baseline_val_bpb"] == pytest.approx((bpb_of(2.0727) + bpb_of(2.0735)) / 2, abs=1e-8)


def test_compare_to_a_record_with_only_a_mean_takes_it_as_exact(tmp_path, three_logs):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "submission.json").write_text(json.dumps({"val_bpb": 1.2244, "val_loss": 2.0727}))
    submit(tmp_path, three_logs, "--compare-to", str(tmp_path / "old"))
    comparison = read_summary(tmp_path)["comparison"]
    assert comparison["rule"]["test"] == "one-sample" and comparison["baseline_seeds"] is None


def test_refuses_a_baseline_that_is_neither_a_number_nor_a_record(tmp_path, three_logs, capsys):
    assert submit(tmp_path, three_logs, "--compare-to", str(tmp_path / "nowhere")) == 2
    assert "neither a val_bpb number nor a record folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# compare_runs.py: ablations.


def compare_output(capsys, a, b) -> str:
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b)]) == 0
    return capsys.readouterr().out


def test_compare_reports_the_improvement_with_a_welch_interval(tmp_path, capsys):
    a = write_logs(tmp_path / "a", *(render_log(s, x) for s, x in ((1, 2.10), (2, 2.11), (3, 2.12))))
    b = write_logs(tmp_path / "b", *(render_log(s, x, run_id=f"b{s}") for s, x in ((1, 2.08), (2, 2.09), (3, 2.10))))
    out = compare_output(capsys, a, b)
    nats = re.search(r"nats per token\s+([-+.\d]+)\s+95% CI \[([-+.\d]+), ([-+.\d]+)\]\s+"
                     r"t = (\S+), df = (\S+), p \(two-sided\) = (\S+)", out)
    # equal spreads (sd 0.01) and 3 seeds a side: Welch has 4 degrees of freedom, t = 0.02 / se
    se = math.sqrt(2 * 0.01 ** 2 / 3)
    t = 0.02 / se
    p = 1 - 0.75 * (t / math.sqrt(1 + t * t / 4)) * (1 - t * t / (12 * (1 + t * t / 4)))
    assert float(nats.group(1)) == pytest.approx(0.02, abs=1e-5)
    assert float(nats.group(2)) == pytest.approx(0.02 - 2.776 * se, abs=2e-5)
    assert float(nats.group(3)) == pytest.approx(0.02 + 2.776 * se, abs=2e-5)
    assert (float(nats.group(4)), float(nats.group(5))) == (pytest.approx(t, abs=0.01), 4.0)
    assert float(nats.group(6)) == pytest.approx(p, rel=1e-2)
    bpb = re.search(r"bits per byte\s+([-+.\d]+)", out)
    assert float(bpb.group(1)) == pytest.approx(0.02 / math.log(2) * TOKENS_PER_BYTE, abs=1e-5)


def test_compare_across_tokenizers_reports_only_bits_per_byte(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.10), render_log(2, 2.11))
    other_split = "tokens:40540160 sha256:aaaaaaaaaaaaaaaa scope:full"
    b = write_logs(tmp_path / "b", render_log(1, 3.0, val_split=other_split, run_id="b1"),
                   render_log(2, 3.01, val_split=other_split, run_id="b2"))
    out = compare_output(capsys, a, b)
    assert "nats per token   n/a: the groups scored different validation splits" in out
    assert re.search(r"bits per byte\s+[-+.\d]+\s+95% CI", out)


def test_compare_accepts_prefix_scored_ablations(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.10, prefix=True), render_log(2, 2.11, prefix=True))
    b = write_logs(tmp_path / "b", render_log(1, 2.09, prefix=True, run_id="b1"),
                   render_log(2, 2.10, prefix=True, run_id="b2"))
    assert "scope:prefix" in compare_output(capsys, a, b)


def test_compare_refuses_a_group_with_mixed_splits(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1), render_log(2, prefix=True))
    b = write_logs(tmp_path / "b", render_log(1, 2.05, run_id="b1"), render_log(2, 2.06, run_id="b2"))
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b)]) == 2
    assert f"error: {a[1]} scored a different validation split" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# No score of a failed or cut-off run, of mixed settings, or over the budget with GPTQ.

import run_log  # noqa: E402

TTT_ERROR = ("error: the test-time-training score of logs/seed2.int8.ptz.unscored (kept, no submission) is not "
             "finite (val_loss:nan val_bpb:nan): settings changed from PRESET=strong: TTT_LR=1e+30: undo or reduce "
             "them")


def run_tool(tool: str, tmp_path: Path, logs: list[Path]) -> int:
    if tool == "run_log":
        return run_log.main(list(map(str, logs)))
    if tool == "compare_runs":
        return compare_runs.main(["--a", str(logs[0]), "--b", *map(str, logs[1:])])
    return submit(tmp_path, logs)


def cut_after(text: str, prefix: str) -> str:
    """The log up to and including its last line that starts with `prefix`: a run killed there."""
    lines = text.splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith(prefix))
    return "".join(lines[:last + 1])


def refused_by(tool, tmp_path, capsys, logs, *messages) -> str:
    assert run_tool(tool, tmp_path, logs) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {logs[-1]}: ") and len(err.strip().splitlines()) == 1, err
    for message in messages:
        assert message in err
    assert not (tmp_path / "records").exists()
    return err


TOOLS = ["run_log", "make_submission", "compare_runs"]


@pytest.mark.parametrize("tool", TOOLS)
def test_a_run_that_ended_in_an_error_is_refused_by_every_tool(tmp_path, capsys, tool):
    # TTT_LR=1e30: the round-trip pair was logged, then TTT announced, then its score was not finite
    text = cut_after(render_log(2, ttt_loss=2.05), "ttt_eval") + TTT_ERROR + "\n"
    logs = write_logs(tmp_path / "logs", render_log(1, ttt_loss=2.04), text)
    refused_by(tool, tmp_path, capsys, logs, f"line {len(text.splitlines())} 'error: the test-time-training score",
               "the run ended in an error")


@pytest.mark.parametrize("tool", TOOLS)
def test_an_error_line_anywhere_refuses_a_log_whose_score_lines_are_complete(tmp_path, capsys, tool):
    logs = write_logs(tmp_path / "logs", render_log(1), render_log(2) + "error: cannot write logs/seed2.txt\n")
    refused_by(tool, tmp_path, capsys, logs, "the run ended in an error")


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("cut", ["ttt_eval", "final_int8_zlib_roundtrip "])  # the TTT pass begun; half its pair
def test_a_log_cut_off_during_the_ttt_pass_is_refused(tmp_path, capsys, tool, cut):
    logs = write_logs(tmp_path / "logs", render_log(1, ttt_loss=2.04),
                      cut_after(render_log(2, ttt_loss=2.05), cut))
    refused_by(tool, tmp_path, capsys, logs, "begins the 'ttt' evaluation pass", "never follows")


@pytest.mark.parametrize("tool", TOOLS)
def test_a_log_whose_settings_say_ttt_but_that_has_no_ttt_pass_is_refused(tmp_path, capsys, tool):
    text = cut_after(render_log(2, settings={"TTT_EPOCHS": 3}), "final_int8_zlib_roundtrip_exact")  # before TTT
    logs = write_logs(tmp_path / "logs", render_log(1, ttt_loss=2.04), text)
    refused_by(tool, tmp_path, capsys, logs, "its settings say TTT_EPOCHS=3, but no test-time-training pass")


def announced_passes_log(seed: int, cut_in: str | None = None) -> str:
    """A log of the trainer announcing each final pass (`eval_pass:<name>`), cut in the pass `cut_in`."""
    losses = {"roundtrip": 2.09, "sliding": 2.07, "ttt": 2.05}
    passes = []
    for name, loss in losses.items():
        passes.append(f"eval_pass:{name}")
        passes.append(f"final_int6_lzma_roundtrip val_loss:{loss:.4f} val_bpb:{bpb_of(loss):.4f} eval_time:9000ms")
        if name == cut_in:
            break
        passes.append(f"final_int6_lzma_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb_of(loss):.8f}")
    text = render_log(seed, 2.09, export_format="int6+lzma", settings={"TTT_EPOCHS": 3}, final_score=False)
    text = re.sub(r"^final_int6_lzma_roundtrip .*\n", "", text, flags=re.MULTILINE)
    return text.replace("time_ledger", "\n".join(passes) + ("\neval_total:27000ms\ntime_ledger" if not cut_in else ""))


def test_announced_passes_each_with_its_pair_are_accepted_and_the_last_pair_is_the_score(tmp_path):
    run = read_run_log(write_logs(tmp_path, announced_passes_log(1))[0])
    assert (run.val_loss, run.val_bpb, run.eval_time_ms) == (2.05, bpb_of(2.05), 9000)


@pytest.mark.parametrize("cut_in", ["roundtrip", "sliding", "ttt"])
def test_any_announced_pass_without_its_pair_is_refused(tmp_path, cut_in):
    path = write_logs(tmp_path, announced_passes_log(1, cut_in))[0]
    with pytest.raises(run_log.Refusal, match=rf"begins the '{cut_in}' evaluation pass, but its score pair"):
        read_run_log(path)


def test_a_kit_log_cut_in_the_middle_of_its_last_line_is_refused(tmp_path):
    text = render_log(1).removesuffix("\n")  # the time ledger line was being written
    with pytest.raises(run_log.Refusal, match="ends in the middle of a line"):
        read_run_log(write_logs(tmp_path, text)[0])


# Seeds of one submission share their settings.

def test_seeds_with_different_settings_are_refused_naming_the_settings(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", render_log(1, ttt_loss=2.04),
                      render_log(2, settings={"EVAL_STRIDE": 64}), render_log(3, ttt_loss=2.06))
    err = refused_by("make_submission", tmp_path, capsys, logs[:2], f"differ from those of {logs[0]}",
                     "EVAL_STRIDE=64 (vs unset), TTT_EPOCHS=0 (vs 3)", "--allow-mixed-settings")
    assert "SEED" not in err.split("only")[0] and "RUN_ID=" not in err


def test_mixed_settings_are_accepted_on_request_and_the_readme_gives_each_seed_its_command(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, ttt_loss=2.04), render_log(2), render_log(3, ttt_loss=2.06))
    assert submit(tmp_path, logs, "--allow-mixed-settings") == 0
    readme = (folder_of(tmp_path) / "README.md").read_text()
    script = f"records/track_10min_16mb/{DATE}_Test_Idea/train_gpt.py"
    for seed, ttt_epochs in ((1, 3), (2, 0), (3, 3)):
        assert re.search(rf"^RUN_ID=reproduce_seed{seed}_\$\(date \+%Y%m%d_%H%M%S\) SEED={seed} .*\bTTT_EPOCHS={ttt_epochs} torchrun "
                         rf"--standalone --nproc_per_node=8 {script}$", readme, re.MULTILINE)
    assert "for SEED in" not in readme and "differ between the seeds (--allow-mixed-settings): TTT_EPOCHS" in readme


def test_compare_runs_refuses_a_group_with_mixed_settings_unless_allowed(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.06), render_log(2, 2.08, settings={"MATRIX_LR": 0.03}))
    b = write_logs(tmp_path / "b", render_log(1, 2.0, run_id="b1"), render_log(2, 2.01, run_id="b2"))
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b)]) == 2
    assert f"error: {a[1]}: its settings or training data differ from those of {a[0]}: MATRIX_LR=0.03 (vs unset)" in \
        capsys.readouterr().err
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b), "--allow-mixed-settings"]) == 0


# GPTQ's time counts in the training budget; the published split only on the 10-minute track.

def gptq_line(gptq_ms: int, train_time_ms: int) -> str:
    return f"gptq: {gptq_ms}ms (calibration and rounding) train_time+gptq:{gptq_ms + train_time_ms}ms"


def test_training_plus_gptq_over_the_cap_is_refused(tmp_path, capsys):
    # 590,000 + 10,500 ms: 500 ms over 600 s, more than two of this run's 42.82 ms steps
    text = render_log(2, train_time_ms=590_000, export_lines=(gptq_line(10_500, 590_000),))
    logs = write_logs(tmp_path / "logs", render_log(1), text)
    refused_by("make_submission", tmp_path, capsys, logs,
               "training plus GPTQ took 600,500 ms (train_time 590,000 ms, GPTQ 10,500 ms), over the 10-minute track")


def test_the_trainers_over_the_cap_warning_is_read_without_a_gptq_line(tmp_path, capsys):
    warning = ("WARNING: training plus GPTQ took 600900ms, over MAX_WALLCLOCK_SECONDS; raise GPTQ_RESERVE_SECONDS "
               "above 10")
    logs = write_logs(tmp_path / "logs", render_log(1), render_log(2, export_lines=(warning,)))
    refused_by("make_submission", tmp_path, capsys, logs, "training plus GPTQ took 600,900 ms")


def test_training_plus_gptq_within_the_cap_is_accepted_and_reported(tmp_path):
    text = render_log(1, train_time_ms=588_000, export_lines=(gptq_line(9_000, 588_000),))
    logs = write_logs(tmp_path / "logs", text)
    assert submit(tmp_path, logs) == 0
    summary = read_summary(tmp_path)
    assert summary["seeds"][0]["gptq_time_ms"] == 9_000 and summary["compliance"]["train_time_under_cap"] is True


def test_training_plus_gptq_within_the_stop_rule_overshoot_is_accepted_with_a_warning(tmp_path):
    # 590,000 + 10,050 ms: 50 ms over, within two 42.82 ms steps after a wallclock stop
    text = render_log(1, train_time_ms=590_000, export_lines=(gptq_line(10_050, 590_000),))
    logs = write_logs(tmp_path / "logs", text)
    assert submit(tmp_path, logs) == 0
    assert read_summary(tmp_path)["warnings"][0].startswith("seed1.txt: training plus GPTQ took 600,050 ms")


UNPUBLISHED = ("WARNING: 1000448 validation tokens is not the published split's count (62021632, 63779840): do not "
               "compare this score with records")


def test_an_unpublished_split_is_refused_on_the_10_minute_track_only(tmp_path, capsys):
    text = render_log(2).replace("model_params:", UNPUBLISHED + "\nmodel_params:")
    logs = write_logs(tmp_path / "logs", render_log(1).replace("model_params:", UNPUBLISHED + "\nmodel_params:"),
                      text)
    assert submit(tmp_path, logs) == 2
    assert capsys.readouterr().err.startswith(f"error: {logs[0]}: the trainer warned that its validation split")
    assert submit(tmp_path, logs, track="non_record_16mb") == 0
