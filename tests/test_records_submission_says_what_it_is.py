"""records/: a submission says what it is: the hardware its track requires, the pass its score came from, the text
it was scored on (and --compare-to compares only scores of one text), commands that start fresh runs; and
compare_runs.py plots two groups' training curves.
"""
from __future__ import annotations

import json
import math
import re
import subprocess

import pytest

from test_records import (TOKENS_PER_BYTE, UNPUBLISHED, bpb_of, folder_of, read_summary, refused_by, render_log,
                          submit, write_logs)

import compare_runs  # noqa: E402  (records/ is on sys.path through test_records)
import make_submission  # noqa: E402
from run_log import read_run_log  # noqa: E402
from training_curves import training_figure  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The 10-minute track is 8xH100 SXM, by what the log says.


@pytest.mark.parametrize("device", ["cpu name:x86_64 world_size:1", "cuda name:NVIDIA H100 80GB HBM3 world_size:16",
                                    "cuda name:NVIDIA H100 PCIe world_size:8"])
def test_the_10_minute_track_refuses_a_log_of_other_hardware(tmp_path, capsys, device):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(2, 2.07, device=device))
    refused_by("make_submission", tmp_path, capsys, logs, "the 10-minute track is 8xH100 SXM",
               "a run on other hardware belongs on the non-record track: pass --track non_record_16mb")
    assert submit(tmp_path, logs, track="non_record_16mb") == 0


# ----------------------------------------------------------------------------------------------
# The pass the score came from, named in the README, its table, submission.json and the plot.


def sliding_log(seed: int, loss: float) -> str:
    """A run of the trainer with EVAL_STRIDE on and TTT off: its only final pass is the sliding one."""
    text = re.sub(r"^final_int8_zlib_roundtrip.*\n", "", render_log(seed, loss), flags=re.MULTILINE)
    return text.replace("time_ledger", f"eval_pass:sliding stride:64 window:2048\n"
                                       f"final_int8_zlib_roundtrip val_loss:{loss:.4f} val_bpb:{bpb_of(loss):.4f} "
                                       f"eval_time:90000ms\nfinal_int8_zlib_roundtrip_exact val_loss:{loss:.8f} "
                                       f"val_bpb:{bpb_of(loss):.8f}\ntime_ledger")


@pytest.mark.parametrize("kind, score_pass, told", [("roundtrip", "roundtrip", "round-trip"),
                                                    ("sliding", "sliding", "sliding-window"), ("ttt", "ttt", "TTT")])
def test_the_folder_names_the_pass_the_score_came_from(tmp_path, kind, score_pass, told):
    losses = (2.04, 2.05)
    texts = [sliding_log(s, x) if kind == "sliding" else render_log(s, 2.10, ttt_loss=x) if kind == "ttt" else
             render_log(s, x) for s, x in zip((1, 2), losses)]
    assert submit(tmp_path, write_logs(tmp_path / "logs", *texts)) == 0
    summary, readme = read_summary(tmp_path), (folder_of(tmp_path) / "README.md").read_text()
    assert summary["score_pass"] == score_pass and [s["score_pass"] for s in summary["seeds"]] == [score_pass] * 2
    assert f"- {told} val_bpb **{summary['val_bpb']:.8f}** (mean of 2 seeds" in readme
    assert f"| seed | steps | ms/step | pre-export val_bpb | {told} val_bpb | artifact bytes | log |" in readme
    runs = [read_run_log(path) for path in sorted((folder_of(tmp_path)).glob("seed*.txt"))]
    labels = list(make_submission.seed_curves(runs))
    assert labels == [f"seed {s} ({told} {bpb_of(x):.4f})" for s, x in zip((1, 2), losses)]


# ----------------------------------------------------------------------------------------------
# The code the folder ships is what the logs counted; the reproduce commands start fresh runs.


def test_the_reproduce_command_gives_each_run_a_fresh_run_id(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(2, 2.07))
    assert submit(tmp_path, logs) == 0
    command = re.search(r"^  (RUN_ID=.*?) SEED=\$SEED ", (folder_of(tmp_path) / "README.md").read_text(),
                        re.MULTILINE).group(1)
    shell = subprocess.run(["bash", "-c", f"SEED=2; {command}; echo $RUN_ID"], capture_output=True, text=True)
    run_id = shell.stdout.strip()
    assert re.fullmatch(r"reproduce_seed2_\d{8}_\d{6}", run_id), shell  # the trainer's RUN_ID characters
    assert run_id not in {"seed1", "seed2"}  # never a RUN_ID the logs' author has used


# ----------------------------------------------------------------------------------------------
# Scores of one text only: --compare-to and the published split.


OTHER_SPLIT = "tokens:1000448 sha256:aaaaaaaaaaaaaaaa scope:full"  # not a published split's count


def logs_of_split(folder, tokens_per_byte: float = TOKENS_PER_BYTE, published: bool = True, name: str = "seed"):
    """Two seeds' logs whose val_bpb counts the split's bytes with `tokens_per_byte`; of OTHER_SPLIT, with the
    trainer's warning, unless `published`."""
    def text(seed: int, loss: float) -> str:
        log = render_log(seed, loss, val_bpb=round(loss / math.log(2) * tokens_per_byte, 8), run_id=f"{name}{seed}",
                         **({} if published else {"val_split": OTHER_SPLIT}))
        return log if published else log.replace("model_params:", f"{UNPUBLISHED}\nmodel_params:")
    return write_logs(folder, text(1, 2.06), text(2, 2.07))


def record_of(tmp_path, logs) -> str:
    """A record folder made by make_submission from `logs` on the non-record track (it names its split)."""
    assert submit(tmp_path / "record_home", logs, track="non_record_16mb") == 0
    return str(folder_of(tmp_path / "record_home", "non_record_16mb"))


def test_compare_to_a_record_of_the_same_split_counting_other_bytes_is_refused(tmp_path, capsys):
    # the same tokens, another byte count for them: another tokenizer byte table, so another val_bpb scale
    record = record_of(tmp_path, logs_of_split(tmp_path / "record_logs", 0.41, name="r"))
    logs = logs_of_split(tmp_path / "logs", 0.40)
    assert submit(tmp_path, logs, "--compare-to", record) == 2
    err = capsys.readouterr().err
    record_bytes = 62_021_632 / 0.41  # val_bytes = tokens / tokens per byte
    assert err.startswith(f"error: --compare-to {record}: the runs' scores count {62_021_632 / 0.40:,.0f} bytes of "
                          f"validation text (62,021,632 tokens), the record's {record_bytes:,.0f}")
    assert len(err.strip().splitlines()) == 1 and not (folder_of(tmp_path)).exists()


def test_compare_to_refuses_runs_of_an_unpublished_split_against_a_record_of_another(tmp_path, capsys):
    logs = logs_of_split(tmp_path / "logs", published=False)
    for record in ("1.2244", record_of(tmp_path, logs_of_split(tmp_path / "record_logs", name="r"))):
        assert submit(tmp_path, logs, "--compare-to", record, track="non_record_16mb") == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --compare-to {record}: {logs[0]} scored a validation split that is not the "
                              "published one") and len(err.strip().splitlines()) == 1


def test_compare_to_a_record_of_the_same_unpublished_split_is_accepted(tmp_path):
    # two submissions of runs on one non-published text: like for like
    record = record_of(tmp_path, logs_of_split(tmp_path / "record_logs", published=False, name="r"))
    logs = write_logs(tmp_path / "logs", *(render_log(s, x, val_split=OTHER_SPLIT)
                                           .replace("model_params:", UNPUBLISHED + "\nmodel_params:")
                                           for s, x in ((1, 2.00), (2, 2.01))))
    assert submit(tmp_path, logs, "--compare-to", record, track="non_record_16mb") == 0
    assert json.loads((folder_of(tmp_path, "non_record_16mb") / "submission.json").read_text())["val_split"] == {
        "tokens": 1_000_448, "sha256": "aaaaaaaaaaaaaaaa", "published": False}


# ----------------------------------------------------------------------------------------------
# compare_runs.py --plot: two groups' training curves.


def test_compare_runs_plots_both_groups_training_curves(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.10), render_log(2, 2.11))
    b = write_logs(tmp_path / "b", render_log(1, 2.08, run_id="b1"), render_log(2, 2.09, run_id="b2"))
    plot = tmp_path / "a_vs_b.png"
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"into {plot}" in capsys.readouterr().out
    figure = training_figure({"A": [read_run_log(p) for p in a], "B": [read_run_log(p) for p in b]})
    train_ax, val_ax = figure.axes
    assert [line.get_color() for line in train_ax.lines] == ["C0", "C0", "C1", "C1"]  # one colour per group
    assert [t.get_text() for t in train_ax.get_legend().get_texts()] == ["A", "B"]
    assert [list(line.get_ydata()) for line in train_ax.lines[::2]] == [[6.9358], [6.9358]]  # step 1's train_loss
    assert list(val_ax.lines[0].get_ydata()) == [4.1077, 1.3, round(bpb_of(2.10) - 0.0072, 4)]
