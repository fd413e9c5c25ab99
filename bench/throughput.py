"""Training throughput of train_gpt.py's settings on this machine: ms/step, tokens/s, memory, MFU.

    python3 bench/throughput.py                                        # one GPU (or the CPU / MPS)
    torchrun --standalone --nproc_per_node=8 bench/throughput.py       # 8 GPUs
    NUM_LAYERS=11 BENCH_STEPS=50 python3 bench/throughput.py           # any trainer setting

Every trainer setting is read as train_gpt.py reads it (Settings.from_env, setup_runtime), and the
trainer's own Trainer.step is timed: BENCH_STEPS steps (default 20) after BENCH_WARMUP_STEPS untimed
ones (default 5: compilation and allocator warm-up). The tokens are synthetic: uniform random ids after a
BOS, written as shards of the challenge format into a temporary folder that the real loader reads. With
PACK_DOCUMENTS=1 attention stays within documents (BOS to BOS, cut every TRAIN_SEQ_LEN tokens): random ids put a
BOS about every VOCAB_SIZE tokens, so most windows here span the full TRAIN_SEQ_LEN; shorter real documents attend
over less.
DATA_PATH is ignored, nothing is validated, exported or logged to disk. Rank 0 prints one JSON line
on stdout; bench/README.md explains every field and bench/flops.py the FLOP count behind MFU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "data")]

import train_gpt  # noqa: E402
from bench.flops import flops_per_token, matmul_params, model_flops_utilisation, peak_tflops  # noqa: E402
from shard_io import write_shard  # noqa: E402

SHARD_TOKENS = 100_000_000  # a full FineWeb shard; beyond it the stream wraps, as it moves to the next shard


@dataclass(frozen=True)
class BenchKnobs:
    """The benchmark's own settings; everything else is a train_gpt.py setting."""
    steps: int = 20  # BENCH_STEPS: timed optimizer steps
    warmup_steps: int = 5  # BENCH_WARMUP_STEPS: untimed steps before them
    peak_tflops: float = 0.0  # BENCH_PEAK_TFLOPS: peak of one device for MFU; 0 = the device table
    progress: float = 0.0  # BENCH_PROGRESS: the training progress (0..1) the steps run at, e.g. 0.6 to time
    #                         the phase after depth recurrence switches on (RECUR_START_FRAC)

    @classmethod
    def from_env(cls, env=os.environ) -> BenchKnobs:
        values = {}
        for f in dataclasses.fields(cls):
            name, raw = f"BENCH_{f.name.upper()}", env.get(f"BENCH_{f.name.upper()}", "").strip()
            values[f.name] = train_gpt.parse_setting(name, raw, type(f.default)) if raw else f.default
        knobs = cls(**values)
        train_gpt.require(knobs.steps >= 1, "BENCH_STEPS", knobs.steps, "a whole number >= 1")
        train_gpt.require(knobs.warmup_steps >= 0, "BENCH_WARMUP_STEPS", knobs.warmup_steps, "a whole number >= 0")
        train_gpt.require(knobs.peak_tflops >= 0, "BENCH_PEAK_TFLOPS", knobs.peak_tflops,
                          "a number >= 0 (TFLOP/s of one device; 0 = look the device up)")
        train_gpt.require(0 <= knobs.progress <= 1, "BENCH_PROGRESS", knobs.progress, "a fraction in [0, 1]")
        return knobs


def write_synthetic_shard(folder: Path, vocab_size: int, num_tokens: int, seed: int) -> None:
    """Uniform random ids as one training shard that starts with a document, as the challenge's do; every rank writes
    the same one (same seed)."""
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=num_tokens, dtype=np.uint16)
    tokens[0] = train_gpt.BOS_ID
    write_shard(folder / "fineweb_train_000000.bin", tokens)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if sys.platform == "linux":
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            return models[0]
    return platform.processor() or platform.machine()


def time_steps(trainer: train_gpt.Trainer, runtime: train_gpt.Runtime, first_step: int, steps: int,
               progress: float) -> tuple[list[float], float]:
    """Milliseconds of each step, and of all of them on the wall clock between two device syncs.
    CUDA: events between steps, so that no host sync happens inside the timed region (train_gpt.train
    does not sync per step either on one GPU); elsewhere the host clock with a sync after each step."""
    runtime.sync()
    t_start = time.perf_counter()
    if runtime.device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        marks[0].record()
        for i in range(steps):
            trainer.step(first_step + i, 1.0, progress)
            marks[i + 1].record()
        runtime.sync()
        step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    else:
        step_ms = []
        for i in range(steps):
            t = time.perf_counter()
            trainer.step(first_step + i, 1.0, progress)
            runtime.sync()
            step_ms.append(1000 * (time.perf_counter() - t))
    return step_ms, 1000 * (time.perf_counter() - t_start)


def peak_memory_mib(runtime: train_gpt.Runtime) -> list[float]:
    """[CUDA max allocated, CUDA max reserved, process peak RSS] in MiB; NaN where there is none."""
    nan = float("nan")
    cuda = runtime.device.type == "cuda"
    allocated = torch.cuda.max_memory_allocated(runtime.device) / 2**20 if cuda else nan
    reserved = torch.cuda.max_memory_reserved(runtime.device) / 2**20 if cuda else nan
    rss = nan
    if sys.platform != "win32":
        import resource
        rss_raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss = rss_raw / (2**20 if sys.platform == "darwin" else 2**10)
    return [allocated, reserved, rss]


def measure(settings: train_gpt.Settings, runtime: train_gpt.Runtime, knobs: BenchKnobs,
            token_folder: Path) -> dict:
    """Build the trainer on synthetic shards, time its steps, and describe the result as one dict."""
    s, rt = settings, runtime
    # Enough tokens that the timed steps never re-read the shard, up to one full shard as on real data. A step reads
    # at most TRAIN_BATCH_TOKENS + LOADER_STREAMS: PACK_DOCUMENTS=1 reads LOADER_STREAMS rows of one token more.
    step_tokens = s.train_batch_tokens + max(1, s.loader_streams)
    num_tokens = min((knobs.warmup_steps + knobs.steps) * step_tokens, SHARD_TOKENS)
    write_synthetic_shard(token_folder, s.vocab_size, num_tokens, s.seed)
    s = dataclasses.replace(s, data_path=str(token_folder))
    trainer = train_gpt.Trainer(s, rt)
    for step in range(knobs.warmup_steps):
        trainer.step(step, 1.0, knobs.progress)
    rt.sync()
    if rt.device.type == "cuda":  # the peak of the timed steps, not of compilation
        torch.cuda.reset_peak_memory_stats(rt.device)
    step_ms, wall_ms = time_steps(trainer, rt, knobs.warmup_steps, knobs.steps, knobs.progress)
    per_rank = step_ms + [wall_ms] + peak_memory_mib(rt)
    if rt.distributed:  # a step ends when its slowest rank ends; memory: the fullest rank
        reduced = torch.tensor(per_rank, dtype=torch.float64, device=rt.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        per_rank = reduced.tolist()
    step_ms, wall_ms, memory = per_rank[:knobs.steps], per_rank[knobs.steps], per_rank[knobs.steps + 1:]

    p10, median, p90 = np.percentile(step_ms, [10, 50, 90]).tolist()
    tokens_per_s = s.train_batch_tokens / (median / 1000)
    tokens_per_s_per_device = tokens_per_s / rt.world_size
    name = device_name(rt.device)
    recurrence = trainer.model.recurrence_active
    flops = flops_per_token(s, recurrence)
    peak, peak_source = peak_tflops(rt.device.type, name, knobs.peak_tflops)
    mfu = model_flops_utilisation(flops, tokens_per_s_per_device, peak)
    mib = [None if m != m else round(m, 1) for m in memory]  # NaN -> null
    return {
        "device": {"type": rt.device.type, "name": name},
        "world_size": rt.world_size,
        "grad_accum_steps": rt.grad_accum_steps,
        "settings": {
            "num_layers": s.num_layers, "model_dim": s.model_dim, "num_heads": s.num_heads,
            "num_kv_heads": s.num_kv_heads, "mlp_mult": s.mlp_mult, "vocab_size": s.vocab_size,
            "tie_embeddings": s.tie_embeddings, "train_seq_len": s.train_seq_len,
            "train_batch_tokens": s.train_batch_tokens, "compile": rt.compile,
            "compute_dtype": str(rt.compute_dtype).removeprefix("torch."),
        },
        "bench_steps": knobs.steps,
        "bench_warmup_steps": knobs.warmup_steps,
        "bench_progress": knobs.progress,
        "ms_per_step": {"median": round(median, 3), "mean": round(wall_ms / knobs.steps, 3),
                        "min": round(min(step_ms), 3), "max": round(max(step_ms), 3),
                        "p10": round(p10, 3), "p90": round(p90, 3)},
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_device": round(tokens_per_s_per_device, 1),
        "peak_memory_mib": {"cuda_max_allocated": mib[0], "cuda_max_reserved": mib[1], "process_rss": mib[2]},
        "model_params": sum(p.numel() for p in trainer.model.parameters()),
        "depth_recurrence": recurrence,
        "matmul_params": matmul_params(s, recurrence),
        "flops_per_token": flops,
        "model_tflops_per_s_per_device": round(flops * tokens_per_s_per_device / 1e12, 4),
        "peak_tflops_per_device": peak,
        "peak_tflops_source": peak_source,
        "mfu": None if mfu is None else round(mfu, 6),
        "tokens": "synthetic",
        "torch": torch.__version__,
    }


def main() -> None:
    try:
        knobs = BenchKnobs.from_env()
        settings = train_gpt.Settings.from_env()
        runtime = train_gpt.setup_runtime(settings)
    except train_gpt.SettingsError as e:
        sys.exit(f"error: {e}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench_tokens_") as token_folder:
            result = measure(settings, runtime, knobs, Path(token_folder))
        if runtime.is_master:
            print(json.dumps(result), flush=True)
    finally:
        train_gpt.close_process_group()


if __name__ == "__main__":
    main()
