"""Wall time of the README's smoke run, as a user runs it from the repository root:

    python3 data/build_smoke_dataset.py && PRESET=smoke python3 train_gpt.py

    python3 bench/smoke_time.py                  # once, on 2 cores
    python3 bench/smoke_time.py --repeat 3       # three times; the median is the figure to quote
    python3 bench/smoke_time.py --cores 0        # on every core, not pinned

For each run it prints a line for both commands together: their wall seconds (the figure the README quotes;
the target is under 60 s on a loaded 2-core machine), their CPU seconds, the 1-minute load average before
the run and its mean during it, the trainer's first and final validation loss and its RUN_ID. Then a line
per command, `<script>: W s wall, C CPU s; load average B before, D during`: the CPU seconds are user + sys
of the command and every process it waited for (C well above W x the cores means threads fighting over
them), the load average is read before it starts, once a second while it runs and when it ends (the
machine's other work, plus the command's own: on 2 cores, a load near 0 before means idle). Then the
trainer's time_ledger. The first line names OMP_NUM_THREADS, which the commands inherit: compare
`python3 bench/smoke_time.py` with `OMP_NUM_THREADS=1 python3 bench/smoke_time.py`. --cores N pins both
commands to N cores (Linux), as on an N-core laptop. The runs write what the README's command writes:
data/smoke/ and, under a fresh RUN_ID each time, logs/<RUN_ID>.txt and its artifact. It measures; it
asserts nothing.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ([sys.executable, "data/build_smoke_dataset.py"], [sys.executable, "train_gpt.py"])


class LoadSampler:
    """The 1-minute load average when a command starts, then once a second while it runs, and when it ends."""

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
        self.samples.append(os.getloadavg()[0])


@dataclass
class CommandTiming:
    name: str
    wall_s: float
    cpu_s: float  # user + sys of the command and the processes it waited for
    load_samples: list[float]  # before it started, then while it ran (the last one when it ended)
    stdout: str

    @property
    def load_before(self) -> float:
        return self.load_samples[0]

    @property
    def load_during(self) -> float:
        return statistics.mean(self.load_samples[1:])

    def line(self) -> str:
        return (f"{self.name}: {self.wall_s:.1f} s wall, {self.cpu_s:.1f} CPU s; load average {self.load_before:.2f} "
                f"before, {self.load_during:.2f} during")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(command: list[str], env: dict, cores: list[int] | None) -> CommandTiming:
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    cpu_before = children_cpu_seconds()  # the children's usage counts once they are waited for: per command
    with LoadSampler() as load:
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=pin)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: `{' '.join(command[1:])}` failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return CommandTiming(Path(command[1]).name, seconds, children_cpu_seconds() - cpu_before, load.samples,
                         result.stdout)


def smoke_run(cores: list[int] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PRESET="smoke")
    build, train = (run_command(command, env, cores) for command in COMMANDS)
    out = train.stdout
    val_losses = re.findall(r"^(?:step:\d+/\d+ |final_\w+_roundtrip_exact )val_loss:(\S+)", out, re.M)
    return {"commands": (build, train), "total_s": build.wall_s + train.wall_s, "cpu_s": build.cpu_s + train.cpu_s,
            "load_mean": statistics.mean(build.load_samples[1:] + train.load_samples[1:]),
            "val_loss_first": float(val_losses[0]), "val_loss_final": float(val_losses[-1]),
            "ledger": re.search(r"^time_ledger (.*)$", out, re.M).group(1),
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
    print(f"cores: {len(cores) if cores else os.cpu_count()} of {os.cpu_count()}; python {sys.version.split()[0]}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    totals, cpu_totals = [], []
    for i in range(args.repeat):
        r = smoke_run(cores)
        totals.append(r["total_s"])
        cpu_totals.append(r["cpu_s"])
        build, train = r["commands"]
        print(f"run {i + 1}: total {r['total_s']:.1f} s wall (build {build.wall_s:.1f} s, train_gpt.py "
              f"{train.wall_s:.1f} s), {r['cpu_s']:.1f} CPU s; load average {build.load_before:.2f} before, "
              f"{r['load_mean']:.2f} during; val_loss {r['val_loss_first']:.4f} -> {r['val_loss_final']:.4f}; "
              f"run_id {r['run_id']}")
        for command in (build, train):
            print(f"  {command.line()}")
        print(f"  time_ledger {r['ledger']}")
    print(f"median total wall: {statistics.median(totals):.1f} s over {len(totals)} run(s); median total CPU: "
          f"{statistics.median(cpu_totals):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
