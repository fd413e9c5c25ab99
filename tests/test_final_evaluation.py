"""The final evaluation: which passes run (each announced by `eval_pass:` and ended by its pair of final lines),
their total against the 600 s evaluation cap, and on two ranks TTT's one all-reduce per step and dynamo's DDP
setting."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO
from test_cuda_paths_on_cpu import cpu_runtime, perturbed_model, tiny


class StubEvaluator:
    """Notes which scorer each pass calls, with which stride; each pass takes `seconds` on a fake clock."""
    row_tokens = 64

    def __init__(self, clock: list, seconds: float):
        self.clock, self.seconds, self.calls = clock, seconds, []

    def evaluate(self, model, stride=0, stage="validation"):
        return self.score("evaluate", stride, 2.0)

    def evaluate_with_ttt(self, model, stride, stage="ttt_eval"):
        return self.score("evaluate_with_ttt", stride, 1.9)

    def evaluate_with_lora_ttt(self, model, stride, stage="ttt_eval"):
        return self.score("evaluate_with_lora_ttt", stride, 1.9)

    def score(self, scorer, stride, val_loss):
        self.calls.append((scorer, stride))
        self.clock[0] += self.seconds
        return val_loss, val_loss / 2


def final_evaluation(tmp_path, monkeypatch, seconds_per_pass: float = 1.0, **overrides):
    """export_and_rescore of a tiny model with a stub evaluator; returns (log lines, scorer calls)."""
    settings = tiny(export_quant="rtn", run_id="final", **overrides)
    clock = [0.0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(train_gpt, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    model, evaluator, lines = perturbed_model(settings), StubEvaluator(clock, seconds_per_pass), []
    train_gpt.export_and_rescore(SimpleNamespace(model=model, compiled=model), evaluator, (b"code", b"code"), "",
                                 {"training": 0.0}, lines.append, settings, cpu_runtime())
    return lines, evaluator.calls


@pytest.mark.parametrize("ttt_epochs, eval_sliding, eval_stride, expected", [
    (3, 0, 4, [("roundtrip", "evaluate", 0), ("ttt", "evaluate_with_ttt", 4)]),  # TTT's scoring slides
    (3, 1, 4, [("roundtrip", "evaluate", 0), ("sliding", "evaluate", 4), ("ttt", "evaluate_with_ttt", 4)]),
    (3, 0, 0, [("roundtrip", "evaluate", 0), ("ttt", "evaluate_with_ttt", 0)]),
    (0, 0, 4, [("sliding", "evaluate", 4)]),  # TTT off: the sliding pass is the score
    (0, 1, 4, [("sliding", "evaluate", 4)]),
    (0, 0, 0, [("roundtrip", "evaluate", 0)]),  # the baseline's one plain pass
])
def test_the_final_passes_follow_ttt_and_eval_sliding(tmp_path, monkeypatch, ttt_epochs, eval_sliding,
                                                      eval_stride, expected):
    lines, calls = final_evaluation(tmp_path, monkeypatch, ttt_epochs=ttt_epochs, eval_sliding=eval_sliding,
                                    eval_stride=eval_stride)
    announced = [line.split()[0].removeprefix("eval_pass:") for line in lines if line.startswith("eval_pass:")]
    assert announced == [name for name, _, _ in expected]
    assert calls == [(scorer, stride) for _, scorer, stride in expected]


def test_each_pass_is_announced_then_ended_by_its_pair_and_the_last_pair_is_the_ttt_score(tmp_path, monkeypatch):
    lines, _ = final_evaluation(tmp_path, monkeypatch, ttt_epochs=3, eval_sliding=1, eval_stride=4)
    tail = lines[next(i for i, line in enumerate(lines) if line.startswith("eval_pass:")):]
    assert [line.split()[0] for line in tail] == [
        "eval_pass:roundtrip", "final_int6_brotli_roundtrip", "final_int6_brotli_roundtrip_exact",
        "eval_pass:sliding", "final_int6_brotli_roundtrip", "final_int6_brotli_roundtrip_exact",
        "eval_pass:ttt", "final_int6_brotli_roundtrip", "final_int6_brotli_roundtrip_exact", "eval_total:3000ms"]
    assert tail[0] == "eval_pass:roundtrip stride:16 window:16"  # plain windows: stride = window
    assert tail[6] == "eval_pass:ttt stride:4 window:16 epochs:3 lr:0.005 chunk_tokens:32768"
    assert tail[1] == "final_int6_brotli_roundtrip val_loss:2.0000 val_bpb:1.0000 eval_time:1000ms"
    assert tail[8] == "final_int6_brotli_roundtrip_exact val_loss:1.90000000 val_bpb:0.95000000"


def test_lora_ttt_follows_the_round_trip_of_packed_rows_and_is_announced_with_its_settings(tmp_path, monkeypatch):
    lines, calls = final_evaluation(tmp_path, monkeypatch, ttt_epochs=1, eval_stride=4, ttt_method="lora",
                                    ttt_chunk_tokens=8, pack_documents=1)
    assert calls == [("evaluate", 0), ("evaluate_with_lora_ttt", 8)]  # its chunks are its stride
    assert [line for line in lines if line.startswith("eval_pass:")] == [
        "eval_pass:roundtrip stride:16 window:16 packed_rows:64",
        "eval_pass:ttt stride:8 window:16 lora_rank:96 lr:0.0001 steps:1 docs_per_batch:64 chunk_tokens:8"]


@pytest.mark.parametrize("seconds_per_pass, warned", [(300.0, False), (300.001, True)])
def test_evaluation_over_600_s_in_total_logs_a_warning(tmp_path, monkeypatch, seconds_per_pass, warned):
    lines, _ = final_evaluation(tmp_path, monkeypatch, seconds_per_pass, ttt_epochs=3, eval_stride=4)
    assert f"eval_total:{2000 * seconds_per_pass:.0f}ms" in lines
    warnings = [line for line in lines if line.startswith("WARNING: evaluation took")]
    assert len(warnings) == warned and (not warned or "over 600 s" in warnings[0])


# ---- two ranks ---------------------------------------------------------------------------------------

TWO_RANK_SCRIPT = r'''
import dataclasses, functools, json, sys
import numpy as np, torch, torch.distributed as dist
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
import train_gpt
from test_cuda_paths_on_cpu import perturbed_model, tiny
from test_final_evaluation import ttt_case

settings = tiny(device="cpu", vocab_size=96)
runtime = train_gpt.setup_runtime(settings)  # the default OPTIMIZE_DDP
report = {"optimize_ddp": torch._dynamo.config.optimize_ddp}

# TTT: count the all-reduces
calls = []
all_reduce = dist.all_reduce
dist.all_reduce = lambda tensor, *a, **k: calls.append(tensor.numel()) or all_reduce(tensor, *a, **k)
ev, model = ttt_case(runtime)
report["ttt"] = ev.evaluate_with_ttt(model, 4)
report["all_reduces"] = calls
dist.all_reduce = all_reduce

# The compiled DDP model: graphs handed to the compiler by one forward, with the setting and with dynamo's default
orig_compile = torch.compile
def graphs_per_forward(big):
    torch._dynamo.reset()
    count = []
    def backend(gm, example_inputs):
        count.append(1)
        return gm.forward
    torch.compile = functools.partial(orig_compile, backend=backend)
    trainer = train_gpt.Trainer(big, dataclasses.replace(runtime, compile=True))
    inputs, targets = trainer.loader.next_step()[0]
    trainer.train_model(inputs, targets).mean().backward()
    torch.compile = orig_compile
    return len(count)
big = tiny(device="cpu", vocab_size=int(sys.argv[3]), model_dim=128, num_heads=2, num_kv_heads=1, num_layers=4,
           recur_layers="", data_path=sys.argv[2], train_batch_tokens=256)  # 2.5 MB of weights; DDP's first bucket 1 MB
report["graphs_with_the_setting"] = graphs_per_forward(big)
torch._dynamo.config.optimize_ddp = True
report["graphs_split_at_buckets"] = graphs_per_forward(big)
if runtime.is_master:
    print("REPORT " + json.dumps(report))
train_gpt.close_process_group()
'''


def ttt_case(runtime):
    """A perturbed tiny model and 12 sequences of random tokens, TTT on chunks of 40 tokens, 2 epochs: 5 chunks
    (by the first target of each window: 0-39, ..., 160-191), 4 trained, so 2 x 4 = 8 steps."""
    batch = 4 * 16 * runtime.world_size * runtime.grad_accum_steps  # 4 windows per rank and batch
    settings = tiny(vocab_size=96, val_batch_size=batch, ttt_chunk_tokens=40, ttt_epochs=2, ttt_lr=0.05)
    tokens = np.random.default_rng(5).integers(0, 96, 12 * 16 + 1).astype(np.uint16)
    table = train_gpt.ByteTable(np.ones(96, np.int64), np.zeros(96, bool), np.zeros(96, bool))
    model = perturbed_model(settings)
    model.recurrence_active = True
    return train_gpt.Evaluator(train_gpt.ValidationSplit(tokens, True), table, settings, runtime), model


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory, tiny_dataset) -> dict:
    folder = tmp_path_factory.mktemp("two_ranks")
    script = folder / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(REPO), tiny_dataset.data_path, str(tiny_dataset.vocab_size)],
                          capture_output=True, text=True, timeout=600, cwd=folder,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("REPORT ", 1)[1].splitlines()[0])


def test_ttt_takes_one_flat_all_reduce_per_step_and_two_ranks_score_as_one(two_rank_report):
    ev, model = ttt_case(cpu_runtime())
    one_rank = ev.evaluate_with_ttt(model, 4)
    num_params = sum(p.numel() for p in model.parameters())
    assert two_rank_report["all_reduces"] == [num_params] * 8 + [3]  # 8 steps, then the (nats, tokens, bytes)
    assert two_rank_report["ttt"] == pytest.approx(one_rank, rel=1e-6)


def test_optimize_ddp_default_compiles_the_ddp_model_as_one_graph(two_rank_report):
    """The record sets torch._dynamo.config.optimize_ddp=False; dynamo's own default splits the graph at DDP's
    gradient buckets (the second figure shows the split happens for this model)."""
    assert two_rank_report["optimize_ddp"] is False
    assert two_rank_report["graphs_with_the_setting"] == 1 < two_rank_report["graphs_split_at_buckets"]
