"""Wall time of the README's smoke run, as a user runs it from the repository root:

    python3 data/build_smoke_dataset.py && PRESET=smoke python3 train_gpt.py

    python3 bench/smoke_time.py                  # once, on 2 cores
    python3 bench/smoke_time.py --repeat 3       # three times; the median is the figure to quote
    python3 bench/smoke_time.py --cores 0        # on every core, not pinned

For each run it prints the wall seconds of the two commands and of both together (the figure the README
quotes; the target is under 60 s on 2 idle cores), the CPU seconds they used, the 1-minute load average
before the run and its mean during it (the machine's other work: on 2 cores, a load near 0 means idle), the
trainer's time_ledger and its first and final validation loss. --cores N pins both commands to N cores
(Linux), as on an N-core laptop. The runs write what the README's command writes: data/smoke/ and, under a
fresh RUN_ID each time, logs/<RUN_ID>.txt and its artifact. It measures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ([sys.executable, "data/build_smoke_dataset.py"], [sys.executable, "train_gpt.py"])


class LoadSampler:
    """The 1-minute load average, read once a second while a run lasts."""

    def __init__(self):
        self.samples, self.stop = [os.getloadavg()[0]], threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.wait(1.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(command: list[str], env: dict, cores: list[int] | None) -> tuple[float, str]:
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=pin)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: `{' '.join(command[1:])}` failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def smoke_run(cores: list[int] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PRESET="smoke")
    cpu_before = children_cpu_seconds()
    with LoadSampler() as load:
        build_s, _ = run_command(COMMANDS[0], env, cores)
        train_s, out = run_command(COMMANDS[1], env, cores)
    val_losses = re.findall(r"^(?:step:\d+/\d+ |final_\w+_roundtrip_exact )val_loss:(\S+)", out, re.M)
    return {"build_s": build_s, "train_s": train_s, "total_s": build_s + train_s,
            "cpu_s": children_cpu_seconds() - cpu_before, "load_before": load.samples[0],
            "load_mean": statistics.mean(load.samples), "val_loss_first": float(val_losses[0]),
            "val_loss_final": float(val_losses[-1]), "ledger": re.search(r"^time_ledger (.*)$", out, re.M).group(1),
            "run_id": re.search(r"^run_id:(\S+)", out, re.M).group(1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs, one after the other (default 1)")
    parser.add_argument("--cores", type=int, default=2, help="pin to this many cores (default 2; 0: all)")
    args = parser.parse_args(argv)
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = available[:args.cores] if args.cores and available else None
    if args.cores and (cores is None or len(cores) < args.cores):
        print(f"note: cannot pin to {args.cores} cores here; the runs use {len(cores or available) or 'all'}")
    print(f"cores: {len(cores) if cores else os.cpu_count()} of {os.cpu_count()}; python {sys.version.split()[0]}")
    totals = []
    for i in range(args.repeat):
        r = smoke_run(cores)
        totals.append(r["total_s"])
        print(f"run {i + 1}: total {r['total_s']:.1f} s wall (build {r['build_s']:.1f} s, train_gpt.py "
              f"{r['train_s']:.1f} s), {r['cpu_s']:.1f} CPU s; load average {r['load_before']:.2f} before, "
              f"{r['load_mean']:.2f} during; val_loss {r['val_loss_first']:.4f} -> {r['val_loss_final']:.4f}; "
              f"run_id {r['run_id']}")
        print(f"  time_ledger {r['ledger']}")
    print(f"median total wall: {statistics.median(totals):.1f} s over {len(totals)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
