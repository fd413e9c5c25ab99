"""Check the kit on a GPU machine with one command, offline: DIR/report.json and a readable DIR/report.md.

    python3 bench/gpu_check.py --out DIR --data .device/data     # one GPU, at most ~19 minutes
    python3 bench/gpu_check.py --out DIR --dry-run               # the same steps on the CPU at toy sizes (CI)

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


# ----------------------------------------------------------------------------------------------
# Running steps: child processes under hard limits, results into the report.


class Check:
    """The report being built, and the budget left; the report is written after every step."""

    def __init__(self, out: Path, work: Path, args: argparse.Namespace):
        self.out, self.work, self.args = out, work, args
        self.deadline = time.monotonic() + args.budget_s
        self.limits = DRY_LIMITS_S if args.dry_run else LIMITS_S
        self.report = {"tool": "bench/gpu_check.py", "dry_run": args.dry_run,
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
    run = run_command([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
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
    bench = DRY_BENCH if check.args.dry_run else FULL_BENCH
    for i, (label, preset, progress) in enumerate(THROUGHPUT_RUNS):
        share = (deadline - time.monotonic()) / (len(THROUGHPUT_RUNS) - i)  # time left, shared by the runs left
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


def step_timed_run(check: Check, limit_s: float) -> dict:
    settings = train_gpt.Settings.from_env(child_env(check))
    cap_s = DRY_TIMED_RUN_CAP_S if check.args.dry_run else check.args.timed_run_cap_s
    val_tokens = 32 * settings.train_seq_len if check.args.dry_run else 2**20
    train_tokens = 200_000 if check.args.dry_run else 16 * settings.train_batch_tokens
    data = make_shards(settings, check.args.data, check.work / "timed_run_data", val_tokens, train_tokens)
    run_dir = check.work / "timed_run"
    run_dir.mkdir(exist_ok=True)
    env = child_env(check, DATA_PATH=data["data_path"], TOKENIZER_PATH=data["tokenizer_path"], RUN_ID="gpu_check",
                    MAX_WALLCLOCK_SECONDS=cap_s, VAL_LOSS_EVERY=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "train_gpt.py")]
    run = run_command(cmd, env, run_dir, limit_s)
    write_text(check.out / "timed_run_output.txt", run["stdout"] + run["stderr"])
    log_path = run_dir / "logs" / "gpu_check.txt"
    result = {"command": " ".join(["MAX_WALLCLOCK_SECONDS=" + str(cap_s), "VAL_LOSS_EVERY=0", *cmd[2:]]),
              "data": data, "cap_s": cap_s}
    if log_path.exists():
        shutil.copyfile(log_path, check.out / "timed_run_log.txt")
        _, _, lines = split_layout(log_path, log_path.read_bytes())  # the log's lines, not the code's
        result["facts"] = read_timed_run_log(lines.decode("utf-8"), cap_s, settings.vocab_size)
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
        "eval_mode": last(r"^(eval_mode:.*)$"),
        "final_scores": finals,
        "peak_memory": last(r"^peak_memory (.*)$"),
        "artifact": {"model_bytes": int(m) if (m := last(r"^Serialized model \S+: (\d+) bytes")) else None,
                     "format": last(r"^Serialized model (\S+):"),
                     "total_bytes": int(t) if (t := last(r"^Total submission size \S+: (\d+) bytes")) else None,
                     "export_fit_steps": re.findall(r"^export_fit: (.*)$", log, re.MULTILINE),
                     "over_the_cap": "WARNING: ARTIFACT OVER THE CAP" in log},
    }
    facts["artifact"]["fit_without_stepping_down"] = not facts["artifact"]["export_fit_steps"]
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
                  f"- {facts['eval_mode']}, {facts['val_tokens']} validation tokens; final: {facts['final_scores']}",
                  f"- evaluation: {facts.get('eval')}",
                  f"- artifact: {facts['artifact']}", f"- {facts['peak_memory']}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for report.json, report.md and the runs' outputs")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with the sample text (*.txt) and tokenizers (*.model), searched recursively")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at toy sizes")
    parser.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="cap on the whole check (default: 1170 s; a dry run 600 s)")
    parser.add_argument("--timed-run-cap-s", type=float, default=120.0,
                        help="MAX_WALLCLOCK_SECONDS of the timed run (default 120)")
    parser.add_argument("--probe-environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in STEPS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown step; choose from {', '.join(STEPS)}")
    if not args.probe_environment and args.out is None:
        parser.error("--out DIR is required")
    if args.budget_s is None:
        args.budget_s = 600.0 if args.dry_run else 1170.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_environment:
        print(json.dumps(probe_environment()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    check = Check(args.out.resolve(), work, args)
    try:
        for name in STEPS:
            if name in args.only:
                check.run_step(name, STEP_FUNCTIONS[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
        check.write()
    print(f"gpu_check: wrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
