"""Check the kit on a GPU machine with one command, offline: DIR/report.json and a readable DIR/report.md.

    python3 bench/gpu_check.py --session --out DIR --data DATA   # one GPU, one command: at most 540 s
    python3 bench/gpu_check.py --out DIR --data DATA             # every step, at most 23 minutes
    python3 bench/gpu_check.py --out DIR --dry-run [--session]   # the same on the CPU at toy sizes (CI)

DATA holds the tokenizer the settings name (*.model) and, optionally, FineWeb text (*.txt, one document a line).
--session runs environment, timed_run (a cold start of the default, trimmed to fit: 30 s of training cap, GPTQ on
one rank's share, a zlib export) and the three CUDA tests that matter most. The figures of every timed run are
projected to 8xH100 (estimates; bench/README.md says from what).

Steps, in order; each runs in child processes under a hard time limit, and a failure (or a timeout) is
recorded in the report while the next step still runs:
  environment  torch / CUDA / cuDNN / NCCL versions, the device, the SDPA backends, and the attention kernels
               (FA3, SDPA flash, SDPA cuDNN) timed on the trainer's call at the default's shapes
  cuda_tests   the tests marked `cuda` (python3 -m pytest -m cuda); on a CPU they are collected and skipped
  throughput   bench/throughput.py at PRESET=baseline and at the strong default (before and after depth
               recurrence switches on), full size, against the reference: 43.54 ms/step on 8xH100 for
               524,288 tokens = 1.505M tokens/s per GPU; one GPU with 8 accumulation steps does the same
               work per GPU without the all-reduce, so it is the fair single-GPU comparison
  timed_run    train_gpt.py (one process, no launcher) of the default under MAX_WALLCLOCK_SECONDS on shards made
               here (the sample text from --data re-tokenized with the tokenizer the settings name, else random
               tokens: the score means nothing; validation documents whose lengths stand for the full split's),
               through the export and every evaluation pass
  multi_rank   not run: two processes cannot share one GPU under NCCL; the report says so
Every setting comes from the environment as train_gpt.py reads it (Settings.from_env), so the check follows
the defaults when they change. Each child writes its output to DIR/<step>_output.txt as it runs; the report is
rewritten after every step: a run cut short keeps what it found. --only picks steps; --budget-s caps the whole
run (a step that no longer fits is skipped, and says so).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "data")]

import train_gpt  # noqa: E402
from bench.flops import flops_per_token, peak_tflops  # noqa: E402
from records.run_log import split_layout  # noqa: E402

STEPS = ("environment", "cuda_tests", "throughput", "timed_run", "multi_rank")
# Hard limits per step (seconds), together 23 minutes on one H100 (estimates): the timed run's cold start
# compiles five graphs (185-310 s), trains 120 s, runs GPTQ, brotli-11 (30-60 s) and the evaluation passes.
LIMITS_S = {"environment": 60, "cuda_tests": 300, "throughput": 390, "timed_run": 600, "multi_rank": 1}
DRY_LIMITS_S = {"environment": 60, "cuda_tests": 120, "throughput": 180, "timed_run": 180, "multi_rank": 1}
# (label, PRESET, BENCH_PROGRESS): progress 1 has depth recurrence on, whatever RECUR_START_FRAC is.
THROUGHPUT_RUNS = (("baseline", "baseline", 0.0), ("strong", "", 0.0), ("strong_recurrence", "", 1.0))

# The reference (SPEC.md): the naive baseline on 8xH100.
REFERENCE_MS_PER_STEP, REFERENCE_TOKENS_PER_STEP, REFERENCE_GPUS = 43.54, 524_288, 8
REFERENCE_TOKENS_PER_S_PER_GPU = REFERENCE_TOKENS_PER_STEP / (REFERENCE_MS_PER_STEP / 1000) / REFERENCE_GPUS

# Toy sizes for --dry-run: every code path of the default (recurrence, the parallel lanes, packed documents, LoRA TTT,
# the export) on a CPU. Heads of 64 as in the default model, and just enough blocks (dry_run_blocks); small adapters
# in small TTT batches.
DRY_RUN_ENV = {
    "DEVICE": "cpu", "MODEL_DIM": "128", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "TRAIN_SEQ_LEN": "64",
    "TRAIN_BATCH_TOKENS": "512", "VAL_BATCH_SIZE": "4096", "EVAL_STRIDE": "16", "WARMUP_STEPS": "2",
    "TTT_LORA_RANK": "8", "TTT_BATCH_SIZE": "8", "OMP_NUM_THREADS": "1",
    "GPTQ_RESERVE_SECONDS": "0.5",  # inside the dry run's 3 s cap
    "CUDA_VISIBLE_DEVICES": "",  # the CPU even on a GPU machine: the CUDA tests skip, nothing waits for the GPU
}
DRY_TIMED_RUN_CAP_S = 3.0
DRY_BENCH = {"BENCH_STEPS": "1", "BENCH_WARMUP_STEPS": "1"}
FULL_BENCH = {"BENCH_STEPS": "20", "BENCH_WARMUP_STEPS": "5"}

# --session: one command within 540 s, the most telling steps first. A cold start of the default on one H100,
# estimated: compiles of the training graphs (with and without recurrence), the packed-row evaluation graph, Muon's
# and the LoRA TTT graph, 250-380 s (the 1.0714 record's log: 96-102 s for its TTT compile alone); 30 s of training
# cap, GPTQ and a fast export, the two passes (TTT ~22 s at the record's speed), start-up: 350-480 s (brotli-11 would
# add 30-60 s: the session exports with zlib). The CUDA tests get what is left; throughput, which needs 100 s or more,
# is not in the session.
SESSION_STEPS = ("environment", "timed_run", "cuda_tests")
SESSION_LIMITS_S = {"environment": 50, "timed_run": 480, "cuda_tests": 110}
SESSION_TIMED_RUN_CAP_S = 30.0
SESSION_WARMUP_STEPS = 4
SESSION_CUDA_TESTS = ("flash_attention_kernel or flash_cannot_run_fails or "
                      "evaluation_on_cuda_equals_the_fp32_cpu")  # -k: the FlashAttention kernel, fp32 refused, eval

# The timed run's validation split: documents that stand for the full split's, in whole TTT batches. The full split's
# 50,000 documents (data/download_hf_docs_and_tokenize.py) are modeled by log-normal lengths (tokens, BOS included)
# with the split's mean (sp8192: 40,540,160 / 50,000 = 810.8 tokens) and the median of the 1.0714 record's logs (their
# middle batch, 391 of 782, holds documents of 475-476 tokens); a test holds the model to those logs' batches.
FULL_SPLIT_DOCUMENTS = 50_000
DOCUMENT_MEDIAN_OVER_MEAN = 475 / (40_540_160 / FULL_SPLIT_DOCUMENTS)
SPLIT_TTT_BATCHES = {False: 12, True: 2}  # batches of the modeled full split, evenly spaced (by dry_run)
SPLIT_TTT_CHUNKS = {False: 96, True: 2}  # TTT_METHOD=full: chunks of one rank's share, ~30 s on a GPU (by dry_run)
# The 1.0714 record's evaluation on 8xH100 with FlashAttention 3 (its three train_seed*.log), seconds, least and most:
# the quantized pass on packed rows and the LoRA TTT pass (its compile warm-up outside the timer, as here).
RECORD_EVAL_S = {"roundtrip": (10.5, 10.8), "ttt": (228.8, 237.7)}
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


def run_command(cmd: list[str], env: dict, cwd: Path, limit_s: float, output: Path) -> dict:
    """Run a child in a session of its own, its stdout and stderr going to the file `output` as it writes them
    (no pipe to fill or to hold open); at the limit, or when the check itself is stopped, the child and every
    process it started are killed (end_process_tree), and whatever the child left behind when it ended too."""
    t0 = time.monotonic()
    with open(output, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also when the check is being stopped (a signal, Ctrl-C): its child goes with it
            end_process_tree(proc.pid)
            proc.wait()
    return {"returncode": proc.returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - t0, 1),
            "output": output.read_text(encoding="utf-8", errors="replace")}


def end_process_tree(root: int) -> None:
    """SIGKILL `root`, every process in its session and every descendant, also one that started a session of its
    own (torchrun's workers do), until none is left. Descendants are found by their parent ids in /proc, read
    before any kill (a killed parent's children move to init); without /proc, the process group alone."""
    for _ in range(20):
        alive = process_tree(root)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, signal.SIGKILL)
        if not alive:
            return
        time.sleep(0.05)


def process_tree(root: int) -> set[int]:
    """The living processes (zombies left out) that are `root`, in its session, or descended from one of them."""
    parent, session = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, _, sid = stat.read_text().rsplit(")", 1)[1].split()[:4]  # after "pid (command)"
        except (OSError, IndexError, ValueError):
            continue  # the process ended while being read
        if state not in "ZX":
            parent[int(stat.parent.name)], session[int(stat.parent.name)] = int(ppid), int(sid)
    tree = {pid for pid in parent if pid == root or session[pid] == root}
    while grown := {pid for pid, ppid in parent.items() if ppid in tree} - tree:
        tree |= grown
    return tree


def child_env(check: Check, **overrides) -> dict:
    """The environment as given (the user's settings), without launcher variables, plus the toy sizes
    for a dry run and the step's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "LOCAL_WORLD_SIZE", "MASTER_"))}
    if check.args.dry_run:
        env.update({**DRY_RUN_ENV, **dry_run_blocks(train_gpt.Settings.from_env(env))})
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH")))))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def dry_run_blocks(settings: train_gpt.Settings) -> dict:
    """Just enough blocks for the settings' RECUR_LAYERS, then one of two residual lanes where PARALLEL_START_LAYER is
    on (it must start past the recurring blocks)."""
    lanes = bool(settings.parallel_start_layer)
    blocks = max([1, *settings.recur_layer_ids]) + 1 + lanes
    return {"NUM_LAYERS": str(blocks), "PARALLEL_START_LAYER": str((blocks - 1) * lanes)}


def failure(run: dict, what: str) -> dict:
    why = "timed out (killed at the step's limit)" if run["timed_out"] else f"exit status {run['returncode']}"
    tail = run["output"].strip()[-1500:]
    return {"status": "timeout" if run["timed_out"] else "failed", "error": f"{what} {why}: {tail}"}


# ----------------------------------------------------------------------------------------------
# 1. Environment.


def probe_environment(dry_run: bool) -> dict:
    """Run in a child process: versions, the device, the SDPA backends, and the attention kernels timed."""
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
             "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             **{f"{name}_installed": importlib.util.find_spec(name) is not None
                for name in ("triton", "flash_attn_interface", "kernels")}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
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
    facts["attention"] = measure_attention(train_gpt.Settings.from_env(), device, dry_run)
    return facts


def step_environment(check: Check, limit_s: float) -> dict:
    run = run_command([sys.executable, str(Path(__file__).resolve()), "--probe-environment",
                       *["--dry-run"] * check.args.dry_run], child_env(check), REPO, limit_s,
                      check.out / "environment_output.txt")
    if run["returncode"] != 0:
        return failure(run, "the environment probe")
    facts = last_json_line(run["output"])
    facts["git_commit"] = git_commit()
    check.report["device"] = facts.get("device_name") or f"cpu ({platform.machine()})"
    problems = [] if check.args.dry_run or facts["cuda_available"] else ["no CUDA device"]
    if not facts["attention"]["fastest"].get("dense"):
        problems.append(f"no attention kernel runs the trainer's call ({facts['attention']['function']})")
    return {"status": "failed" if problems else "ok", "facts": facts,
            **({"error": "; ".join(problems)} if problems else {})}


def last_json_line(output: str) -> dict:
    """A child's result: the last line of its output that is a JSON object (warnings may come before it)."""
    return json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))


# The attention kernels, as (train_gpt.attention's `kernel`, the SDPA backend it is timed under).
ATTENTION_KERNELS = {"fa3": ("fa3", None), "sdpa_flash": ("sdpa", "FLASH_ATTENTION"),
                     "sdpa_cudnn": ("sdpa", "CUDNN_ATTENTION")}
ATTENTION_REPEATS = {"cuda": 20, "cpu": 2}
VARLEN_MEAN_DOCUMENT_TOKENS = 1000
ATTENTION_FLOPS = ("causal: forward 2 x heads x head_dim x sum of document lengths squared (QK^T and PV, half the "
                   "pairs); backward 2.5 x forward (the FlashAttention papers' count, recomputation included)")


def attention_calls(settings: train_gpt.Settings) -> dict:
    """The default's attention calls on one of 8 GPUs (a micro-batch of TRAIN_BATCH_TOKENS / 8 tokens): `dense`,
    sequences of TRAIN_SEQ_LEN (48 x 2,048 by default); `varlen`, the same tokens as one packed row (98,304) of
    documents of ~1,000 tokens (exponential lengths, fixed seed) cut at TRAIN_SEQ_LEN, as cu_seqlens."""
    tokens, seq_len = settings.train_batch_tokens // REFERENCE_GPUS, settings.train_seq_len
    heads = {"heads": settings.num_heads, "kv_heads": settings.num_kv_heads,
             "head_dim": settings.model_dim // settings.num_heads}
    return {"dense": {"batch": tokens // seq_len, "seq": seq_len, **heads,
                      "lengths": [seq_len] * (tokens // seq_len)},
            "varlen": {"batch": 1, "seq": tokens, **heads,
                       "lengths": document_lengths(tokens, min(VARLEN_MEAN_DOCUMENT_TOKENS, seq_len // 2), seq_len)}}


def document_lengths(total: int, mean: int, cut: int) -> list[int]:
    """Lengths of documents packed into a row of `total` tokens: exponential of this mean (seed 0), each longer
    than `cut` split into pieces of `cut`, the last one shortened to end the row."""
    drawn = np.maximum(1, np.rint(np.random.default_rng(0).exponential(mean, 4 * total // mean + 16))).astype(int)
    pieces = [piece for doc in drawn for piece in [cut] * (doc // cut) + [doc % cut] * bool(doc % cut)]
    ends = np.minimum(np.cumsum(pieces), total)
    return np.diff(ends[:np.searchsorted(ends, total) + 1], prepend=0).tolist()


def measure_attention(settings: train_gpt.Settings, device: torch.device, dry_run: bool) -> dict:
    """train_gpt.attention timed forward and backward on the default's calls for each kernel (bf16 on CUDA):
    median ms and TFLOP/s; per call form, the fastest kernel (what ATTENTION=auto should pick)."""
    attention, function = trainer_attention(dry_run)
    calls = attention_calls(settings)
    result = {"function": function, "flops": ATTENTION_FLOPS,
              "calls": {form: {**{k: v for k, v in call.items() if k != "lengths"}, "documents": len(call["lengths"]),
                               "max_seqlen": max(call["lengths"])} for form, call in calls.items()},
              "kernels": {}, "fastest": {}}
    for form, call in calls.items():
        timings = result["kernels"][form] = {}
        for name, (kernel, backend) in ATTENTION_KERNELS.items():
            try:
                if attention is None:
                    raise RuntimeError(function)
                timings[name] = time_attention(attention, kernel, backend, call, form == "varlen", device)
            except Exception as e:  # a kernel that cannot run this call is a finding
                timings[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        ran = {name: t["forward_ms"] + t["backward_ms"] for name, t in timings.items() if "error" not in t}
        result["fastest"][form] = min(ran, key=ran.get) if ran else None
    return result


def trainer_attention(dry_run: bool) -> tuple:
    """(train_gpt.attention, its name); where this train_gpt.py has none yet, a dry run times a stand-in of the
    same signature so that the measurement itself runs on the CPU, and a GPU run says it is missing."""
    if hasattr(train_gpt, "attention"):
        return train_gpt.attention, "train_gpt.attention"
    if dry_run:
        return sdpa_stand_in, "stand-in for train_gpt.attention (SDPA; documents one by one)"
    return None, "train_gpt.attention not found: this train_gpt.py has no ATTENTION setting"


def sdpa_stand_in(q: Tensor, k: Tensor, v: Tensor, kernel: str, cu_seqlens: Tensor | None = None,
                  max_seqlen: int = 0) -> Tensor:
    """train_gpt.attention's signature over SDPA: (batch, seq, heads, head_dim) in and out, causal, grouped-query;
    with cu_seqlens, each document of the packed row on its own."""
    if kernel != "sdpa":
        raise RuntimeError(f"kernel {kernel!r}: the stand-in runs kernel 'sdpa' only")
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        return torch.cat([sdpa_stand_in(q[:, a:b], k[:, a:b], v[:, a:b], kernel) for a, b in zip(bounds, bounds[1:])],
                         dim=1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


def time_attention(attention, kernel: str, backend: str | None, call: dict, varlen: bool,
                   device: torch.device) -> dict:
    """Median ms of the forward, and of the backward (forward + backward less the forward), after one untimed
    call; under sdpa_kernel(backend) for SDPA. TFLOP/s by ATTENTION_FLOPS."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (call["batch"], call["seq"])
    q, k, v = (torch.randn(*shape, heads, call["head_dim"], device=device, dtype=dtype, requires_grad=True)
               for heads in (call["heads"], call["kv_heads"], call["kv_heads"]))  # the layout of the trainer's call
    grad = torch.randn_like(q)
    options = {}
    if varlen:
        options = {"cu_seqlens": torch.tensor(np.cumsum([0, *call["lengths"]]), dtype=torch.int32, device=device),
                   "max_seqlen": max(call["lengths"])}

    def forward():
        return attention(q, k, v, kernel, **options)

    def forward_backward():  # the gradients returned, not accumulated into .grad (no extra add timed)
        torch.autograd.grad(forward(), (q, k, v), grad)

    with sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext():
        forward_backward()
        forward_ms = median_ms(forward, device, ATTENTION_REPEATS[device.type])
        backward_ms = median_ms(forward_backward, device, ATTENTION_REPEATS[device.type]) - forward_ms
    forward_flops = 2 * call["heads"] * call["head_dim"] * sum(n * n for n in call["lengths"])
    return {"forward_ms": round(forward_ms, 3), "backward_ms": round(backward_ms, 3),
            "forward_tflops": float(f"{forward_flops / forward_ms / 1e9:.4g}"),
            "backward_tflops": float(f"{2.5 * forward_flops / max(backward_ms, 1e-6) / 1e9:.4g}")}


def median_ms(run, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `run()`: CUDA events around each call on a GPU, the host clock elsewhere."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times))


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
                      limit_s, check.out / "cuda_tests_output.txt")
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
        run = run_command([sys.executable, str(REPO / "bench" / "throughput.py")], env, REPO, share,
                          check.out / f"throughput_{label}_output.txt")
        if run["returncode"] != 0:
            runs[label] = failure(run, "bench/throughput.py")
            continue
        measured = last_json_line(run["output"])
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


def make_shards(settings: train_gpt.Settings, data: Path | None, folder: Path, val_lengths: np.ndarray,
                val_tokens: int, train_tokens: int) -> dict:
    """Validation and training shards for the run (the data tools' writer), and the tokenizer to score with.
    The sample text re-tokenized with the tokenizer the settings name (found by file name under --data); else random
    ids with a byte-level table of VOCAB_SIZE ids (the validation text of its byte ids: the trainer checks that each
    document's bytes are those its ids decode to). Validation: documents of `val_lengths` (document_split) cut or
    repeated to `val_tokens`; val and train text are disjoint, train repeated to its size: the score means nothing,
    only the timing and the pipeline do."""
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
        val, train = rng.integers(max(vocab - 256, 0), vocab, 65_536), rng.integers(0, vocab, 262_144)
        source = f"random token ids ({missing})"
    write_shard(folder / "fineweb_val_000000.bin", document_split(val, val_lengths, val_tokens).astype(np.uint16))
    write_shard(folder / "fineweb_train_000000.bin", np.resize(train, train_tokens).astype(np.uint16))
    return {"data_path": str(folder), "tokenizer_path": str(tokenizer), "source": source}


def document_split(stream: np.ndarray, lengths: np.ndarray, total: int) -> np.ndarray:
    """`total` + 1 tokens (the last one only a target): documents of `lengths` tokens end to end, each a BOS and then
    the stream's next tokens (its own BOS ids left out, the stream repeated as needed), then one more BOS; cut or
    repeated to the size."""
    tokens = np.resize(stream[stream != train_gpt.BOS_ID], lengths.sum() + 1)
    tokens[np.append(np.cumsum(lengths) - lengths, lengths.sum())] = train_gpt.BOS_ID
    return np.resize(tokens, total + 1)


def modeled_document_lengths(vocab_size: int) -> np.ndarray:
    """The full split's document lengths as modeled (tokens, BOS included), ascending: FULL_SPLIT_DOCUMENTS quantiles,
    at (i + 0.5) / n, of a log-normal with the split's mean and DOCUMENT_MEDIAN_OVER_MEAN (a log-normal's mean is its
    median x e^(sigma^2 / 2))."""
    n, mean = FULL_SPLIT_DOCUMENTS, full_split_tokens(vocab_size) / FULL_SPLIT_DOCUMENTS
    sigma = math.sqrt(-2 * math.log(DOCUMENT_MEDIAN_OVER_MEAN))
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    return np.maximum(2, np.rint(mean * DOCUMENT_MEDIAN_OVER_MEAN * np.exp(sigma * z))).astype(np.int64)


def split_documents(lengths: np.ndarray) -> np.ndarray:
    """(start, length) of documents of these lengths end to end, as train_gpt.ttt_documents finds them in the split
    document_split makes of them: each through the next BOS."""
    return np.stack((np.cumsum(lengths) - lengths, lengths + 1), 1)


def timed_run_documents(settings: train_gpt.Settings, dry_run: bool) -> np.ndarray:
    """Lengths of the timed run's validation documents: SPLIT_TTT_BATCHES of the modeled full split's TTT batches
    (TTT_BATCH_SIZE documents of similar length, as train_gpt.ttt_batches forms them), evenly spaced over its whole
    batches from the shortest to the longest, so that the run has the full split's mix of short and long batches.
    The total is made a multiple of TRAIN_SEQ_LEN (the trainer cuts the split to whole sequences) a token a document."""
    size, count = settings.ttt_batch_size, SPLIT_TTT_BATCHES[dry_run]
    lengths = modeled_document_lengths(settings.vocab_size)
    whole = len(lengths) // size
    firsts = size * ((2 * np.arange(count) + 1) * whole // (2 * count))  # each batch's first document
    picked = np.concatenate([lengths[first:first + size] for first in firsts])
    short = -picked.sum() % settings.train_seq_len
    return picked + short // len(picked) + (np.arange(len(picked)) < short % len(picked))


def timed_run_split(settings: train_gpt.Settings, dry_run: bool) -> tuple[dict, np.ndarray, int]:
    """(variables, document lengths, validation tokens) of the timed run's split. TTT_METHOD=lora (the default): the
    documents of timed_run_documents, whole. full: TTT_CHUNK_TOKENS one rank's share of an 8-GPU chunk
    (TTT_CHUNK_TOKENS / 8: 2 sequences of 2,048 for PRESET=1.0810), scored in batches of the same shape, so that a
    1-GPU chunk takes what a chunk takes on 8; the split is SPLIT_TTT_CHUNKS such chunks of those documents."""
    lengths = timed_run_documents(settings, dry_run)
    if settings.ttt_method == "lora":
        return {}, lengths, int(lengths.sum())
    chunk = max(settings.ttt_chunk_tokens // REFERENCE_GPUS, settings.train_seq_len)
    if dry_run:  # toy sequences: the same 2 sequences per chunk as 32,768 / 8 = 2 x 2,048
        chunk = 2 * settings.train_seq_len
    return {"TTT_CHUNK_TOKENS": chunk}, lengths, SPLIT_TTT_CHUNKS[dry_run] * chunk


def session_run_settings(settings: train_gpt.Settings) -> dict:
    """The session's timed run, trimmed to fit a cold start: every step is logged (ms/step before and after
    recurrence), and dynamo's recompiles too; SESSION_WARMUP_STEPS warm-up steps (with recurrence off and on: every
    training graph still compiles); GPTQ calibrates on one 8-GPU rank's share of GPTQ_CALIBRATION_BATCHES, so its time
    is about the 8-GPU time; the export compresses with zlib instead of brotli-11 (30-60 s for the default's model)
    and EXPORT_FIT_CAP=0: 30 s of training say nothing about how a trained model compresses. The export's bytes are
    reported, not projected."""
    return {"TRAIN_LOG_EVERY": 1, "TORCH_LOGS": "recompiles", "WARMUP_STEPS": SESSION_WARMUP_STEPS,
            "GPTQ_CALIBRATION_BATCHES": max(settings.gptq_calibration_batches // REFERENCE_GPUS, 1),
            "EXPORT_FORMAT": f"int{settings.export_bits}+zlib", "EXPORT_FIT_CAP": 0}


def step_timed_run(check: Check, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s  # the shards are made within the step's limit too
    settings = train_gpt.Settings.from_env(child_env(check))
    cap_s = DRY_TIMED_RUN_CAP_S if check.args.dry_run else check.args.timed_run_cap_s
    split_env, val_lengths, val_tokens = timed_run_split(settings, check.args.dry_run)
    train_tokens = 200_000 if check.args.dry_run else 16 * settings.train_batch_tokens
    data = make_shards(settings, check.args.data, check.work / "timed_run_data", val_lengths, val_tokens, train_tokens)
    run_dir = check.work / "timed_run"
    run_dir.mkdir(exist_ok=True)
    variables = dict(MAX_WALLCLOCK_SECONDS=cap_s, VAL_LOSS_EVERY=0, **split_env,
                     **(session_run_settings(settings) if check.args.session else {}))
    env = child_env(check, DATA_PATH=data["data_path"], TOKENIZER_PATH=data["tokenizer_path"], RUN_ID="gpu_check",
                    **variables)
    cmd = [sys.executable, str(REPO / "train_gpt.py")]  # one process: no launcher between the limit and the trainer
    run = run_command(cmd, env, run_dir, deadline - time.monotonic(), check.out / "timed_run_output.txt")
    log_path = run_dir / "logs" / "gpu_check.txt"
    result = {"command": " ".join([*(f"{k}={v}" for k, v in variables.items()), "python3", "train_gpt.py"]),
              "data": data, "cap_s": cap_s}
    if log_path.exists():
        shutil.copyfile(log_path, check.out / "timed_run_log.txt")
        _, _, lines = split_layout(log_path, log_path.read_bytes())  # the log's lines, not the code's
        result["facts"] = read_timed_run_log(lines.decode("utf-8"), cap_s)
        result["facts"]["recompiles"] = run["output"].count("Recompiling function")  # TORCH_LOGS=recompiles
        run_settings = train_gpt.Settings.from_env(env)
        documents = train_gpt.ttt_documents(train_gpt.load_validation_split(run_settings).tokens)  # as the run did
        result["projection_8xh100"] = project_to_8_gpus(result["facts"], run_settings, documents,
                                                        settings.ttt_chunk_tokens)
    if run["returncode"] != 0:
        return {**result, **failure(run, "train_gpt.py")}
    facts = result.get("facts", {})
    problems = [p for p, bad in (("train_time over the cap", facts.get("train_time_within_cap") is False),
                                 ("no final round-trip score in the log", not facts.get("final_scores")))
                if bad]
    return {**result, "status": "failed" if problems else "ok", **({"error": "; ".join(problems)} if problems else {})}


def read_timed_run_log(log: str, cap_s: float) -> dict:
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
    return facts


def full_split_tokens(vocab_size: int) -> int:
    """The published validation split the projections scale to: this vocabulary's, else the default's (sp8192:
    40,540,160 tokens)."""
    default = train_gpt.PUBLISHED_VAL_TOKENS[train_gpt.Settings().vocab_size][0]
    return train_gpt.PUBLISHED_VAL_TOKENS.get(vocab_size, (default,))[0]


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
    """TTT_METHOD=full's chunks, as train_gpt.Evaluator.evaluate_with_ttt forms them: windows by their first target."""
    ends = train_gpt.window_ends(num_scored, seq_len, stride)
    return len(np.unique(np.concatenate(([0], ends[:-1])) // chunk_tokens))


def scoring_batches(num_scored: int, settings: train_gpt.Settings, stride: int, ranks: int) -> int:
    """Batches that the busiest of `ranks` ranks scores in a plain (stride >= TRAIN_SEQ_LEN) or sliding pass, as
    train_gpt.Evaluator.scored_windows forms them: a batch is VAL_BATCH_SIZE / 8 tokens (with the default
    GRAD_ACCUM_STEPS, on 1 GPU as on 8), one packed row (PACK_DOCUMENTS=1, plain) or windows of TRAIN_SEQ_LEN."""
    seq_len, accum = settings.train_seq_len, settings.grad_accum_steps or max(1, REFERENCE_GPUS // ranks)
    batch, plain = settings.val_batch_size // (seq_len * ranks * accum), not 0 < stride < seq_len
    if settings.pack_documents and plain:
        seq_len, batch = min(batch * seq_len, num_scored), 1
    windows = len(train_gpt.window_ends(num_scored, seq_len, seq_len if plain else stride))
    return math.ceil(math.ceil(windows / ranks) / batch)


def busiest_rank(costs: list[int], ranks: int) -> int:
    """The cost of the busiest rank when train_gpt.share_by_cost shares these among `ranks` ranks."""
    return max(sum(costs[i] for i in share) for share in train_gpt.share_by_cost(costs, ranks))


def project_to_8_gpus(facts: dict, settings: train_gpt.Settings, documents: np.ndarray, chunk_tokens_8: int) -> dict:
    """The 1-GPU figures carried over to 8 GPUs, each with how; the evaluation's with what was measured here and what
    is scaled. `settings` are the timed run's, `documents` its split's (ttt_documents); a TTT_METHOD=full chunk there
    is one rank's share of `chunk_tokens_8`."""
    s, gpus, seq_len = settings, REFERENCE_GPUS, settings.train_seq_len
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
            "calibration_batches_1_gpu": s.gptq_calibration_batches,
            "how": "on 8 GPUs each rank calibrates on GPTQ_CALIBRATION_BATCHES / 8 and rank 0 rounds alone: where this "
                   "run calibrated on such a share (the session's does), about the 8-GPU time"}
    passes, val_tokens = facts.get("eval_passes") or {}, facts.get("val_tokens")
    if not val_tokens or not passes:
        return projection
    full, chunk_window = full_split_tokens(s.vocab_size), (s.ttt_chunk_tokens, s.train_seq_len)
    measured, scaled, how = {}, {}, {}
    for name, run in passes.items():
        if name == "ttt" and s.ttt_method == "lora":
            lengths = modeled_document_lengths(s.vocab_size)
            costs = train_gpt.ttt_batch_costs(train_gpt.ttt_batches(split_documents(lengths), s.ttt_batch_size),
                                              *chunk_window)
            here = sum(train_gpt.ttt_batch_costs(train_gpt.ttt_batches(documents, s.ttt_batch_size), *chunk_window))
            there = busiest_rank(costs, gpus)
            measured[name] = {"documents": len(documents), "batches": -(-len(documents) // s.ttt_batch_size),
                              "model_tokens": here}
            scaled[name] = {"full_split_modeled": {"documents": len(lengths), "tokens": int(lengths.sum()),
                                                   "batches": len(costs), "model_tokens": sum(costs)},
                            "model_tokens_busiest_of_8_ranks": there}
            how[name] = ("a batch of TTT_BATCH_SIZE documents is the same work on any rank, and the ranks share the "
                         "batches by their tokens through the model (model tokens: documents x window widths of the "
                         "chunk steps; share_by_cost): seconds per model token here, on batches picked from the "
                         "modeled full split, x the model tokens of the busiest of 8 ranks on the modeled full split "
                         "(log-normal document lengths, not the real split's); time taken as proportional to them")
        elif name == "ttt":
            here = ttt_chunk_count(val_tokens, seq_len, run["stride"], s.ttt_chunk_tokens)
            there = ttt_chunk_count(full, seq_len, run["stride"], chunk_tokens_8)
            measured[name], scaled[name] = {"chunks": here}, {"chunks_of_the_full_split": there}
            how[name] = ("a 1-GPU chunk is one rank's share of an 8-GPU chunk of the full split: seconds per chunk x "
                         "the full split's chunks")
        else:
            here = scoring_batches(val_tokens, s, run["stride"], 1)
            there = scoring_batches(full, s, run["stride"], gpus)
            measured[name], scaled[name] = {"batches": here}, {"batches_busiest_of_8_ranks": there}
            how[name] = ("a scoring batch has one shape on 1 and 8 GPUs: seconds per batch x the batches of the "
                         "busiest of 8 ranks on the full split")
        measured[name]["seconds"] = run["eval_time_ms"] / 1000
        scaled[name]["seconds"] = round(run["eval_time_ms"] / 1000 / here * there, 1)
    total = round(sum(p["seconds"] for p in scaled.values()), 1)
    projection["evaluation"] = {
        "measured_1_gpu": measured, "scaled_8_gpus": scaled, "how": how,
        "seconds_8_gpus": {name: p["seconds"] for name, p in scaled.items()}, "total_s": total,
        "over_the_cap": total > EVAL_CAP_S, "cap_s": EVAL_CAP_S, "full_split_tokens": full,
        "record_1_0714_8xh100_fa3_s": RECORD_EVAL_S,
        "assumes": f"the full split of {full:,} tokens; no all-reduce cost; compile warm-ups outside the timers"}
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
        facts = steps["environment"]["facts"]
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in facts.items() if k != "attention"]
        lines += attention_table(facts["attention"])
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
        lines += ["", "## Timed run (train_gpt.py, the default)", "",
                  f"- data: {steps['timed_run']['data']['source']}",
                  f"- cap {steps['timed_run']['cap_s']} s: train_time {facts['train_time_ms']} ms after "
                  f"{facts['steps']} steps, within the cap: {facts['train_time_within_cap']}",
                  f"- compile and warm-up: {facts['warmup_compile_ms']} ms; ledger {facts['time_ledger_ms']}",
                  f"- evaluation passes {facts['eval_passes']} (total {facts['eval_total_ms']} ms) on "
                  f"{facts['val_tokens']} validation tokens; final: {facts['final_scores']}",
                  f"- ms/step on this device: {facts['ms_per_step']}; GPTQ {facts['gptq_ms']} ms, train_time+gptq "
                  f"{facts['train_time_plus_gptq_ms']} ms; recompiles (TORCH_LOGS=recompiles): {facts['recompiles']}",
                  f"- artifact: {facts['artifact']}", f"- {facts['peak_memory']}"]
    projection = steps.get("timed_run", {}).get("projection_8xh100")
    if projection:
        lines += ["", "## Estimated for 8xH100 (projected from this device's figures)", "",
                  f"- training ms/step {projection['training_ms_per_step']}: {projection['training_how']}"]
        if "gptq" in projection:
            lines.append(f"- GPTQ: {projection['gptq']}")
        evaluation = projection.get("evaluation")
        if evaluation:
            over = " **OVER the 600 s cap**" if evaluation["over_the_cap"] else " (cap 600 s)"
            lines.append(f"- evaluation, estimated seconds on 8 GPUs {evaluation['seconds_8_gpus']}: total "
                         f"{evaluation['total_s']} s{over}; the 1.0714 record (FlashAttention 3), least and most of "
                         f"its 3 runs: {evaluation['record_1_0714_8xh100_fa3_s']}; assumes {evaluation['assumes']}")
            lines += [f"  - {name}: measured on 1 GPU {evaluation['measured_1_gpu'][name]}; scaled to 8 GPUs "
                      f"{evaluation['scaled_8_gpus'][name]}: {how}" for name, how in evaluation["how"].items()]
    return "\n".join(lines) + "\n"


def attention_table(attention: dict) -> list[str]:
    lines = ["", f"## Attention kernels ({attention['function']}; forward and backward, eager)", "",
             f"FLOPs: {attention['flops']}. Fastest, by forward + backward: {attention['fastest']}.", "",
             "| call | kernel | forward ms | forward TFLOP/s | backward ms | backward TFLOP/s | error |",
             "|---|---|---|---|---|---|---|"]
    for form, timings in attention["kernels"].items():
        call = attention["calls"][form]
        shape = (f"{form}: {call['batch']} x {call['seq']}, {call['documents']} documents (max {call['max_seqlen']}), "
                 f"heads {call['heads']}/{call['kv_heads']} x {call['head_dim']}")
        for kernel, t in timings.items():
            error = t.get("error", "").replace("|", "/")[:120]
            lines.append(f"| {shape} | {kernel} | {t.get('forward_ms', '')} | {t.get('forward_tflops', '')} | "
                         f"{t.get('backward_ms', '')} | {t.get('backward_tflops', '')} | {error} |")
    return lines


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
                        help=f"one GPU within --budget-s (540 s): {', '.join(SESSION_STEPS)} (bench/README.md)")
    parser.add_argument("--only", default=None, help=f"comma-separated steps of {', '.join(STEPS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="cap on the whole check (default: 1380 s; with --session 540 s; a dry run 600 s)")
    parser.add_argument("--timed-run-cap-s", type=float, default=None,
                        help=f"MAX_WALLCLOCK_SECONDS of the timed run (default 120; with --session "
                             f"{SESSION_TIMED_RUN_CAP_S:g})")
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
        args.budget_s = 600.0 if args.dry_run else 540.0 if args.session else 1380.0
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
    writes the report; the step's child and every process it started are killed by run_command on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe_environment:
        print(json.dumps(probe_environment(args.dry_run)))
        return 0
    if train_gpt.brotli is None:  # before the budget starts: every train_gpt.py run needs it
        sys.exit("error: the brotli package is missing (every train_gpt.py run compresses with it): pip install "
                 "brotli, or offline pip install --no-index BROTLI_WHEEL.whl with a wheel for this Python")
    prepare_out(args.out)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, exit_on_signal)
    work = make_work_folder()
    check = Check(args.out, work, args)
    print(f"gpu_check: {', '.join(args.only)} within {args.budget_s:.0f} s; each step's output and the report go "
          f"to {args.out} as they are written", flush=True)
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
