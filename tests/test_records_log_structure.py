"""records/: a kit log is read by its structure (header, embedded source, the run's lines), lines that a value wrote
into it are refused, a path that is no log is one error line, and run_log.py lists a folder of logs, naming the
broken ones, instead of refusing them all.
"""
from __future__ import annotations

import re

import pytest

from test_records import (TOOLS, cut_after, folder_of, refused_by, render_log, submit, with_code_id,
                          write_logs)

import run_log  # noqa: E402  (records/ is on sys.path through test_records)


# ----------------------------------------------------------------------------------------------
# A line of the embedded source is never a line of the run.


def test_a_code_id_line_planted_in_the_source_does_not_make_other_code_the_same(tmp_path, capsys):
    planted = f"Code size: 900 bytes packed:900 code_id:{'ab' * 32}"
    logs = write_logs(tmp_path / "logs", with_code_id(render_log(1, 2.06), "ab" * 32),
                      render_log(2, 2.07, source=f'print("tuned")\n{planted}\n'))  # its own line: no code_id
    refused_by("make_submission", tmp_path, capsys, logs, f"its train_gpt.py differs from the one in {logs[0]}")


def test_a_tokenizer_line_planted_in_the_source_is_not_the_runs_tokenizer(tmp_path):
    real, planted = "custom sha256:" + "1" * 64, "tokenizer: published sp8192"
    source = f'"""A stand-in trainer whose docstring plants a line:\n{planted}\n"""\nprint("train")\n'
    logs = write_logs(tmp_path / "logs", render_log(1, source=source, header_lines=(f"tokenizer: {real}",)))
    assert submit(tmp_path, logs) == 0
    assert f"- tokenizer: {real}\n" in (folder_of(tmp_path) / "README.md").read_text()


@pytest.mark.parametrize("tool", TOOLS)
def test_a_kit_log_whose_header_is_not_its_first_line_is_refused(tmp_path, capsys, tool):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), "a line put first\n" + render_log(2, 2.07))
    refused_by(tool, tmp_path, capsys, logs, "line 2 is a kit log's source header, but not the log's first line")


# ----------------------------------------------------------------------------------------------
# Lines written into the log by a value: a RUN_ID with a line break, in a trainer that allowed one.


def injected_log() -> str:
    """A run that the older trainer logged with RUN_ID='x' + a finished run's last lines, killed at step 1: its run_id
    line wrote those lines into the log, before the real ones."""
    finished = render_log(2, 2.07).splitlines()
    ending = finished[next(i for i, line in enumerate(finished) if line.startswith("step:13780/")):]
    run_id = "x\n" + "\n".join(line for line in ending if not line.startswith("time_ledger")) + "\ny"
    return cut_after(render_log(2, 2.07, run_id=run_id), "step:1/")


@pytest.mark.parametrize("tool", TOOLS)
def test_a_run_id_that_wrote_lines_into_the_log_is_refused(tmp_path, capsys, tool):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), injected_log())
    refused_by(tool, tmp_path, capsys, logs, "its setting RUN_ID='x\\nstep:13780/20000", "holds a line break",
               "(letters, digits, '.', '_', '-')")


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace("end_of_source\n", "end_of_source\nstep:1/20000 train_loss:1.0\n"),
     "is not 'run_id:<RUN_ID> started:<time>' with the RUN_ID of its settings line ('seed2')"),
    (lambda text: text.replace("run_id:seed2 ", "run_id:seed9 "), "'run_id:seed9 started:"),
    (lambda text: re.sub(r"^(settings:.*)$", r"\1\n\1", text, flags=re.MULTILINE), "are each a 'settings:' line"),
])
def test_a_kit_log_whose_run_lines_do_not_begin_as_the_trainer_writes_them_is_refused(tmp_path, edit, message):
    path = write_logs(tmp_path, edit(render_log(2)))[0]
    with pytest.raises(run_log.Refusal, match=re.escape(message)):
        run_log.read_run_log(path)


# ----------------------------------------------------------------------------------------------
# A path that is no log: one error line, no traceback.


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_a_log_path_that_does_not_exist_or_is_a_folder_is_one_error_line(tmp_path, capsys, tool, kind):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06))
    bad = tmp_path / "nowhere.txt" if kind == "missing" else tmp_path / "empty_folder"
    if kind == "folder":
        bad.mkdir()
    err = refused_by(tool, tmp_path, capsys, [*logs, bad])
    assert ("no such file" if kind == "missing" else "a folder, not a log") in err


# ----------------------------------------------------------------------------------------------
# run_log.py lists logs: the broken ones are named with their reason, the others still listed.


def listing(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(2, 2.07) + "error: cannot write\n",
                      render_log(3, 2.08))
    (tmp_path / "logs" / "seed1.lock").write_text("")  # what else a logs/ folder holds
    return logs


@pytest.mark.parametrize("given", ["folder", "files"])
def test_run_log_lists_a_folder_or_many_logs_and_names_each_broken_one(tmp_path, capsys, given):
    logs = listing(tmp_path)
    assert run_log.main([str(tmp_path / "logs")] if given == "folder" else list(map(str, logs))) == 2
    out, err = capsys.readouterr()
    assert f"{logs[0]} (kit layout)" in out and f"{logs[2]} (kit layout)" in out and str(logs[1]) not in out
    assert err.startswith(f"error: {logs[1]}: line ") and "the run ended in an error" in err
    assert len(err.strip().splitlines()) == 1


def test_run_log_names_a_copy_of_a_listed_run(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(2, 2.07))
    copy = tmp_path / "logs" / "seed1_copy.txt"
    copy.write_bytes(logs[0].read_bytes())
    assert run_log.main([str(logs[0]), str(logs[1]), str(copy)]) == 2
    out, err = capsys.readouterr()
    assert out.count("(kit layout)") == 2
    assert err.strip() == (f"error: {copy}: the same run as {logs[0]} (the same RUN_ID seed1 and start time "
                           "2026-05-01T10:00:00+00:00); a run counts once: remove the copy")


def test_the_tools_read_the_run_id_start_time_tokenizer_and_training_data(tmp_path):
    lines = ("tokenizer: published sp8192 sha256:" + "4e" * 32, "train_shards:80 pattern:/data/fineweb_train_*.bin "
             "data_id:0123456789abcdef loader_streams:4 (one per shard, fewer than LOADER_STREAMS)")
    run = run_log.read_run_log(write_logs(tmp_path, render_log(5, header_lines=lines))[0])
    assert (run.run_id, run.started) == ("seed5", "2026-05-01T10:00:00+00:00")
    assert (run.tokenizer, run.tokenizer_sha256) == ("published sp8192", "4e" * 32)
    assert (run.train_shards, run.data_id) == (80, "0123456789abcdef")
    assert "DATA_PATH" not in run.configuration  # the data are known by their data_id
    older = ("tokenizer: custom (sha256 " + "12" * 32 + ")", "train_shards:2 pattern:./data/fineweb_train_*.bin")
    run = run_log.read_run_log(write_logs(tmp_path / "older", render_log(5, header_lines=older))[0])
    assert (run.tokenizer, run.tokenizer_sha256, run.train_shards, run.data_id) == ("custom", "12" * 32, 2, None)
    assert run.configuration["DATA_PATH"] == "./data/datasets/fineweb10B_sp1024"  # no data_id: the path it is
