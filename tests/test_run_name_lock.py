"""Two runs never share a RUN_ID at once: the run holding a name keeps an flock on
logs/<RUN_ID>.lock until its process ends, however it ends; a second run on that name, OVERWRITE=1 or not,
stops at once with one `error:` line and touches nothing. A killed run's lock goes with its process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import train_gpt
from conftest import REPO, read_log, run_trainer, trainer_env

HOLD_THE_NAME = """
import sys, time
sys.path.insert(0, {repo!r})
import train_gpt
log = train_gpt.RunLog("shared", is_master=True)
log("a line of the first run", console=False)
print("holding", flush=True)
if sys.argv[1] == "killed":
    time.sleep(600)
if sys.argv[1] == "exception":
    raise RuntimeError("the run failed")
"""


def files_in(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_run_id_held_by_a_live_run_is_refused_even_with_overwrite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train_gpt.RunLog("shared", is_master=True)
    first("the first run's line")
    before = files_in(tmp_path / "logs")
    with pytest.raises(train_gpt.RunError, match=r"^RUN_ID=shared is in use by a live run \(logs/shared.lock\): "
                                                 r"wait or choose another RUN_ID"):
        train_gpt.RunLog("shared", is_master=True, overwrite=True)
    assert files_in(tmp_path / "logs") == before  # nothing renamed aside, nothing created
    first("a later line")
    assert read_log(tmp_path, "shared") == "the first run's line\na later line\n"


def test_other_run_ids_are_not_held(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_gpt.RunLog("one", is_master=True)
    train_gpt.RunLog("two", is_master=True)("runs beside one")
    assert read_log(tmp_path, "two") == "runs beside one\n"


@pytest.mark.parametrize("ending", ["normal", "exception", "killed"])
def test_the_name_is_free_again_however_the_run_ended(tmp_path, monkeypatch, ending):
    monkeypatch.chdir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_NAME.format(repo=str(REPO)), ending],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert holder.stdout.readline() == "holding\n"
    if ending == "killed":
        with pytest.raises(train_gpt.RunError, match="in use by a live run"):
            train_gpt.RunLog("shared", is_master=True, overwrite=True)
        os.kill(holder.pid, signal.SIGKILL)  # its lock file stays behind, its flock does not
    holder.wait(timeout=60)
    train_gpt.RunLog("shared", is_master=True, overwrite=True)("the second run")
    assert read_log(tmp_path, "shared") == "the second run\n"
    (moved,) = (tmp_path / "logs").glob("shared.txt.replaced-*")
    assert moved.read_text() == "a line of the first run\n"


def test_under_torchrun_the_second_run_stops_at_once_with_an_error(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.chdir(tmp_path)
    first = train_gpt.RunLog("shared", is_master=True)  # the live run, as rank 0 of another launch holds it
    first("the first run")
    env = trainer_env(tiny_dataset, RUN_ID="shared", OVERWRITE=1, ITERATIONS=2, WARMUP_STEPS=0, VAL_LOSS_EVERY=0)
    result = run_trainer(env, tmp_path, nproc=2, timeout=120)
    assert result.returncode != 0
    assert "error: RUN_ID=shared is in use by a live run (logs/shared.lock)" in result.stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["shared.lock", "shared.txt"]
    assert read_log(tmp_path, "shared") == "the first run\n"


# Names that extend each other (y and y.int6) own separate files: each file belongs to exactly one RUN_ID.

def live_run_named_y_int6(tmp_path) -> train_gpt.RunLog:
    live = train_gpt.RunLog("y.int6", is_master=True)
    live("the live run's line")
    (tmp_path / "logs" / "y.int6.int6.ptz.unscored").write_bytes(b"the live run's model, being scored")
    return live


def test_a_run_id_is_not_refused_for_the_files_of_a_longer_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    live_run_named_y_int6(tmp_path)
    before = files_in(tmp_path / "logs")
    train_gpt.RunLog("y", is_master=True)("the run y")
    assert read_log(tmp_path, "y") == "the run y\n"
    assert {k: v for k, v in files_in(tmp_path / "logs").items() if k in before} == before


def test_overwrite_moves_only_the_files_of_its_own_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    live = live_run_named_y_int6(tmp_path)
    (tmp_path / "logs" / "y.txt").write_text("y's earlier log\n")
    (tmp_path / "logs" / "y.int6.ptz").write_bytes(b"y's earlier model")
    train_gpt.RunLog("y", is_master=True, overwrite=True)("the run y again")
    names = sorted(files_in(tmp_path / "logs"))
    assert [n.split(".replaced-")[0] for n in names if ".replaced-" in n] == ["y.int6.ptz", "y.txt"]
    assert (tmp_path / "logs" / "y.int6.int6.ptz.unscored").read_bytes() == b"the live run's model, being scored"
    live("the live run goes on")
    assert read_log(tmp_path, "y.int6") == "the live run's line\nthe live run goes on\n"
