"""Check the kit on a GPU machine with one command, offline: DIR/report.json and a readable DIR/report.md.

    python3 bench/gpu_check.py --session --out DIR --data .device/data   # one GPU, one call: at most 540 s
    python3 bench/gpu_check.py --out DIR --data .device/data             # every step, at most ~19 minutes
    python3 bench/gpu_check.py --out DIR --dry-run [--session]           # the same on the CPU at toy sizes (CI)

--session runs environment, timed_run (TTT chunks of one rank's share, EVAL_SLIDING=1, 40 s cap), the three
CUDA tests that matter most and the baseline's throughput, and projects the figures to 8xH100 (bench/README.md).

Steps, in order; each runs in child processes under a hard time limit, and a failure (or a timeout) is
recorded in the report while the next step still runs:
  environment  torch / CUDA / cuDNN / NCCL versions, the device, the SDPA backends, a FlashAttention probe
  cuda_tests   the tests marked `cuda` (python3 -m pytest -m cuda); on a CPU they are collected and skipped
  throughput   bench/throughput.py at PRESET=baseline and at the strong default (before and after depth
               recurrence switches on), full size, against the reference: 43.54 ms/step on 8xH100 for
               524,288 tokens = 1.505M tokens/s per GPU; one GPU with 8 accumulation steps does the same
               work per GPU without the all-reduce, so it is the fair single-GPU comparison
  timed_run    torchrun train_gpt.py of the strong default under MAX_WALLCLOCK_SECONDS on shards made here
               (the sample text from --data re-tokenized with the tokenizer the settings name, else random
               tokens: the score means nothing), through the export and the round trip
  multi_rank   not run: two processes cannot share one GPU under NCCL; the report says so
Every setting comes from the environment as train_gpt.py reads it (Settings.from_env), so the check follows
the defaults when they change. The report is rewritten after every step: a run cut short keeps its report.
--only picks steps; --budget-s caps the whole run (a step that no longer fits is skipped, and says so).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "data")]

import train_gpt  # noqa: E402
from bench.flops import flops_per_token, peak_tflops  # noqa: E402
from records.run_log import split_layout  # noqa: E402

STEPS = ("environment", "cuda_tests", "throughput", "timed_run", "multi_rank")
# Hard limits per step (seconds): together under 20 minutes on one H100, with room for the report.
LIMITS_S = {"environment": 60, "cuda_tests": 300, "throughput": 390, "timed_run": 420, "multi_rank": 1}
DRY_LIMITS_S = {"environment": 60, "cuda_tests": 120, "throughput": 180, "timed_run": 180, "multi_rank": 1}
# (label, PRESET, BENCH_PROGRESS): progress 1 has depth recurrence on, whatever RECUR_START_FRAC is.
THROUGHPUT_RUNS = (("baseline", "baseline", 0.0), ("strong", "", 0.0), ("strong_recurrence", "", 1.0))

# The reference (SPEC.md): the naive baseline on 8xH100.
REFERENCE_MS_PER_STEP, REFERENCE_TOKENS_PER_STEP, REFERENCE_GPUS = 43.54, 524_288, 8
REFERENCE_TOKENS_PER_S_PER_GPU = REFERENCE_TOKENS_PER_STEP / (REFERENCE_MS_PER_STEP / 1000) / REFERENCE_GPUS
SP1024_VAL_TOKENS = 62_021_632  # the published sp1024 validation split

# Toy sizes for --dry-run: every code path of the strong default (recurrence, sliding eval, export) on a CPU.
# Heads of 64 as in the default model, and just enough blocks for the default RECUR_LAYERS.
DRY_RUN_ENV = {
    "DEVICE": "cpu", "NUM_LAYERS": str(max([1, *train_gpt.Settings().recur_layer_ids]) + 1), "MODEL_DIM": "128",
    "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "512",
    "VAL_BATCH_SIZE": "4096", "EVAL_STRIDE": "16", "WARMUP_STEPS": "2", "OMP_NUM_THREADS": "1",
    "GPTQ_RESERVE_SECONDS": "0.5",  # inside the dry run's 3 s cap
    "CUDA_VISIBLE_DEVICES": "",  # the CPU even on a GPU machine: the CUDA tests skip, nothing waits for the GPU
}
DRY_TIMED_RUN_CAP_S = 3.0
DRY_BENCH = {"BENCH_STEPS": "1", "BENCH_WARMUP_STEPS": "1"}
FULL_BENCH = {"BENCH_STEPS": "20", "BENCH_WARMUP_STEPS": "5"}

# --session: the one device call (bench/README.md): at most ~9.5 minutes in all, the most telling steps first.
SESSION_STEPS = ("environment", "timed_run", "cuda_tests", "throughput")
SESSION_LIMITS_S = {"environment": 45, "timed_run": 330, "cuda_tests": 110, "throughput": 55}
SESSION_TIMED_RUN_CAP_S = 40.0
SESSION_TTT_CHUNKS = {False: 96, True: 2}  # TTT chunks of the validation prefix (by dry_run): ~30 s on a GPU
SESSION_CUDA_TESTS = ("flash_attention_kernel or flash_cannot_run_fails or "
                      "evaluation_on_cuda_equals_the_fp32_cpu")  # -k: the FlashAttention kernel, fp32 refused, eval
SESSION_BENCH = {"BENCH_STEPS": "8", "BENCH_WARMUP_STEPS": "3"}
# The record 1.0810's evaluation on 8xH100 with FlashAttention 3 (its train_seed42.log), in seconds.
RECORD_EVAL_S = {"quantized (plain windows)": 25.5, "sliding": 121.0, "ttt": 366.5}
EVAL_CAP_S = 600


# ----------------------------------------------------------------------------------------------
# Running steps: child processes under hard limits, results into the report.


class Check:
    """The report being built, and the budget left; the report is written after every step."""

    def __init__(self, out: Path, work: Path, args: argparse.Namespace):
        self.out, self.work, self.args = out, work, args
        self.deadline = time.monotonic() + args.budget_s
        self.limits = DRY_LIMITS_S if args.dry_run else SESSION_LIMITS_S if args.session else LIMITS_S
        self.report = {"tool": "bench/gpu_check.py", "dry_run": args.dry_run, "session": args.session,
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "budget_s": args.budget_s, "data": str(args.data) if args.data else None,
                       "host": platform.node(), "steps": {}}

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run_step(self, name: str, step) -> None:
        limit = min(self.limits[name], self.time_left() - 5)
        result = {"status": "skipped", "seconds": 0.0}
        if limit < 10 and name != "multi_rank":
            result["error"] = f"skipped: {self.time_left():.0f} s of --budget-s left, too little for this step"
        else:
            self.report["steps"][name] = {"status": "running", "seconds": 0.0, "limit_s": round(limit)}
            self.write()  # if the whole check is killed, the report names the step it was in
            t0 = time.monotonic()
            try:
                result.update(step(self, limit))
            except Exception as e:  # a broken step is a finding, not the end of the check
                result.update(status="failed", error=f"{type(e).__name__}: {e}")
            result["seconds"] = round(time.monotonic() - t0, 1)
        self.report["steps"][name] = result
        self.write()
        print(f"gpu_check: {name}: {result['status']} ({result['seconds']} s)"
              + (f": {result['error'][:300]}" if result.get("error") else ""), flush=True)

    def write(self) -> None:
        self.report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_text(self.out / "report.json", json.dumps(self.report, indent=2) + "\n")
        write_text(self.out / "report.md", render_markdown(self.report))


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_command(cmd: list[str], env: dict, cwd: Path, limit_s: float) -> dict:
    """Run a child in its own process group, killed whole at the limit (torchrun's workers too)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    except BaseException:  # the check itself is being stopped (a signal, Ctrl-C): its child goes with it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return {"returncode": proc.returncode, "timed_out": timed_out, "stdout": stdout, "stderr": stderr,
            "seconds": round(time.monotonic() - t0, 1)}


def child_env(check: Check, **overrides) -> dict:
    """The environment as given (the user's settings), without launcher variables, plus the toy sizes
    for a dry run and the step's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "LOCAL_WORLD_SIZE", "MASTER_"))}
    if check.args.dry_run:
        env.update(DRY_RUN_ENV)
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH")))))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def failure(run: dict, what: str) -> dict:
    why = "timed out (killed at the step's limit)" if run["timed_out"] else f"exit status {run['returncode']}"
    tail = (run["stderr"] or run["stdout"] or "").strip()[-1500:]
    return {"status": "timeout" if run["timed_out"] else "failed", "error": f"{what} {why}: {tail}"}


# ----------------------------------------------------------------------------------------------
# 1. Environment.


def probe_environment() -> dict:
    """Run in a child process: versions, the device, the SDPA backends, and whether flash really runs."""
    import torch
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if not torch.cuda.is_available():
        return facts
    props = torch.cuda.get_device_properties(0)
    facts.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                 capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                 memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                 cudnn=torch.backends.cudnn.version())
    try:
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:
        facts["nccl"] = f"unavailable ({type(e).__name__}: {e})"
    backends = torch.backends.cuda
    facts["sdpa_available"] = {"flash": backends.is_flash_attention_available()}
    facts["sdpa_enabled_by_default"] = {k: getattr(backends, f"{k}_sdp_enabled")()
                                        for k in ("flash", "mem_efficient", "math", "cudnn")}
    train_gpt.pin_flash_attention()
    facts["sdpa_enabled_by_train_gpt"] = {k: getattr(backends, f"{k}_sdp_enabled")()
                                          for k in ("flash", "mem_efficient", "math", "cudnn")}
    q = torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16)
    try:  # the trainer's attention call: causal, grouped-query, bf16, heads of 64
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
        facts["flash_gqa_bf16_runs"] = True
    except RuntimeError as e:
        facts["flash_gqa_bf16_runs"] = f"no: {str(e)[:300]}"
    return facts


def step_environment(check: Check, limit_s: float) -> dict:
    run = run_command([sys.executable, str(Path(__file__).resolve()), "--probe-environment"], child_env(check),
                      REPO, limit_s)
    if run["returncode"] != 0:
        return failure(run, "the environment probe")
    facts = json.loads(run["stdout"].strip().splitlines()[-1])
    facts["git_commit"] = git_commit()
    check.report["device"] = facts.get("device_name") or f"cpu ({platform.machine()})"
    problems = [] if check.args.dry_run or facts["cuda_available"] else ["no CUDA device"]
    if facts.get("cuda_available") and facts.get("flash_gqa_bf16_runs") is not True:
        problems.append("FlashAttention does not run the trainer's attention")
    return {"status": "failed" if problems else "ok", "facts": facts,
            **({"error": "; ".join(problems)} if problems else {})}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------
# 2. The CUDA-marked tests.


def step_cuda_tests(check: Check, limit_s: float) -> dict:
    junit = check.work / "cuda_tests.xml"
    # A test module that fails to import elsewhere in tests/ must not keep the CUDA tests from running.
    subset = ["-k", SESSION_CUDA_TESTS] if check.args.session else []
    run = run_command([sys.executable, "-m", "pytest", "-m", "cuda", *subset, "-q", "-rA", "-p", "no:cacheprovider",
                       "--continue-on-collection-errors", f"--junitxml={junit}", "tests"], child_env(check), REPO,
                      limit_s)
    write_text(check.out / "cuda_tests.txt", run["stdout"] + run["stderr"])
    tests = read_junit(junit) if junit.exists() else []
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped")}
    result = {"counts": counts, "tests": tests}
    if run["timed_out"] or run["returncode"] not in (0, 5):
        return {**result, **failure(run, "pytest -m cuda")}
    if not tests:
        return {**result, "status": "failed", "error": "no test marked cuda was collected"}
    if counts["passed"] == 0:
        reasons = sorted({t.get("message", "") for t in tests})
        return {**result, "status": "skipped", "error": f"every CUDA test skipped: {'; '.join(reasons)}"}
    return {**result, "status": "ok"}


def read_junit(path: Path) -> list[dict]:
    tests = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or node.text or "")[:500]
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), **({"message": message} if message else {})})
    return tests


# ----------------------------------------------------------------------------------------------
# 3. Throughput against the reference.


def step_throughput(check: Check, limit_s: float) -> dict:
    runs, deadline = {}, time.monotonic() + limit_s
    bench = DRY_BENCH if check.args.dry_run else SESSION_BENCH if check.args.session else FULL_BENCH
    planned = THROUGHPUT_RUNS[:1] if check.args.session else THROUGHPUT_RUNS  # the session: the baseline only
    for i, (label, preset, progress) in enumerate(planned):
        share = (deadline - time.monotonic()) / (len(planned) - i)  # time left, shared by the runs left
        env = child_env(check, PRESET=preset, BENCH_PROGRESS=progress, **bench)
        run = run_command([sys.executable, str(REPO / "bench" / "throughput.py")], env, REPO, share)
        if run["returncode"] != 0:
            runs[label] = failure(run, "bench/throughput.py")
            continue
        measured = json.loads(run["stdout"].strip().splitlines()[-1])
        runs[label] = {"status": "ok", "measured": measured, "comparison": compare_with_reference(measured)}
    bad = [k for k, r in runs.items() if r["status"] != "ok"]
    return {"status": "failed" if bad else "ok", "runs": runs, "reference": reference_figures(),
            **({"error": f"throughput runs that did not finish: {', '.join(bad)}"} if bad else {})}


def reference_figures() -> dict:
    baseline = train_gpt.Settings.for_preset("baseline")
    flops = flops_per_token(baseline)
    h100, _ = peak_tflops("cuda", "NVIDIA H100 80GB HBM3", 0.0)
    return {"what": "naive baseline, 8xH100 (SPEC.md)", "ms_per_step": REFERENCE_MS_PER_STEP,
            "tokens_per_step": REFERENCE_TOKENS_PER_STEP, "gpus": REFERENCE_GPUS,
            "tokens_per_s_per_gpu": round(REFERENCE_TOKENS_PER_S_PER_GPU),
            "flops_per_token": flops, "mfu": round(flops * REFERENCE_TOKENS_PER_S_PER_GPU / (h100 * 1e12), 4),
            "same_work_on_1_gpu_ms_per_step": round(REFERENCE_MS_PER_STEP * REFERENCE_GPUS, 2)}


def compare_with_reference(measured: dict) -> dict:
    """Tokens/s per device against the reference's per-GPU rate; MFU compares models of different sizes."""
    per_device = measured["tokens_per_s_per_device"]
    return {"tokens_per_s_per_device": per_device,
            "ratio_to_reference_tokens_per_s_per_gpu": round(per_device / REFERENCE_TOKENS_PER_S_PER_GPU, 4),
            "mfu": measured.get("mfu"), "reference_mfu": reference_figures()["mfu"],
            "ms_per_step": measured["ms_per_step"]["median"],
            "reference_same_work_on_1_gpu_ms_per_step": reference_figures()["same_work_on_1_gpu_ms_per_step"],
            "note": "same work per GPU as the reference only with the baseline's settings on 1 GPU x 8 "
                    "accumulation steps (no all-reduce); other settings: compare MFU"}


# ----------------------------------------------------------------------------------------------
# 4. A real timed run on shards made here.


def find_file(root: Path | None, name: str) -> Path | None:
    if root is None or not root.is_dir():
        return None
    return next(iter(sorted(root.rglob(name))), None)


def sample_documents(root: Path | None, max_chars: int) -> list[str]:
    """The lines of the sample text(s) in --data as documents, FineWeb's first."""
    texts = sorted(root.rglob("*.txt"), key=lambda p: ("fineweb" not in p.name, p.name)) if root else []
    docs, chars = [], 0
    for path in texts:
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if line.strip() and chars < max_chars:
                docs.append(line)
                chars += len(line)
    return docs


def make_shards(settings: train_gpt.Settings, data: Path | None, folder: Path, val_tokens: int,
                train_tokens: int) -> dict:
    """Validation and training shards for the run (the data tools' writer), and the tokenizer to score with.
    The sample text re-tokenized with the tokenizer the settings name (found by file name under --data);
    else random ids with a byte-level table of VOCAB_SIZE ids. Val and train documents are disjoint;
    each is repeated to its size: the score means nothing, only the timing and the pipeline do."""
    from shard_io import write_shard
    folder.mkdir(parents=True, exist_ok=True)
    vocab = settings.vocab_size
    tokenizer = find_file(data, Path(settings.tokenizer_path).name)
    docs = sample_documents(data, 4_000_000 if val_tokens > 100_000 else 300_000)
    if tokenizer is not None and tokenizer.suffix == ".model" and len(docs) >= 10:
        from download_hf_docs_and_tokenize import SentencePieceEncoder
        encoder = SentencePieceEncoder(tokenizer, num_threads=os.cpu_count() or 1)
        num_val = max(1, len(docs) // 10)
        val, train = encoder.encode_documents(docs[:num_val]), encoder.encode_documents(docs[num_val:])
        source = f"{len(docs)} lines of text under {data}, tokenized with {tokenizer}"
    else:
        missing = "no --data" if data is None else f"no {Path(settings.tokenizer_path).name} or text under {data}"
        tokenizer = folder / f"random_{vocab}.json"  # every id a boundary except the last 256: one byte each
        write_text(tokenizer, json.dumps({"vocab_size": vocab, "byte_offset": max(vocab - 256, 0)}))
        rng = np.random.default_rng(0)
        val, train = rng.integers(0, vocab, 65_536), rng.integers(0, vocab, 262_144)
        source = f"random token ids ({missing})"
    write_shard(folder / "fineweb_val_000000.bin", np.resize(val, val_tokens + 1).astype(np.uint16))
    write_shard(folder / "fineweb_train_000000.bin", np.resize(train, train_tokens).astype(np.uint16))
    return {"data_path": str(folder), "tokenizer_path": str(tokenizer), "source": source}


def session_run_settings(settings: train_gpt.Settings, dry_run: bool) -> tuple[dict, int]:
    """(variables, validation tokens) of the session's timed run. One TTT chunk on 1 GPU is one rank's share of an
    8-GPU chunk (TTT_CHUNK_TOKENS / 8: 2 sequences of 2048 by default), scored in batches of the same shape, so a
    1-GPU chunk takes what a chunk takes on 8; the validation split is SESSION_TTT_CHUNKS such chunks. EVAL_SLIDING=1
    times the sliding pass apart from TTT; every step is logged (ms/step before and after recurrence), and
    dynamo's recompiles too. EXPORT_FIT_CAP=0: 40 s of training leave weights that compress far worse than a
    trained model's, so the step-down would only spend minutes compressing again; the bytes of the first int6
    export are reported, with whether they would fit."""
    chunk = max(settings.ttt_chunk_tokens // REFERENCE_GPUS, settings.train_seq_len)
    if dry_run:  # toy sequences: the same 2 sequences per chunk as the default's 32,768 / 8 = 2 x 2048
        chunk = 2 * settings.train_seq_len
    variables = {"TTT_CHUNK_TOKENS": chunk, "EVAL_SLIDING": 1, "TRAIN_LOG_EVERY": 1, "TORCH_LOGS": "recompiles",
                 "EXPORT_FIT_CAP": 0}
    return variables, SESSION_TTT_CHUNKS[dry_run] * chunk


def step_timed_run(check: Check, limit_s: float) -> dict:
    settings = train_gpt.Settings.from_env(child_env(check))
    cap_s = DRY_TIMED_RUN_CAP_S if check.args.dry_run else check.args.timed_run_cap_s
    val_tokens = 32 * settings.train_seq_len if check.args.dry_run else 2**20
    session_env = {}
    if check.args.session:
        session_env, val_tokens = session_run_settings(settings, check.args.dry_run)
    train_tokens = 200_000 if check.args.dry_run else 16 * settings.train_batch_tokens
    data = make_shards(settings, check.args.data, check.work / "timed_run_data", val_tokens, train_tokens)
    run_dir = check.work / "timed_run"
    run_dir.mkdir(exist_ok=True)
    variables = dict(MAX_WALLCLOCK_SECONDS=cap_s, VAL_LOSS_EVERY=0, **session_env)
    env = child_env(check, DATA_PATH=data["data_path"], TOKENIZER_PATH=data["tokenizer_path"], RUN_ID="gpu_check",
                    **variables)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "train_gpt.py")]
    run = run_command(cmd, env, run_dir, limit_s)
    write_text(check.out / "timed_run_output.txt", run["stdout"] + run["stderr"])
    log_path = run_dir / "logs" / "gpu_check.txt"
    result = {"command": " ".join([*(f"{k}={v}" for k, v in variables.items()), *cmd[2:]]), "data": data,
              "cap_s": cap_s}
    if log_path.exists():
        shutil.copyfile(log_path, check.out / "timed_run_log.txt")
        _, _, lines = split_layout(log_path, log_path.read_bytes())  # the log's lines, not the code's
        result["facts"] = read_timed_run_log(lines.decode("utf-8"), cap_s, settings.vocab_size)
        result["facts"]["recompiles"] = run["stderr"].count("Recompiling function")  # TORCH_LOGS=recompiles
        if check.args.session:
            run_settings = train_gpt.Settings.from_env(env)
            result["projection_8xh100"] = project_to_8_gpus(result["facts"], run_settings, settings.ttt_chunk_tokens)
    if run["returncode"] != 0:
        return {**result, **failure(run, "torchrun train_gpt.py")}
    facts = result.get("facts", {})
    problems = [p for p, bad in (("train_time over the cap", facts.get("train_time_within_cap") is False),
                                 ("no final round-trip score in the log", not facts.get("final_scores")))
                if bad]
    return {**result, "status": "failed" if problems else "ok", **({"error": "; ".join(problems)} if problems else {})}


def read_timed_run_log(log: str, cap_s: float, vocab_size: int) -> dict:
    """The facts of a train_gpt.py log's lines (after its source) that the check is about; None where a
    line is missing."""
    def last(pattern: str):
        found = re.findall(pattern, log, flags=re.MULTILINE)
        return found[-1] if found else None

    train_ms = last(r"^step:\d+/\d+ val_loss:\S+ val_bpb:\S+ train_time:(\d+)ms")
    steps = last(r"^step:(\d+)/\d+ val_loss:")
    ledger = dict(re.findall(r"(\w+):(\d+)ms", last(r"^time_ledger (.*)$") or ""))
    val_tokens = last(r"^val_split tokens:(\d+)")
    finals = [{"name": name, "val_loss": float(loss), "val_bpb": float(bpb), "eval_time_ms": int(ms)}
              for name, loss, bpb, ms in re.findall(
                  r"^final_(\w+?)_roundtrip val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms", log, re.MULTILINE)]
    facts = {
        "steps": int(steps) if steps else None,
        "train_time_ms": int(train_ms) if train_ms else None,
        "train_time_within_cap": int(train_ms) <= 1000 * cap_s if train_ms else None,
        "stopped_by_wallclock_cap": "stopping_early: wallclock_cap" in log,
        "time_ledger_ms": {k: int(v) for k, v in ledger.items()},
        "warmup_compile_ms": int(ledger["warmup_compile"]) if "warmup_compile" in ledger else None,
        "val_tokens": int(val_tokens) if val_tokens else None,
        "final_scores": finals,
        "peak_memory": last(r"^peak_memory (.*)$"),
        "artifact": {"model_bytes": int(m) if (m := last(r"^Serialized model \S+: (\d+) bytes")) else None,
                     "format": last(r"^Serialized model (\S+):"),
                     "total_bytes": int(t) if (t := last(r"^Total submission size \S+: (\d+) bytes")) else None,
                     "export_fit_steps": re.findall(r"^export_fit: (.*)$", log, re.MULTILINE),
                     "over_the_cap": "WARNING: ARTIFACT OVER THE CAP" in log},
    }
    facts["artifact"]["fit_without_stepping_down"] = not facts["artifact"]["export_fit_steps"]
    passes = re.findall(r"^eval_pass:(\w+) stride:(\d+)", log, re.MULTILINE)
    facts["eval_passes"] = {name: {"stride": int(stride), "eval_time_ms": final["eval_time_ms"]}
                            for (name, stride), final in zip(passes, finals)}
    facts["eval_total_ms"] = int(t) if (t := last(r"^eval_total:(\d+)ms")) else None
    gptq = re.findall(r"^gptq: (\d+)ms .*train_time\+gptq:(\d+)ms", log, re.MULTILINE)
    facts["gptq_ms"], facts["train_time_plus_gptq_ms"] = (int(gptq[-1][0]), int(gptq[-1][1])) if gptq else (None, None)
    facts["ms_per_step"] = step_times(log)
    if finals and facts["val_tokens"]:
        ms_per_m = sum(f["eval_time_ms"] for f in finals) / (facts["val_tokens"] / 1e6)  # all final passes
        published = train_gpt.PUBLISHED_VAL_TOKENS.get(vocab_size, (SP1024_VAL_TOKENS,))[0]
        facts["eval"] = {
            "ms_per_million_tokens_1_gpu": round(ms_per_m, 1),
            "estimate_s_sp1024_split_62021632_tokens_8_gpus": round(ms_per_m * SP1024_VAL_TOKENS / 1e6 / 8 / 1000, 1),
            f"estimate_s_published_split_{published}_tokens_8_gpus": round(ms_per_m * published / 1e6 / 8 / 1000, 1),
            "assumes": "evaluation time linear in tokens and split evenly over 8 GPUs; the sum of the final lines' "
                       "eval_time (the round trip, then test-time training when TTT_EPOCHS > 0)"}
    return facts


def step_times(log: str) -> dict:
    """Median ms of one training step before depth recurrence switches on and after (from the train_time of
    consecutive logged steps; the first two steps, still warming up, left out); None where no step was timed."""
    times = {int(s): int(ms) for s, ms in re.findall(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms", log,
                                                      re.MULTILINE)}
    switched = re.findall(r"^recurrence:on layers:\S+ step:(\d+)", log, re.MULTILINE)
    first_recurring = int(switched[-1]) + 1 if switched else None  # the step count after the switching step
    before, after = [], []
    for step, ms in times.items():
        if step > 2 and step - 1 in times:
            recurring = first_recurring is not None and step >= first_recurring
            (after if recurring else before).append(ms - times[step - 1])
    return {"before_recurrence": float(np.median(before)) if before else None,
            "after_recurrence": float(np.median(after)) if after else None}


def ttt_chunk_count(num_scored: int, seq_len: int, stride: int, chunk_tokens: int) -> int:
    """TTT's chunks, as train_gpt.Evaluator.evaluate_with_ttt forms them: windows grouped by their first target."""
    ends = train_gpt.window_ends(num_scored, seq_len, stride)
    return len(np.unique(np.concatenate(([0], ends[:-1])) // chunk_tokens))


def scoring_batches(num_scored: int, seq_len: int, stride: int, ranks: int, batch_windows: int) -> int:
    """Batches of `batch_windows` windows that one of `ranks` ranks scores in an evaluation pass."""
    windows = len(train_gpt.window_ends(num_scored, seq_len, stride))
    return math.ceil(math.ceil(windows / ranks) / batch_windows)


def project_to_8_gpus(facts: dict, settings: train_gpt.Settings, chunk_tokens_8: int) -> dict:
    """The session's 1-GPU figures carried over to 8 GPUs, each with how. `settings` are the timed run's (its
    TTT chunk is one rank's share of `chunk_tokens_8`)."""
    s, gpus, seq_len = settings, REFERENCE_GPUS, settings.train_seq_len
    stride = s.eval_stride if 0 < s.eval_stride < seq_len else seq_len
    steps = facts.get("ms_per_step") or {}
    projection = {"training_ms_per_step": {
        k: None if v is None else round(v / gpus, 1) for k, v in steps.items()},
        "training_how": "8 GPUs each do 1/8 of the global batch (one accumulation step instead of 8): the 1-GPU "
                        "ms/step / 8; DDP's gradient all-reduce, not measured on one GPU, comes on top"}
    if facts.get("gptq_ms") is not None:
        projection["gptq"] = {
            "ms_1_gpu": facts["gptq_ms"], "reserve_ms": round(1000 * s.gptq_reserve_seconds),
            "within_reserve": facts["gptq_ms"] <= 1000 * s.gptq_reserve_seconds,
            "train_time_plus_gptq_ms": facts["train_time_plus_gptq_ms"],
            "cap_ms": round(1000 * s.max_wallclock_seconds),
            "how": "on 8 GPUs the calibration batch splits over the ranks and the rounding runs on rank 0 as here: "
                   "at most the 1-GPU time"}
    passes, val_tokens = facts.get("eval_passes") or {}, facts.get("val_tokens")
    if not val_tokens or "sliding" not in passes:
        return projection
    accum_1, accum_8 = s.grad_accum_steps or gpus, s.grad_accum_steps or 1
    batch_1, batch_8 = s.val_batch_size // (seq_len * accum_1), s.val_batch_size // (seq_len * gpus * accum_8)
    per_batch_s = passes["sliding"]["eval_time_ms"] / 1000 / scoring_batches(val_tokens, seq_len, stride, 1, batch_1)
    full = train_gpt.PUBLISHED_VAL_TOKENS.get(s.vocab_size, (SP1024_VAL_TOKENS,))[0]
    seconds = {"roundtrip": per_batch_s * scoring_batches(full, seq_len, seq_len, gpus, batch_8),
               "sliding": per_batch_s * scoring_batches(full, seq_len, stride, gpus, batch_8)}
    evaluation = {"seconds_per_scoring_batch": round(per_batch_s, 4), "windows_per_batch": batch_1,
                  "full_split_tokens": full}
    if "ttt" in passes:
        per_chunk_s = passes["ttt"]["eval_time_ms"] / 1000 / ttt_chunk_count(val_tokens, seq_len, stride,
                                                                             s.ttt_chunk_tokens)
        seconds["ttt"] = per_chunk_s * ttt_chunk_count(full, seq_len, stride, chunk_tokens_8)
        evaluation["seconds_per_ttt_chunk"] = round(per_chunk_s, 4)
    default_passes = ["roundtrip", "ttt"] if "ttt" in seconds else ["sliding"]
    evaluation.update({
        "seconds_8_gpus": {k: round(v, 1) for k, v in seconds.items()},
        "total_s_default": round(sum(seconds[k] for k in default_passes), 1),
        "total_s_with_eval_sliding": round(sum(seconds.values()), 1),
        "cap_s": EVAL_CAP_S, "record_1_0810_8xh100_fa3_s": RECORD_EVAL_S,
        "how": "a 1-GPU TTT chunk is one rank's share of an 8-GPU chunk, and scoring batches have the same shape on "
               "1 and 8 GPUs: seconds per batch (from the sliding pass) x batches per rank of the full split "
               "(plain: roundtrip, stride: sliding), seconds per chunk x chunks of the full split (TTT); no "
               "all-reduce cost; the default passes are roundtrip + ttt (sliding only with EVAL_SLIDING=1)"})
    evaluation["over_the_cap_default"] = evaluation["total_s_default"] > EVAL_CAP_S
    projection["evaluation"] = evaluation
    return projection


# ----------------------------------------------------------------------------------------------
# 5. Several ranks.


def step_multi_rank(check: Check, limit_s: float) -> dict:
    return {"status": "not_possible", "error": "not run: NCCL cannot run two processes on one GPU, so the checks "
            "that need several ranks (all-reduce cost, the Muon split, DDP) need a machine with 2+ GPUs; on CPU "
            "the tests check that 2 gloo processes train the same math as 1"}


STEP_FUNCTIONS = {"environment": step_environment, "cuda_tests": step_cuda_tests, "throughput": step_throughput,
                  "timed_run": step_timed_run, "multi_rank": step_multi_rank}


# ----------------------------------------------------------------------------------------------
# The readable report.


def render_markdown(report: dict) -> str:
    lines = [f"# GPU check{' (dry run on CPU: no figure here is a GPU measurement)' if report['dry_run'] else ''}",
             "", f"- started {report['started']}, finished {report.get('finished')}, host {report['host']}",
             f"- device: {report.get('device', 'unknown')}; data: {report['data'] or 'none (random tokens)'}", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, step in report["steps"].items():
        note = (step.get("error") or "").replace("\n", " ").replace("|", "/")[:200]
        lines.append(f"| {name} | **{step['status']}** | {step['seconds']} | {note} |")
    steps = report["steps"]
    if "environment" in steps and "facts" in steps["environment"]:
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in steps["environment"]["facts"].items()]
    if "cuda_tests" in steps and steps["cuda_tests"].get("tests"):
        lines += ["", "## CUDA tests", "", "| test | outcome | seconds |", "|---|---|---|"]
        lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} |" for t in steps["cuda_tests"]["tests"]]
    if "throughput" in steps and steps["throughput"].get("runs"):
        ref = steps["throughput"]["reference"]
        lines += ["", "## Throughput (bench/throughput.py, synthetic tokens)", "",
                  f"Reference: {ref['what']}: {ref['ms_per_step']} ms/step = {ref['tokens_per_s_per_gpu']:,} "
                  f"tokens/s per GPU, MFU {ref['mfu']}; the same work on 1 GPU (8 accumulation steps, no all-reduce) "
                  f"would be {ref['same_work_on_1_gpu_ms_per_step']} ms/step.", "",
                  "| run | status | ms/step (median) | tokens/s per device | ratio to reference | MFU "
                  "| peak alloc MiB |",
                  "|---|---|---|---|---|---|---|"]
        for label, run in steps["throughput"]["runs"].items():
            if run["status"] != "ok":
                lines.append(f"| {label} | {run['status']} | | | | | |")
                continue
            m, c = run["measured"], run["comparison"]
            lines.append(f"| {label} | ok | {c['ms_per_step']} | {c['tokens_per_s_per_device']:,.0f} | "
                         f"{c['ratio_to_reference_tokens_per_s_per_gpu']} | {c['mfu']} | "
                         f"{m['peak_memory_mib']['cuda_max_allocated']} |")
    facts = steps.get("timed_run", {}).get("facts")
    if facts:
        lines += ["", "## Timed run (torchrun train_gpt.py, strong default)", "",
                  f"- data: {steps['timed_run']['data']['source']}",
                  f"- cap {steps['timed_run']['cap_s']} s: train_time {facts['train_time_ms']} ms after "
                  f"{facts['steps']} steps, within the cap: {facts['train_time_within_cap']}",
                  f"- compile and warm-up: {facts['warmup_compile_ms']} ms; ledger {facts['time_ledger_ms']}",
                  f"- evaluation passes {facts['eval_passes']} (total {facts['eval_total_ms']} ms) on "
                  f"{facts['val_tokens']} validation tokens; final: {facts['final_scores']}",
                  f"- evaluation: {facts.get('eval')}",
                  f"- ms/step on this device: {facts['ms_per_step']}; GPTQ {facts['gptq_ms']} ms, train_time+gptq "
                  f"{facts['train_time_plus_gptq_ms']} ms; recompiles (TORCH_LOGS=recompiles): {facts['recompiles']}",
                  f"- artifact: {facts['artifact']}", f"- {facts['peak_memory']}"]
    projection = steps.get("timed_run", {}).get("projection_8xh100")
    if projection:
        lines += ["", "## Projected to 8xH100 (from this device's figures)", "",
                  f"- training ms/step {projection['training_ms_per_step']}: {projection['training_how']}"]
        if "gptq" in projection:
            lines.append(f"- GPTQ: {projection['gptq']}")
        evaluation = projection.get("evaluation")
        if evaluation:
            over = " **OVER the 600 s cap**" if evaluation["over_the_cap_default"] else " (cap 600 s)"
            lines += [f"- evaluation seconds on 8 GPUs {evaluation['seconds_8_gpus']}: default total "
                      f"{evaluation['total_s_default']} s{over}, with EVAL_SLIDING=1 "
                      f"{evaluation['total_s_with_eval_sliding']} s; the record 1.0810 (FlashAttention 3): "
                      f"{evaluation['record_1_0810_8xh100_fa3_s']}",
                      f"- {evaluation['seconds_per_scoring_batch']} s per scoring batch of "
                      f"{evaluation['windows_per_batch']} windows, {evaluation.get('seconds_per_ttt_chunk')} s per "
                      f"TTT chunk: {evaluation['how']}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with --out and --data resolved to absolute paths now: the runs' children work in other
    folders. A --data that is not a folder is an error (parser.error: one `error:` line, exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for report.json, report.md and the runs' outputs")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with the sample text (*.txt) and tokenizers (*.model), searched recursively")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--session", action="store_true",
                        help=f"the one-call GPU session: {', '.join(SESSION_STEPS)} in that order (bench/README.md)")
    parser.add_argument("--only", default=None, help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="cap on the whole check (default: 1170 s; with --session 540 s; a dry run 600 s)")
    parser.add_argument("--timed-run-cap-s", type=float, default=None,
                        help="MAX_WALLCLOCK_SECONDS of the timed run (default 120; with --session 40)")
    parser.add_argument("--probe-environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = SESSION_STEPS if args.session else STEPS
    args.only = [s.strip() for s in (args.only or ",".join(steps)).split(",") if s.strip()]
    unknown = [s for s in args.only if s not in steps]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown step; choose from {', '.join(steps)}")
    if not args.probe_environment and args.out is None:
        parser.error("--out DIR is required")
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder; give the folder holding the sample text and tokenizers "
                     f"(bench/README.md), or leave --data out for random tokens")
    args.out, args.data = (None if a is None else a.resolve() for a in (args.out, args.data))
    if args.budget_s is None:
        args.budget_s = 600.0 if args.dry_run else 540.0 if args.session else 1170.0
    if args.timed_run_cap_s is None:
        args.timed_run_cap_s = SESSION_TIMED_RUN_CAP_S if args.session else 120.0
    return args


def prepare_out(out: Path) -> None:
    """--out must be a folder this process can write: else one `error:` line, before any step runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".gpu_check_write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        sys.exit(f"error: --out {out}: cannot write there ({e.strerror or e}); give a folder you can write")


WORK_PREFIX = "gpu_check_"


def make_work_folder() -> Path:
    """A fresh work folder named for this process; folders left by killed checks (their process gone) go first."""
    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"{WORK_PREFIX}*_*"):
        pid = stale.name.removeprefix(WORK_PREFIX).split("_", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}_"))


def exit_on_signal(signum, frame) -> None:
    """SIGTERM / SIGHUP (a timeout, a closed session): unwind, so that `finally` removes the work folder and
    writes the report; the step's child process group is killed by run_command on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_environment:
        print(json.dumps(probe_environment()))
        return 0
    prepare_out(args.out)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, exit_on_signal)
    work = make_work_folder()
    check = Check(args.out, work, args)
    try:
        for name in SESSION_STEPS if args.session else STEPS:
            if name in args.only:
                check.run_step(name, STEP_FUNCTIONS[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        check.write()
    print(f"gpu_check: wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
