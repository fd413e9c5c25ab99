"""A run's long stages report progress as they run (a line at each tenth and after 30 quiet seconds; a bar on a
terminal), each stage logs its time as it ends (so a killed run keeps them), and the run ends with one summary line."""
from __future__ import annotations

import io
import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import train_gpt
from conftest import REPO, read_log, run_trainer, trainer_env
from test_cuda_paths_on_cpu import cpu_runtime, perturbed_model, tiny
from test_final_evaluation import StubEvaluator

sys.path.insert(0, str(REPO / "records"))
import run_log  # noqa: E402


def fake_clock(monkeypatch) -> list:
    clock = [0.0]
    monkeypatch.setattr(train_gpt, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock


def counts_logged(total: int, seconds_per_item: float, monkeypatch) -> list[str]:
    """The progress lines of a stage of `total` items, each taking `seconds_per_item` on a fake clock."""
    clock, lines = fake_clock(monkeypatch), []
    progress = train_gpt.Progress(lines.append, "ttt_eval", "chunks")
    for _ in progress.over(range(total)):
        clock[0] += seconds_per_item
    return lines


def test_a_long_stage_logs_each_tenth_and_after_30_seconds_without_a_line(monkeypatch):
    lines = counts_logged(1000, 1.0, monkeypatch)
    # 30 s after the stage's start or its last line, and at each hundredth item (a tenth of 1000), seconds = items
    expected = sorted({hundred + after for hundred in range(0, 1000, 100) for after in (30, 60, 90, 100)})
    assert [int(re.match(r"progress:ttt_eval (\d+)/1000 chunks ", line)[1]) for line in lines] == expected
    assert lines[0] == "progress:ttt_eval 30/1000 chunks elapsed:30.0s remaining:~970.0s"


@pytest.mark.parametrize("total, expected", [(25, [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]), (4, [1, 2, 3, 4])])
def test_a_short_stage_logs_each_tenth_reached_once(monkeypatch, total, expected):
    lines = counts_logged(total, 0.5, monkeypatch)
    assert [int(re.match(rf"progress:ttt_eval (\d+)/{total} ", line)[1]) for line in lines] == expected


def test_done_logs_the_stage_time_and_returns_it(monkeypatch):
    clock, lines = fake_clock(monkeypatch), []
    clock[0] = 100.0
    progress = train_gpt.Progress(lines.append, "compression", note="started: int6+brotli of 36.0 MB")
    clock[0] = 112.3456
    assert progress.done() == pytest.approx(12345.6)
    assert lines == ["progress:compression started: int6+brotli of 36.0 MB", "stage:compression time:12346ms"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("rank_0", [True, False])
def test_on_a_terminal_rank_0_draws_a_bar_and_the_lines_go_to_the_log_file(tmp_path, monkeypatch, rank_0):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdout", Terminal())
    log = train_gpt.RunLog("bar", is_master=rank_0)
    progress = train_gpt.Progress(log, "validation")
    list(progress.over(range(20)))
    progress.done()
    terminal = sys.stdout.getvalue()
    if rank_0:
        log.file.close()
        lines = (tmp_path / "logs" / "bar.txt").read_text().splitlines()
        assert [line.split()[1] for line in lines[:-1]] == [f"{2 * k}/20" for k in range(1, 11)]
        assert re.search(r"validation: +\d+%\|", terminal)  # tqdm's bar
        assert "progress:" not in terminal and re.search(r"\rstage:validation time:\d+ms\n$", terminal)  # bar gone
    else:
        assert terminal == "" and not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------------------------
# A tiny run with every stage: GPTQ, the round trip, then test-time training.

def every_stage_env(dataset, run_id: str, **overrides) -> dict:
    """PRESET=1.0810 (TTT in chunks of the split; the default's LoRA TTT logs batches: tests/test_lora_ttt.py)."""
    return trainer_env(dataset, **{**dict(PRESET="1.0810", RECUR_LAYERS="1", RUN_ID=run_id, ITERATIONS=6,
                                          VAL_LOSS_EVERY=3, MAX_VAL_TOKENS=16384, EVAL_STRIDE=32, TTT_EPOCHS=1,
                                          TTT_CHUNK_TOKENS=1024, GPTQ_CALIBRATION_BATCHES=12), **overrides})


@pytest.fixture(scope="module")
def every_stage_run(tmp_path_factory, tiny_dataset):
    cwd = tmp_path_factory.mktemp("every_stage")
    result = run_trainer(every_stage_env(tiny_dataset, "stages"), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(cwd, "stages")
    return SimpleNamespace(cwd=cwd, stdout=result.stdout, lines=log.split("\nend_of_source\n", 1)[1].splitlines())


def test_each_stage_logs_its_time_as_it_ends(every_stage_run):
    lines, position = every_stage_run.lines, 0
    for stage, next_line in [("warmup_compile", "progress:validation "), ("validation", "step:0/6 val_loss:"),
                             ("final_validation", "step:6/6 val_loss:"), ("gptq_calibration", "progress:rounding "),
                             ("rounding", "progress:compression started: int6+brotli of "),
                             ("compression", "gptq: "), ("roundtrip_eval", "final_int6_brotli_roundtrip "),
                             ("ttt_eval", "final_int6_brotli_roundtrip ")]:
        found = next(i for i in range(position, len(lines)) if lines[i].startswith(f"stage:{stage} "))
        assert re.fullmatch(rf"stage:{stage} time:\d+ms", lines[found])
        assert lines[found + 1].startswith(next_line), (stage, lines[found + 1])
        position = found + 1


def test_progress_lines_come_at_each_tenth_of_each_stage(every_stage_run):
    totals = {}
    for line in every_stage_run.lines:
        if m := re.fullmatch(r"progress:(\w+) (\d+)/(\d+) (\w+) elapsed:\d+\.\ds remaining:~\d+\.\ds", line):
            totals.setdefault((m[1], int(m[3]), m[4]), []).append(int(m[2]))
    # validation: 16384 tokens in windows of 64, 8 per batch; test-time training: chunks of 1024 tokens
    stages = {(stage, total, unit) for stage, total, unit in totals}
    assert {("validation", 32, "batches"), ("final_validation", 32, "batches"), ("gptq_calibration", 12, "batches"),
            ("roundtrip_eval", 32, "batches"), ("ttt_eval", 16, "chunks")} < stages
    assert any(stage == "rounding" and unit == "tensors" for stage, _, unit in stages)
    for (stage, total, _), counts in totals.items():  # the tiny run's stages last far less than 30 s
        tenths = sorted({math.ceil(k * total / 10) for k in range(1, 11)})
        assert counts == tenths * counts.count(total), stage  # the validation at step 3 repeats step 0's


def test_progress_and_stage_lines_look_like_no_score_or_step_line(every_stage_run):
    for line in every_stage_run.lines:
        if line.startswith(("progress:", "stage:", "summary:")):
            assert not any(p.match(line) for p in (run_log.STEP_LINE, run_log.SCORE_LINE, run_log.EVAL_PASS_LINE,
                                                   run_log.ERROR_LINE, run_log.GPTQ_LINE)), line
    run = run_log.read_run_log(every_stage_run.cwd / "logs" / "stages.txt")
    assert [name for name, _ in run.eval_passes_ms] == ["roundtrip", "ttt"]


def total_bytes(lines: list[str]) -> int:
    (total,) = [int(m[1]) for line in lines if (m := re.match(r"Total submission size int6\+brotli: (\d+) bytes", line))]
    return total


def test_the_run_ends_with_a_summary_of_score_bytes_and_paths(every_stage_run):
    lines, total = every_stage_run.lines, total_bytes(every_stage_run.lines)
    bpb = [m[1] for line in lines if (m := re.match(r"final_int6_brotli_roundtrip_exact .*val_bpb:(\S+)", line))][-1]
    assert lines[-1] == (f"summary: val_bpb {bpb} (ttt pass val_scope:prefix), artifact {total:,} bytes (fits "
                         f"under 16,000,000) = logs/stages.int6.ptz + train_gpt.py, log logs/stages.txt")
    assert (every_stage_run.cwd / "logs" / "stages.int6.ptz").is_file()
    assert every_stage_run.stdout.splitlines()[-1] == lines[-1]


def test_the_summary_of_an_artifact_over_the_cap_says_it_is_no_valid_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(train_gpt, "ARTIFACT_CAP_BYTES", 1000)
    settings, lines = tiny(export_quant="rtn", run_id="over", ttt_epochs=0, eval_stride=0), []
    model = perturbed_model(settings)
    summary = train_gpt.export_and_rescore(SimpleNamespace(model=model, compiled=model), StubEvaluator([0.0], 1.0),
                                           (b"code", b"code"), "", {"training": 0.0}, lines.append, settings,
                                           cpu_runtime())
    total = total_bytes(lines)
    assert total > 1000
    assert summary == (f"summary: val_bpb 1.00000000 (roundtrip pass), artifact {total:,} bytes (not a valid "
                       f"submission: OVER 1,000) = logs/over.int6.ptz + train_gpt.py")


def test_the_first_line_on_the_console_names_the_log(every_stage_run):
    first = every_stage_run.stdout.splitlines()[0]
    assert re.fullmatch(r"run_id:stages started:\S+ log:logs/stages\.txt", first)


def test_a_run_killed_during_test_time_training_keeps_the_times_of_the_stages_it_finished(tmp_path, tiny_dataset):
    env = every_stage_env(tiny_dataset, "killed", TTT_EPOCHS=10)  # about a second per chunk: time to kill it mid-pass
    log_path = tmp_path / "logs" / "killed.txt"
    with open(tmp_path / "output.txt", "w") as output:
        run = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=tmp_path, stdout=output,
                               stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while run.poll() is None and time.monotonic() < deadline:
                if log_path.exists() and "\nprogress:ttt_eval " in log_path.read_text():
                    os.kill(run.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        finally:
            run.kill()
            run.wait()
    assert run.returncode == -signal.SIGKILL, (tmp_path / "output.txt").read_text()[-3000:]
    lines = log_path.read_text().split("\nend_of_source\n", 1)[1].splitlines()
    assert lines[-1].startswith("progress:ttt_eval ")  # killed mid-pass
    stages = [m[1] for line in lines if (m := re.fullmatch(r"stage:(\w+) time:\d+ms", line))]
    assert stages == ["warmup_compile", "validation", "validation", "final_validation", "gptq_calibration",
                      "rounding", "compression", "roundtrip_eval"]
    assert not any(line.startswith(("time_ledger", "summary:")) for line in lines)
