"""bench/gpu_check.py: its dry run on the CPU writes a report with a status for every step; its parts
(log facts, the reference comparison, shards, failures, limits) behave as the report says."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from bench import gpu_check
from conftest import REPO, SHARED_DATA

RECORD_1_0714 = REPO.parent / "shared" / "reference" / "record_2026-04-16_sp8192_1.0714"

STATUSES = {"ok", "failed", "timeout", "skipped", "not_possible"}  # and "running" while a step runs


@pytest.fixture(scope="module")
def dry_run_report(tmp_path_factory) -> tuple[dict, Path]:
    """One dry run for the module (the slowest test here: about 30 s of CPU time, 4 to 7 child processes)."""
    out = tmp_path_factory.mktemp("gpu_check")
    data = ["--data", str(SHARED_DATA)] if SHARED_DATA.exists() else []
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), "--dry-run",
                           *data], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out


def test_dry_run_reports_a_status_for_every_step(dry_run_report):
    report, out = dry_run_report
    assert report["dry_run"] is True
    assert list(report["steps"]) == list(gpu_check.STEPS)
    assert all(step["status"] in STATUSES and "seconds" in step for step in report["steps"].values())
    markdown = (out / "report.md").read_text()
    assert all(f"| {name} | **" in markdown for name in gpu_check.STEPS)


def test_dry_run_runs_every_step_on_the_cpu(dry_run_report):
    steps = dry_run_report[0]["steps"]
    assert steps["environment"]["status"] == "ok" and steps["environment"]["facts"]["cuda_available"] is False
    attention = steps["environment"]["facts"]["attention"]  # the trainer's call (or its stand-in) timed on the CPU
    for form in ("dense", "varlen"):
        assert attention["kernels"][form]["sdpa_flash"]["forward_ms"] > 0
        assert "error" in attention["kernels"][form]["sdpa_cudnn"]  # no cuDNN on a CPU
    assert steps["cuda_tests"]["status"] == "skipped"  # collected, and skipped on the CPU
    assert steps["cuda_tests"]["counts"]["skipped"] >= 5 and steps["cuda_tests"]["counts"]["failed"] == 0
    assert steps["throughput"]["status"] == "ok"
    assert set(steps["throughput"]["runs"]) == {"baseline", "strong", "strong_recurrence"}
    assert steps["throughput"]["runs"]["strong_recurrence"]["measured"]["depth_recurrence"] is True
    assert steps["timed_run"]["status"] == "ok"
    assert steps["multi_rank"]["status"] == "not_possible"


def test_dry_run_timed_run_goes_through_export_and_the_round_trip_within_its_cap(dry_run_report):
    facts = dry_run_report[0]["steps"]["timed_run"]["facts"]
    assert facts["stopped_by_wallclock_cap"] and facts["train_time_within_cap"]
    assert facts["final_scores"] and list(facts["eval_passes"]) == ["roundtrip", "ttt"]  # the default: TTT on
    assert facts["artifact"]["total_bytes"] > facts["artifact"]["model_bytes"] > 0
    assert facts["artifact"]["over_the_cap"] is False  # the warning text in the logged source does not count


# ---- the parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, blocks", [("strong", (7, 6)), ("1.0810", (6, 0)), ("baseline", (2, 0))])
def test_a_dry_run_of_each_preset_has_just_enough_blocks_for_its_recurrence_and_lanes(preset, blocks):
    """The default: RECUR_LAYERS 3,4,5 need blocks 0-5, and its two residual lanes one block past them (block 6);
    PRESET=1.0810 has no such lanes, the baseline no recurrence (2 blocks: an encoder and a decoder one)."""
    variables = gpu_check.dry_run_blocks(train_gpt.Settings.for_preset(preset))
    assert (int(variables["NUM_LAYERS"]), int(variables["PARALLEL_START_LAYER"])) == blocks
    train_gpt.Settings.from_env({"PRESET": preset, **gpu_check.DRY_RUN_ENV, **variables})  # valid: no SettingsError

LOG_LINES = """val_split tokens:1048576 sha256:0123456789abcdef scope:full
warmup_step:20/20
step:100/20000 train_loss:3.0000 train_time:119000ms step_avg:1190.00ms
stopping_early: wallclock_cap train_time:121500ms step:102/20000
step:102/20000 val_loss:3.1000 val_bpb:1.9000 train_time:121500ms step_avg:1191.18ms
peak_memory allocated:30000MiB reserved:32000MiB
export_fit: 16100000 bytes > 16000000; now int6 matrices, int5 MLP matrices
Serialized model int6+lzma: 15900000 bytes (path:logs/x.int6.ptz)
Total submission size int6+lzma: 15960000 bytes
eval_pass:sliding stride:64 window:2048
final_int6_lzma_roundtrip val_loss:3.2000 val_bpb:1.9500 eval_time:2000ms
final_int6_lzma_roundtrip_exact val_loss:3.20000000 val_bpb:1.95000000
eval_total:2000ms
time_ledger warmup_compile:80000ms training:121500ms validation:3000ms export:40000ms roundtrip_eval:2000ms total:250000ms
"""


def test_timed_run_log_facts_flag_a_train_time_over_the_cap_and_a_stepped_down_export():
    facts = gpu_check.read_timed_run_log(LOG_LINES, cap_s=120)
    assert (facts["train_time_ms"], facts["steps"], facts["train_time_within_cap"]) == (121500, 102, False)
    assert facts["warmup_compile_ms"] == 80000
    assert facts["artifact"]["export_fit_steps"] == ["16100000 bytes > 16000000; now int6 matrices, int5 MLP matrices"]
    assert not facts["artifact"]["fit_without_stepping_down"] and not facts["artifact"]["over_the_cap"]
    assert (facts["artifact"]["model_bytes"], facts["artifact"]["total_bytes"]) == (15_900_000, 15_960_000)


def test_a_vocabulary_without_a_published_split_is_projected_on_the_default_split():
    assert gpu_check.full_split_tokens(2048) == gpu_check.full_split_tokens(8192) == 40_540_160
    assert gpu_check.full_split_tokens(1024) == 62_021_632


def test_reference_is_1_505m_tokens_per_s_per_gpu_at_mfu_0_199():
    ref = gpu_check.reference_figures()
    # 524,288 tokens / 43.54 ms / 8 GPUs; 130,547,712 FLOPs per token (bench/README.md) / 989.4 TFLOP/s
    assert ref["tokens_per_s_per_gpu"] == 1_505_191
    assert ref["mfu"] == pytest.approx(130_547_712 * 1_505_190.6 / 989.4e12, abs=1e-4)
    assert ref["same_work_on_1_gpu_ms_per_step"] == pytest.approx(348.32)


def test_throughput_comparison_is_the_ratio_of_tokens_per_s_per_device():
    measured = {"tokens_per_s_per_device": 752_595.3, "mfu": 0.1, "ms_per_step": {"median": 696.6}}
    comparison = gpu_check.compare_with_reference(measured)
    assert comparison["ratio_to_reference_tokens_per_s_per_gpu"] == pytest.approx(0.5, abs=1e-4)
    assert comparison["ms_per_step"] == 696.6


def test_shards_come_from_the_sample_text_with_the_tokenizer_the_settings_name(tmp_path, tiny_dataset):
    data = tmp_path / "data"
    (data / "tokenizers").mkdir(parents=True)
    (data / "tokenizers" / "tiny_bpe.model").write_bytes(Path(tiny_dataset.tokenizer_path).read_bytes())
    (data / "sample.txt").write_text("\n".join(tiny_dataset.docs))
    settings = train_gpt.Settings(vocab_size=tiny_dataset.vocab_size, tokenizer_path="./elsewhere/tiny_bpe.model")
    made = gpu_check.make_shards(settings, data, tmp_path / "shards", np.array([300, 340]), 640, train_tokens=5000)
    val = train_gpt.read_shard(tmp_path / "shards" / "fineweb_val_000000.bin")
    train = train_gpt.read_shard(tmp_path / "shards" / "fineweb_train_000000.bin")
    assert made["tokenizer_path"] == str(data / "tokenizers" / "tiny_bpe.model") and "tokenized" in made["source"]
    assert (val.size, train.size) == (641, 5000) and train[0] == 1  # documents start with BOS
    assert np.flatnonzero(val == 1).tolist() == [0, 300, 640]  # two documents of 300 and 340 tokens, then a BOS
    assert max(val.max(), train.max()) < tiny_dataset.vocab_size


def test_without_data_the_validation_documents_are_random_byte_ids_the_trainer_counts_right(tmp_path):
    settings = train_gpt.Settings(vocab_size=1024)
    made = gpu_check.make_shards(settings, None, tmp_path, np.array([100, 156]), 256, train_tokens=1000)
    table = train_gpt.build_byte_table(made["tokenizer_path"], 1024)
    val = train_gpt.read_shard(tmp_path / "fineweb_val_000000.bin")
    assert "random" in made["source"] and table.base_bytes[-256:].tolist() == [1] * 256
    assert np.flatnonzero(val == 1).tolist() == [0, 100, 256] and val[val != 1].min() >= 1024 - 256
    split = train_gpt.ValidationSplit(val, True)
    checked = train_gpt.Settings(vocab_size=1024, tokenizer_path=made["tokenizer_path"], data_path=str(tmp_path))
    train_gpt.check_split_fits_tokenizer(split, table, checked)  # raises where the bytes are miscounted
    train_gpt.check_byte_accounting(split, table, checked)


def test_the_validation_split_holds_documents_of_the_given_lengths_as_the_trainer_finds_them():
    lengths = np.array([5, 70, 17, 2])
    tokens = gpu_check.document_split(np.arange(2, 50), lengths, int(lengths.sum()))
    assert np.flatnonzero(tokens == train_gpt.BOS_ID).tolist() == [0, 5, 75, 92, 94]
    assert train_gpt.ttt_documents(tokens).tolist() == gpu_check.split_documents(lengths).tolist() == [
        [0, 6], [5, 71], [75, 18], [92, 3]]  # each through the next BOS
    assert gpu_check.document_split(np.arange(2, 50), lengths, 40).tolist() == tokens[:41].tolist()  # cut to 40 + 1


def make_check(tmp_path, budget_s: float = 600) -> gpu_check.Check:
    args = argparse.Namespace(dry_run=True, budget_s=budget_s, data=None, session=False)
    return gpu_check.Check(tmp_path, tmp_path, args)


def test_a_failing_step_is_recorded_and_the_next_step_still_runs(tmp_path):
    check = make_check(tmp_path)

    def broken(check, limit_s):
        raise RuntimeError("no kernel image")

    check.run_step("environment", broken)
    check.run_step("multi_rank", gpu_check.step_multi_rank)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"]["environment"]["status"] == "failed"
    assert "RuntimeError: no kernel image" in report["steps"]["environment"]["error"]
    assert report["steps"]["multi_rank"]["status"] == "not_possible"


def test_a_step_that_no_longer_fits_the_budget_is_skipped_and_says_why(tmp_path):
    check = make_check(tmp_path, budget_s=8)
    check.run_step("throughput", lambda check, limit_s: pytest.fail("must not run"))
    step = json.loads((tmp_path / "report.json").read_text())["steps"]["throughput"]
    assert step["status"] == "skipped" and "--budget-s" in step["error"]


# A child that prints its pid (and its child's) and sleeps past any limit; its child sleeps too, in the child's
# session or, as torchrun starts its worker, in a session of its own, its output closed (no pipe keeps it known).
SLEEPER = """import os, subprocess, sys, time
pids = [os.getpid()]
if sys.argv[1] != "alone":
    pids.append(subprocess.Popen(["sleep", "600"], start_new_session=sys.argv[1] == "own session",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)
print(*pids, flush=True)
time.sleep(600)
"""


def running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] not in "ZX"  # a zombie has ended
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
@pytest.mark.parametrize("grandchild", ["alone", "same session", "own session"])
def test_a_command_past_its_limit_ends_with_every_process_it_started(tmp_path, grandchild):
    output = tmp_path / "output.txt"
    run = gpu_check.run_command([sys.executable, "-c", SLEEPER, grandchild], {"PATH": "/usr/bin:/bin"}, tmp_path,
                                limit_s=3, output=output)
    pids = [int(pid) for pid in output.read_text().split()]  # written to the file as the child ran
    try:
        assert run["timed_out"] and len(pids) == (1 if grandchild == "alone" else 2)
        for _ in range(50):  # SIGKILL is delivered asynchronously
            if not any(map(running, pids)):
                break
            time.sleep(0.1)
        assert [pid for pid in pids if running(pid)] == []
    finally:
        for pid in filter(running, pids[1:]):  # a survivor must not outlive a failed test
            os.kill(pid, signal.SIGKILL)


def test_the_session_refuses_to_start_without_brotli(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.train_gpt, "brotli", None)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--session", "--dry-run", "--out", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("error: the brotli package is missing") and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before anything was written or timed


def test_unknown_step_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x", "--only", "environment,warp_speed"])
    assert gpu_check.parse_args(["--out", "x", "--only", "timed_run"]).only == ["timed_run"]


# ---- the one-call session (--session) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def session_report(tmp_path_factory) -> tuple[dict, Path]:
    """The session's dry run: its steps at toy sizes on the CPU, the projections computed from toy figures."""
    out = tmp_path_factory.mktemp("session")
    data = ["--data", str(SHARED_DATA)] if SHARED_DATA.exists() else []
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), "--dry-run",
                           "--session", *data], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out


def test_session_runs_environment_timed_run_and_cuda_tests_in_order_and_reports_each(session_report):
    report, out = session_report
    assert report["session"] is True and list(report["steps"]) == ["environment", "timed_run", "cuda_tests"]
    steps = report["steps"]
    assert [steps[name]["status"] for name in gpu_check.SESSION_STEPS] == ["ok", "ok", "skipped"]
    assert steps["cuda_tests"]["counts"]["skipped"] == 3  # the flash kernel, fp32 refused, CUDA eval = CPU eval
    assert all(f"| {name} | **" in (out / "report.md").read_text() for name in gpu_check.SESSION_STEPS)
    assert {"environment_output.txt", "timed_run_output.txt", "cuda_tests_output.txt"} <= {
        p.name for p in out.iterdir()}  # each child's output, written under --out


def test_session_timed_run_is_trimmed_to_fit_a_cold_start(session_report):
    timed = session_report[0]["steps"]["timed_run"]
    for variable in ("WARMUP_STEPS=4", "GPTQ_CALIBRATION_BATCHES=8", "EXPORT_FORMAT=int6+zlib", "EXPORT_FIT_CAP=0"):
        assert variable in timed["command"].split()  # 8 batches: one 8-GPU rank's share of the default's 64
    assert timed["command"].endswith(" python3 train_gpt.py")  # one process, no launcher
    assert timed["facts"]["artifact"]["format"] == "int6+zlib"


def test_session_timed_run_times_the_defaults_passes_and_projects_them_to_8_gpus(session_report):
    timed = session_report[0]["steps"]["timed_run"]
    assert "TORCH_LOGS=recompiles" in timed["command"] and "EVAL_SLIDING" not in timed["command"]
    assert list(timed["facts"]["eval_passes"]) == ["roundtrip", "ttt"]  # the default's: packed rows, then LoRA TTT
    evaluation = timed["projection_8xh100"]["evaluation"]
    seconds = evaluation["seconds_8_gpus"]
    assert set(seconds) == {"roundtrip", "ttt"}
    assert evaluation["total_s"] == pytest.approx(sum(seconds.values()), abs=0.11)
    ttt = evaluation["measured_1_gpu"]["ttt"]
    batch = int(gpu_check.DRY_RUN_ENV["TTT_BATCH_SIZE"])
    assert (ttt["documents"], ttt["batches"]) == (gpu_check.SPLIT_TTT_BATCHES[True] * batch, 2)  # whole batches
    assert ttt["seconds"] > 0 and ttt["model_tokens"] > 0
    assert evaluation["scaled_8_gpus"]["ttt"]["full_split_modeled"]["documents"] == 50_000
    assert timed["facts"]["gptq_ms"] > 0 and timed["facts"]["recompiles"] == 0  # no compiling on the CPU


def test_the_timed_runs_documents_are_whole_batches_evenly_spaced_over_the_modeled_split():
    """The default: 12 of the modeled split's 781 whole batches of 64 documents, the middle one of each twelfth:
    batches (2j + 1) x 781 // 24 = 32, 97, ..., 748; a token or three added to documents make whole sequences."""
    settings = train_gpt.Settings()
    variables, lengths, val_tokens = gpu_check.timed_run_split(settings, dry_run=False)
    modeled = gpu_check.modeled_document_lengths(settings.vocab_size)
    picked = [32, 97, 162, 227, 292, 357, 423, 488, 553, 618, 683, 748]
    added = lengths - np.concatenate([modeled[64 * b:64 * (b + 1)] for b in picked])
    assert variables == {} and len(lengths) == 12 * 64 and val_tokens == lengths.sum()
    assert val_tokens % 2048 == 0 and 0 <= added.min() and added.max() <= 3


def test_full_ttt_chunk_on_one_gpu_is_one_ranks_share_of_an_8_gpu_chunk():
    settings = train_gpt.Settings.for_preset("1.0810")  # TTT_METHOD=full
    variables, _, val_tokens = gpu_check.timed_run_split(settings, dry_run=False)
    chunk = settings.ttt_chunk_tokens // 8  # 32,768 / 8 = 4,096: 2 sequences of 2,048
    assert variables == {"TTT_CHUNK_TOKENS": chunk} and val_tokens == gpu_check.SPLIT_TTT_CHUNKS[False] * chunk


def test_modeled_document_lengths_have_the_full_splits_mean_and_the_1_0714_records_batches():
    """50,000 documents of 40,540,160 tokens in all (sp8192). The record's logs give, for the TTT batches their rank 0
    ran (64 documents of similar length, sorted by length), the shortest and longest document (its doc_len counts the
    next BOS): from batch 100 of 782 to 781 the modeled documents lie within a factor 1.25 of them. Not modeled as
    closely: the shortest 8% (the model's are shorter: cheap batches) and the 16 longest (26,524-79,464 tokens)."""
    from download_hf_docs_and_tokenize import DEFAULT_NUM_VAL_DOCS
    lengths = gpu_check.modeled_document_lengths(8192)
    assert len(lengths) == DEFAULT_NUM_VAL_DOCS == 50_000 and (np.diff(lengths) >= 0).all()
    assert lengths.sum() == pytest.approx(40_540_160, rel=1e-3)
    logs = sorted(RECORD_1_0714.glob("train_seed*.log"))
    if not logs:
        pytest.skip(f"needs {RECORD_1_0714} (the record's logs)")
    text = "".join(log.read_text() for log in logs)
    batches = {int(b): (int(lo), int(hi)) for b, lo, hi in re.findall(
        r"^ttt_progress: batch (\d+)/782 .* doc_len:(\d+)-(\d+)$", text, re.MULTILINE)}
    assert len(batches) > 200
    for b, (lo, hi) in batches.items():
        modeled = lengths[64 * (b - 1):64 * b] + 1
        assert b < 100 or b > 781 or (lo / 1.25 <= modeled.min() and modeled.max() <= 1.25 * hi), (b, lo, hi)


def test_record_evaluation_seconds_are_those_of_the_1_0714_records_logs():
    logs = sorted(RECORD_1_0714.glob("train_seed*.log"))
    if not logs:
        pytest.skip(f"needs {RECORD_1_0714} (the record's logs)")
    text = "".join(log.read_text() for log in logs)
    seconds = {name: [int(ms) / 1000 for ms in re.findall(rf"^{line} val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms$",
                                                          text, re.MULTILINE)]
               for name, line in (("roundtrip", "diagnostic quantized"), ("ttt", "quantized_ttt_lora"))}
    assert [len(s) for s in seconds.values()] == [3, 3]
    assert gpu_check.RECORD_EVAL_S == {name: (round(min(s), 1), round(max(s), 1)) for name, s in seconds.items()}


def test_ttt_batch_costs_are_the_costs_the_trainer_shares_among_ranks(monkeypatch):
    """Documents of 2, 5, 17, 33, 49, 64, 70 and 130 tokens (targets), chunks of 16, windows of 64, batches of 3:
    [2, 5, 17] takes 2 chunk steps of widths 16 and 32: 3 x 48 = 144; [33, 49, 64] 4 steps, 16 + 32 + 48 + 64: 480;
    [70, 130] 9 steps, 16 + 32 + 48 + 6 x 64: 2 x 480 = 960."""
    settings = train_gpt.Settings(train_seq_len=64, ttt_chunk_tokens=16, ttt_batch_size=3, vocab_size=64)
    lengths = np.array([5, 70, 17, 130, 33, 2, 64, 49])
    split = train_gpt.ValidationSplit(gpu_check.document_split(np.arange(2, 60), lengths, int(lengths.sum())), True)
    ones = np.ones(64, np.int64)
    runtime = train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.float32, False, False)
    evaluator = train_gpt.Evaluator(split, train_gpt.ByteTable(ones, ones == 0, ones == 0), settings, runtime)
    evaluator.adapted_batch_sums = lambda *args: torch.ones(3, dtype=torch.float64)  # the costs alone, no model
    shared = []
    monkeypatch.setattr(train_gpt, "share_by_cost", lambda costs, ranks: shared.append(list(costs)) or [[0, 1, 2]])
    evaluator.evaluate_with_lora_ttt(torch.nn.Linear(1, 1))
    batches = train_gpt.ttt_batches(train_gpt.ttt_documents(split.tokens), 3)
    assert shared == [train_gpt.ttt_batch_costs(batches, 16, 64)] == [[144, 480, 960]]


SESSION_LOG = """step:1/20000 train_loss:9.0 train_time:1500ms step_avg:1500.00ms
step:2/20000 train_loss:8.0 train_time:2500ms step_avg:1250.00ms
step:3/20000 train_loss:7.0 train_time:3400ms step_avg:1133.33ms
step:4/20000 train_loss:7.0 train_time:4300ms step_avg:1075.00ms
step:5/20000 train_loss:7.0 train_time:5200ms step_avg:1040.00ms
recurrence:on layers:3,4,5 step:5
step:6/20000 train_loss:6.0 train_time:6500ms step_avg:1083.33ms
step:7/20000 train_loss:6.0 train_time:7700ms step_avg:1100.00ms
step:8/20000 train_loss:6.0 train_time:8900ms step_avg:1112.50ms
gptq: 8000ms (calibration and rounding) train_time+gptq:38000ms
"""


def test_ms_per_step_is_the_median_step_before_and_after_recurrence_switches_on():
    # steps 3-5 took 900 ms each (1-2 are warm-up); steps 6-8, with recurrence on, 1300, 1200, 1200 ms
    assert gpu_check.step_times(SESSION_LOG) == {"before_recurrence": 900.0, "after_recurrence": 1200.0}


def test_lora_ttt_projection_scales_seconds_per_model_token_to_the_busiest_rank_of_the_modeled_split(monkeypatch):
    """Run: 2 documents of 97 targets in one batch, 3 chunk steps of widths 48, 96, 144: 2 x 288 = 576 model tokens in
    5.76 s, 10 ms each; the round trip, one packed row of its 194 tokens, in 0.1 s. Modeled full split here: 14
    documents of 49 targets and 2 of 2,049, in batches of 2: 7 of 2 x (48 + 96) = 288 model tokens and one of
    2 x (48 x (1 + ... + 42) + 2,048) = 90,784; one batch a rank: the busiest 90,784, 907.84 s. The round trip of
    the 40,540,160-token split: 619 rows of 65,536, 78 on the busiest rank: 7.8 s."""
    monkeypatch.setattr(gpu_check, "modeled_document_lengths", lambda vocab_size: np.array([49] * 14 + [2049] * 2))
    settings = train_gpt.Settings(ttt_batch_size=2, max_wallclock_seconds=30)
    facts = {"val_tokens": 194, "gptq_ms": 8000, "train_time_plus_gptq_ms": 28000,
             "ms_per_step": {"before_recurrence": 900.0, "after_recurrence": 1200.0},
             "eval_passes": {"roundtrip": {"stride": 2048, "eval_time_ms": 100},
                             "ttt": {"stride": 48, "eval_time_ms": 5760}}}
    projection = gpu_check.project_to_8_gpus(facts, settings, gpu_check.split_documents(np.array([97, 97])), 48)
    evaluation = projection["evaluation"]
    assert evaluation["measured_1_gpu"] == {"roundtrip": {"seconds": 0.1, "batches": 1},
                                            "ttt": {"documents": 2, "batches": 1, "seconds": 5.76, "model_tokens": 576}}
    assert evaluation["scaled_8_gpus"]["ttt"] == {
        "full_split_modeled": {"documents": 16, "tokens": 14 * 49 + 2 * 2049, "batches": 8,
                               "model_tokens": 7 * 288 + 90_784},
        "model_tokens_busiest_of_8_ranks": 90_784, "seconds": 907.8}
    assert evaluation["seconds_8_gpus"] == {"roundtrip": 7.8, "ttt": 907.8}
    assert evaluation["total_s"] == 915.6 and evaluation["over_the_cap"] is True
    assert projection["training_ms_per_step"] == {"before_recurrence": 112.5, "after_recurrence": 150.0}
    assert projection["gptq"]["within_reserve"] is True and projection["gptq"]["cap_ms"] == 30_000


def test_full_ttt_projection_counts_batches_and_chunks_of_the_full_split():
    """PRESET=1.0810 (TTT_METHOD=full, windows in batches of 524,288 / 2,048 / 8 = 32), run on 96 chunks of 4,096
    tokens = 393,216 tokens: plain, 192 windows, 6 batches in 1 s; sliding (stride 64), (393,216 - 2,048) / 64 + 1 =
    6,113 windows, 192 batches in 10 s. Full sp8192 split, 40,540,160 tokens on 8 GPUs: plain 19,795 windows, 2,475
    on the busiest rank, 78 batches = 13.0 s; sliding 633,409 windows, 79,177 per rank, 2,475 batches = 128.91 s;
    TTT 30 s / 96 chunks x 1,238 chunks of 32,768 = 386.88 s."""
    settings = train_gpt.Settings.for_preset("1.0810", ttt_chunk_tokens=4096, eval_sliding=1)
    facts = {"val_tokens": 96 * 4096, "eval_passes": {"roundtrip": {"stride": 2048, "eval_time_ms": 1000},
                                                      "sliding": {"stride": 64, "eval_time_ms": 10_000},
                                                      "ttt": {"stride": 64, "eval_time_ms": 30_000}}}
    evaluation = gpu_check.project_to_8_gpus(facts, settings, np.zeros((0, 2), np.int64), 32_768)["evaluation"]
    assert evaluation["seconds_8_gpus"] == {"roundtrip": 13.0, "sliding": 128.9, "ttt": 386.9}
    assert evaluation["measured_1_gpu"]["ttt"] == {"seconds": 30.0, "chunks": 96}
    assert evaluation["scaled_8_gpus"]["ttt"] == {"chunks_of_the_full_split": 1238, "seconds": 386.9}
    assert evaluation["total_s"] == pytest.approx(13.0 + 128.91 + 386.88, abs=0.1)
    assert evaluation["over_the_cap"] is False


# ---- bad options and kills -------------------------------------------------------------------------


def test_a_relative_data_folder_is_resolved_when_the_options_are_read(tmp_path, monkeypatch):
    """The timed run's child works in another folder: a relative --data must not reach it as such."""
    (tmp_path / "gpu" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args = gpu_check.parse_args(["--out", "out", "--data", "gpu/data"])
    assert args.data == tmp_path / "gpu" / "data" and args.out == tmp_path / "out"


def test_a_data_folder_that_does_not_exist_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.parse_args(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and f"error: --data {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only"])
def test_an_out_folder_that_cannot_be_written_is_one_error_line(tmp_path, case):
    if case == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = {"a file": blocker, "under a file": blocker / "out", "read-only": tmp_path / "ro" / "out"}[case]
    if case == "read-only":
        (tmp_path / "ro").mkdir(mode=0o500)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), "--dry-run",
                           "--only", "multi_rank"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"error: --out {out}")


def test_a_check_stopped_by_sigterm_removes_its_work_folder_and_keeps_its_report(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), "--dry-run",
                             "--only", "environment"], env={**os.environ, "TMPDIR": str(scratch)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # the report says the step is running once the check is inside it
        if (out / "report.json").exists() and '"running"' in (out / "report.json").read_text():
            break
        time.sleep(0.1)
    work = list(scratch.glob("gpu_check_*"))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert len(work) == 1 and not work[0].exists() and list(scratch.iterdir()) == []
    assert json.loads((out / "report.json").read_text())["steps"]["environment"]["status"] == "running"


def test_work_folders_of_checks_that_were_killed_outright_are_removed_by_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"gpu_check_{int(dead.stdout)}_abc"
    stale.mkdir()
    (stale / "shard.bin").write_bytes(b"x")
    live = tmp_path / f"gpu_check_{os.getppid()}_def"  # a check still running (here: this test's parent)
    live.mkdir()
    work = gpu_check.make_work_folder()
    assert not stale.exists() and live.exists() and work.exists() and work.parent == tmp_path


# ---- the attention kernels, timed on the trainer's call ------------------------------------------------


def test_attention_calls_are_the_defaults_per_gpu_micro_batch_dense_and_packed():
    """98,304 tokens per GPU (786,432 / 8): 48 sequences of 2,048, or one row of documents of ~1,000 cut at 2,048."""
    calls = gpu_check.attention_calls(train_gpt.Settings())
    dense, varlen = calls["dense"], calls["varlen"]
    assert (dense["batch"], dense["seq"], dense["heads"], dense["kv_heads"], dense["head_dim"]) == (48, 2048, 8, 4, 64)
    assert dense["lengths"] == [2048] * 48
    assert (varlen["batch"], varlen["seq"], varlen["heads"], varlen["kv_heads"]) == (1, 98_304, 8, 4)
    assert sum(varlen["lengths"]) == 98_304 and 1 <= min(varlen["lengths"]) and max(varlen["lengths"]) == 2048
    assert 800 < 98_304 / len(varlen["lengths"]) < 1200


SMALL_ATTENTION = train_gpt.Settings(train_batch_tokens=8 * 4 * 256, train_seq_len=256, num_heads=4, num_kv_heads=2,
                                     model_dim=256)  # dense: 4 x 256; varlen: one row of 1,024 tokens


def test_attention_is_timed_through_the_trainers_function_with_its_layout_and_each_sdpa_backend(monkeypatch):
    calls = []

    def attention(q, k, v, kernel: str, cu_seqlens=None, max_seqlen=0):  # train_gpt.attention's signature
        if kernel == "fa3":
            raise ImportError("flash_attn_interface is not installed")
        backends = torch.backends.cuda
        calls.append((kernel, tuple(q.shape), tuple(k.shape), tuple(v.shape), backends.flash_sdp_enabled(),
                      backends.cudnn_sdp_enabled(), None if cu_seqlens is None else cu_seqlens.tolist(), max_seqlen))
        return q + 0 * (k.sum() + v.sum())

    monkeypatch.setattr(gpu_check.train_gpt, "attention", attention, raising=False)
    result = gpu_check.measure_attention(SMALL_ATTENTION, torch.device("cpu"), dry_run=False)
    assert result["function"] == "train_gpt.attention"
    assert {result["fastest"]["dense"], result["fastest"]["varlen"]} <= {"sdpa_flash", "sdpa_cudnn"}  # fa3 did not run
    assert result["kernels"]["dense"]["fa3"] == {"error": "ImportError: flash_attn_interface is not installed"}
    dense = [c for c in calls if c[6] is None]
    varlen = [c for c in calls if c[6] is not None]
    # (batch, seq, heads, head_dim): heads of 256 / 4 = 64; k and v with the 2 KV heads; flash, then cuDNN alone
    assert {c[1:6] for c in dense} == {((4, 256, 4, 64), (4, 256, 2, 64), (4, 256, 2, 64), True, False),
                                       ((4, 256, 4, 64), (4, 256, 2, 64), (4, 256, 2, 64), False, True)}
    assert {c[1] for c in varlen} == {(1, 1024, 4, 64)} and all(c[0] == "sdpa" for c in calls)
    bounds = varlen[0][6]
    assert bounds[0] == 0 and bounds[-1] == 1024 and varlen[0][7] == max(b - a for a, b in zip(bounds, bounds[1:]))


def test_attention_tflops_are_the_causal_flops_over_the_median_times(monkeypatch):
    """Dense 4 x 256, 4 heads of 64: forward 2 x 4 x 64 x 4 x 256^2 = 134,217,728 FLOPs; in 1 ms, 0.1342 TFLOP/s;
    backward 2.5 x that in 3.5 - 1 = 2.5 ms: 0.1342 TFLOP/s."""
    monkeypatch.setattr(gpu_check.train_gpt, "attention",
                        lambda q, k, v, kernel, cu_seqlens=None, max_seqlen=0: q + 0 * (k.sum() + v.sum()),
                        raising=False)
    times = iter([1.0, 3.5] * 6)  # forward, then forward + backward, for each kernel and call
    monkeypatch.setattr(gpu_check, "median_ms", lambda run, device, repeats: next(times))
    timing = gpu_check.measure_attention(SMALL_ATTENTION, torch.device("cpu"), dry_run=False)["kernels"]["dense"]["fa3"]
    assert timing == {"forward_ms": 1.0, "backward_ms": 2.5, "forward_tflops": 0.1342, "backward_tflops": 0.1342}
