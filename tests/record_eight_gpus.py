"""The 1.0714 record's own code as its 8-GPU run, on the CPU: its source (reference_record's CPU copy) in 8 gloo
processes started by torchrun, each with its real DocumentPackingLoader and the sharded Muon path of its Muon (the
record's, edited to fp32: record_pieces.FP32_MUON), no DDP, as on 8 GPUs.

`run_record_training(folder, env)`: its `train_model` alone. What a test cannot run as is, it replaces: the clock
ticks 1 s per step (each rank reads one batch a step), so that the LR warm-down and the looping switch fall where the
test wants them; the evaluation returns 0. Rank 0 saves the initial weights, the weights before the EMA (when it logs
`ema:applying`) and after, under the kit's names, and each step's learning rates, Muon momentum and looping flag.

`run_record_end_to_end(folder, env)`: its whole `train_and_eval` (training, GPTQ, export, the round trip, LoRA TTT);
returns rank 0's log. Its edits, each checked against the source: the training loss it logs is the mean of the 8
GPUs' (MEAN_LOSS; it logs rank 0's own), and each TTT batch's adapters are drawn as the kit draws them
(test_lora_ttt.record_edits). Its code-size count runs pyminify, which the kit does not install: it counts the plain
source instead (the model bytes, which the tests compare, do not depend on it).

This file is also each rank's script.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]  # train_gpt, which the edits' helpers import (the run's folder is its cwd)


# The record logs rank 0's own training loss, the kit the mean over the 8 GPUs: the record's, edited to log the mean.
MEAN_LOSS = (("        train_loss /= h.grad_accum_steps\n", "        train_loss /= h.grad_accum_steps\n"
              "        dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)\n", 1),)


def launch(folder: Path, mode: str, env: dict, nproc: int, timeout: float) -> subprocess.CompletedProcess:
    """This file as the record's `nproc` GPUs (torchrun, gloo, one thread each), with its Hyperparameters from `env`."""
    folder.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             __file__, str(folder), mode], env={**clean, **{k: str(v) for k, v in env.items()},
                                                                 "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=timeout, cwd=folder)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def run_record_training(folder: Path, env: dict, nproc: int = 8, timeout: float = 600) -> SimpleNamespace:
    """The record's Hyperparameters from `env` (its variable names); its outputs as saved by rank 0."""
    result = launch(folder, "train", env, nproc, timeout)
    return SimpleNamespace(**torch.load(folder / "record_run.pt"), log=result.stdout)


def run_record_end_to_end(folder: Path, env: dict, nproc: int = 8, timeout: float = 600) -> str:
    """Rank 0's log of the record's whole run; its files (model, artifact, log) go into `folder`."""
    launch(folder, "end_to_end", {**env, "ARTIFACT_DIR": folder, "RUN_ID": "record"}, nproc, timeout)
    return (folder / "record.txt").read_text(encoding="utf-8")


def end_to_end_as_rank(folder: Path) -> None:
    import torch.distributed as dist

    from record_pieces import FP32_MUON, record_pieces
    from reference_record import load_record
    from test_lora_ttt import record_edits

    rank = int(os.environ["RANK"])
    ranks = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    record = load_record(folder / f"rank{rank}", ranks, record="1.0714", edits=MEAN_LOSS + record_edits(folder))
    record.Muon = record_pieces({"zeropower_via_newtonschulz5", "Muon"}, FP32_MUON).Muon
    record._compressed_code_size = lambda code: (len(code.encode("utf-8")),) * 2  # not pyminify: the plain source
    h = record.Hyperparameters()
    record.set_logging_hparams(h)  # as its main(): rank 0 writes the log
    dist.init_process_group("gloo")
    record.train_and_eval(h, torch.device("cpu"))
    dist.destroy_process_group()


def train_as_rank(folder: Path) -> None:
    import torch.distributed as dist

    from record_pieces import FP32_MUON, record_pieces
    from reference_record import kit_state_dict_1_0714, load_record

    rank = int(os.environ["RANK"])
    ranks = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    record = load_record(folder / f"rank{rank}", ranks, record="1.0714")  # a copy each: no rank reads a half-written
    h, clock, saved = record.Hyperparameters(), [0.0], dict(schedule=[])

    def kit_names(model) -> dict:
        return {k: v.detach().clone() for k, v in kit_state_dict_1_0714(record, model.state_dict()).items()}

    class TickingLoader(record.DocumentPackingLoader):
        def next_batch(self, *args):
            clock[0] += 1.0  # one batch a step on each of the 8 ranks: every step takes 1 s exactly
            return super().next_batch(*args)

    class RecordingOptimizers(record.Optimizers):
        def step(self, distributed=False):
            lrs = [g["lr"] for opt in self for g in opt.param_groups]
            saved["schedule"].append((lrs, self.optimizer_muon.param_groups[0]["momentum"], model[0].looping_active))
            super().step(distributed)

    model, record_gpt = [], record.GPT  # the model train_model builds

    def build(h):
        model.append(record_gpt(h))
        saved["initial"] = kit_names(model[0])
        return model[0]

    def log(msg, console=True):
        if msg.startswith("ema:applying"):  # just before the record loads its EMA into the model
            saved["raw"] = kit_names(model[0])
        if rank == 0:
            print(msg)

    fp32_muon = record_pieces({"zeropower_via_newtonschulz5", "Muon"}, FP32_MUON).Muon
    for name, value in dict(GPT=build, DocumentPackingLoader=TickingLoader, Optimizers=RecordingOptimizers,
                            Muon=fp32_muon, eval_val=lambda *a, **k: (0.0, 0.0), log=log,
                            time=SimpleNamespace(perf_counter=lambda: clock[0])).items():
        setattr(record, name, value)
    dist.init_process_group("gloo")
    torch.manual_seed(h.seed)  # as its train_and_eval
    record.train_model(h, torch.device("cpu"), None)
    if rank == 0:
        torch.save(dict(saved, final=kit_names(model[0])), folder / "record_run.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    (train_as_rank if sys.argv[2] == "train" else end_to_end_as_rank)(Path(sys.argv[1]))
