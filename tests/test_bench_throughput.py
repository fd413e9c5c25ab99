"""bench/throughput.py run as users run it, on a tiny model, on CPU: one JSON line, consistent numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_MODEL_ENV
from train_gpt import SettingsError

BENCH_ENV = {**TINY_MODEL_ENV, "VOCAB_SIZE": "512", "BENCH_STEPS": "3", "BENCH_WARMUP_STEPS": "1",
             "OMP_NUM_THREADS": "1", "DATA_PATH": "/nonexistent/real/data"}  # the bench must not read it
FIELDS = {"device", "world_size", "grad_accum_steps", "settings", "bench_steps", "bench_warmup_steps",
          "bench_progress", "depth_recurrence",
          "ms_per_step", "tokens_per_s", "tokens_per_s_per_device", "peak_memory_mib", "model_params",
          "matmul_params", "flops_per_token", "model_tflops_per_s_per_device", "peak_tflops_per_device",
          "peak_tflops_source", "mfu", "tokens", "torch"}
SETTINGS_FIELDS = {"num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "vocab_size",
                   "tie_embeddings", "train_seq_len", "train_batch_tokens", "compile", "compute_dtype"}


def run_bench(tmp_path, nproc: int, cwd, **overrides):
    """The commands of bench/README.md, run in `cwd`; temporary files go to tmp_path/tmp."""
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "BENCH_"))}
    env.update(BENCH_ENV, TMPDIR=str(tmp_path / "tmp"), **overrides)
    script = "bench/throughput.py" if cwd == REPO else str(REPO / "bench" / "throughput.py")
    cmd = ([sys.executable, script] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script])
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_one")
    return tmp, run_bench(tmp, nproc=1, cwd=REPO)  # as in the README: from the repository root


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_two")
    return tmp, run_bench(tmp, nproc=2, cwd=tmp, BENCH_PEAK_TFLOPS="0.5")  # from another folder


def only_json_line(result) -> dict:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_prints_exactly_one_json_line_with_every_field(one_process):
    _, result = one_process
    report = only_json_line(result)
    assert set(report) == FIELDS
    assert set(report["settings"]) == SETTINGS_FIELDS
    assert set(report["ms_per_step"]) == {"median", "mean", "min", "max", "p10", "p90"}
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["tokens"] == "synthetic"


def test_reports_the_trainers_settings_and_layout(one_process):
    report = only_json_line(one_process[1])
    assert report["world_size"] == 1 and report["grad_accum_steps"] == 8  # train_gpt's default: 8 / world
    assert report["settings"] == {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2,
                                  "mlp_mult": 2, "vocab_size": 512, "tie_embeddings": 1, "train_seq_len": 64,
                                  "train_batch_tokens": 1024, "compile": False, "compute_dtype": "float32"}
    assert report["bench_steps"] == 3 and report["bench_warmup_steps"] == 1
    # By hand: 2 x (64x64 x 2 + 64x32 x 2 + 64x128 x 2) + 512 x 64 = 57,344 + 32,768 = 90,112 matmul
    # parameters; + 2 x (64 + 64 + 128 + 4) + 64 control = 584: 90,696 in all.
    assert report["matmul_params"] == 90_112 and report["model_params"] == 90_696
    assert report["flops_per_token"] == 6 * 90_112 + 6 * 2 * 64 * 64
    assert report["bench_progress"] == 0.0 and report["depth_recurrence"] is False


def test_late_progress_times_the_depth_recurrence_phase_and_counts_its_flops(tmp_path):
    """The default's structure at 2 blocks, as the smoke preset shrinks it: two lanes from block 1 (the default's 8
    needs NUM_LAYERS > 8), block 1 looped, attention output gates, SmearGate, packed documents."""
    report = only_json_line(run_bench(tmp_path, nproc=1, cwd=REPO, PRESET="strong", RECUR_LAYERS="1",
                                      PARALLEL_START_LAYER="1", BENCH_PROGRESS="0.6"))
    assert report["depth_recurrence"] is True
    # Block 1 runs 1 + NUM_LOOPS = 3 times: 4 block passes of 64x64 x 2 + 64x32 x 2 + 64x128 x 2 (MLP_MULT=2)
    # = 28,672 each, + its attention output gate 12 x 4 heads; SmearGate 12 -> 1 once.
    assert report["matmul_params"] == 4 * (28_672 + 48) + 12 + 512 * 64
    assert report["flops_per_token"] == 6 * (4 * (28_672 + 48) + 12 + 512 * 64) + 6 * 4 * 64 * 64
    # All parameters: the embedding 32,768; 2 blocks of 28,672 + 48 + q_gain 4 + scales and resid_mix 4 x 64;
    # 2 skips (weights and gates, 4 x 64); the two lanes' lambdas 2 x 2 x 2 + 2 x 2; SmearGate 12 + 1.
    assert report["model_params"] == 32_768 + 2 * (28_672 + 48 + 4 + 256) + 256 + 12 + 13 == 91_009


def test_step_times_are_positive_and_ordered(one_process):
    ms = only_json_line(one_process[1])["ms_per_step"]
    assert 0 < ms["min"] <= ms["p10"] <= ms["median"] <= ms["p90"] <= ms["max"]
    assert ms["mean"] > 0


def test_tokens_per_second_is_the_batch_over_the_median_step(one_process):
    report = only_json_line(one_process[1])
    expected = 1024 / (report["ms_per_step"]["median"] / 1000)
    assert report["tokens_per_s"] == pytest.approx(expected, rel=1e-4)
    assert report["tokens_per_s_per_device"] == report["tokens_per_s"]


def test_cpu_reports_process_memory_and_no_mfu_without_a_peak(one_process):
    report = only_json_line(one_process[1])
    assert report["peak_memory_mib"]["process_rss"] > 0
    assert report["peak_memory_mib"]["cuda_max_allocated"] is None
    assert report["peak_tflops_per_device"] is None and report["mfu"] is None


def test_leaves_no_files_behind(two_processes):
    tmp, _ = two_processes  # run with tmp as the working folder and tmp/tmp as TMPDIR
    assert [p.name for p in tmp.iterdir()] == ["tmp"]  # no logs/, no artifact
    assert list((tmp / "tmp").glob("bench_tokens_*")) == []  # the synthetic shards are deleted


def test_torchrun_with_two_processes_reports_world_size_two_once(two_processes):
    _, result = two_processes
    report = only_json_line(result)  # rank 1 prints nothing
    assert report["world_size"] == 2 and report["grad_accum_steps"] == 4
    assert report["tokens_per_s_per_device"] == pytest.approx(report["tokens_per_s"] / 2, rel=1e-4)


def test_bench_peak_tflops_gives_mfu_on_cpu(two_processes):
    report = only_json_line(two_processes[1])
    assert report["peak_tflops_per_device"] == 0.5 and report["peak_tflops_source"] == "BENCH_PEAK_TFLOPS"
    expected = report["flops_per_token"] * report["tokens_per_s_per_device"] / 0.5e12
    assert report["mfu"] == pytest.approx(expected, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("env, variable", [
    ({"BENCH_STEPS": "0"}, "BENCH_STEPS"),
    ({"BENCH_STEPS": "many"}, "BENCH_STEPS"),
    ({"BENCH_WARMUP_STEPS": "-1"}, "BENCH_WARMUP_STEPS"),
    ({"BENCH_PEAK_TFLOPS": "-3"}, "BENCH_PEAK_TFLOPS"),
])
def test_bad_bench_knob_is_rejected_with_its_name(env, variable):
    from bench.throughput import BenchKnobs
    with pytest.raises(SettingsError, match=rf"^{variable}="):
        BenchKnobs.from_env(env)


def test_bench_knob_defaults():
    from bench.throughput import BenchKnobs
    assert BenchKnobs.from_env({}) == BenchKnobs(steps=20, warmup_steps=5, peak_tflops=0.0)
