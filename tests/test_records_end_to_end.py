"""records/make_submission.py on logs of real tiny CPU runs of train_gpt.py (three seeds).

The expected values are read from the logs here with the SPEC's line formats, not with records/.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, run_trainer, trainer_env

sys.path.insert(0, str(REPO / "records"))

import make_submission  # noqa: E402

SEEDS = (1, 2, 3)
DATE = "2026-05-01"


def line_value(log: str, pattern: str) -> tuple[str, ...]:
    """The groups of the last line matching `pattern`."""
    return re.findall(pattern, log, flags=re.MULTILINE)[-1]


@pytest.fixture(scope="module")
def real_logs(tiny_dataset, tmp_path_factory) -> dict:
    """Three seeds (the last one run from the packed file, as shipped), and one run scored on a prefix of the
    validation split, two at a time."""
    cwd = tmp_path_factory.mktemp("real_runs")
    envs = {f"seed{s}": trainer_env(tiny_dataset, SEED=s, RUN_ID=f"seed{s}") for s in SEEDS}
    envs["prefix"] = trainer_env(tiny_dataset, SEED=4, RUN_ID="prefix", MAX_VAL_TOKENS=4096)
    source = (REPO / "train_gpt.py").read_bytes()
    (cwd / "packed").mkdir()
    (cwd / "packed" / "train_gpt.py").write_bytes(make_submission.train_gpt.pack_code(source)[1])
    scripts = {run_id: cwd / "packed" / "train_gpt.py" if run_id == f"seed{SEEDS[-1]}" else REPO / "train_gpt.py"
               for run_id in envs}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(envs, pool.map(lambda run_id: run_trainer(envs[run_id], cwd, script=scripts[run_id]), envs)))
    for run_id, result in results.items():
        assert result.returncode == 0, f"{run_id}: {result.stderr[-3000:]}"
    return {"cwd": cwd, "source": source, "paths": [cwd / "logs" / f"seed{s}.txt" for s in SEEDS],
            "prefix": cwd / "logs" / "prefix.txt"}


@pytest.fixture(scope="module")
def submission(real_logs, tmp_path_factory) -> Path:
    records = tmp_path_factory.mktemp("records")
    # the non-record track: the tiny split is not the published one, which the 10-minute track refuses; no
    # --pack-code: the folder ships the form of the code the runs counted (packed, EXPORT_PACKED_CODE=1)
    code = make_submission.main(["--track", "non_record_16mb", "--name", "Tiny CPU", "--author", "Ada",
                                 "--github-id", "ada", "--date", DATE, "--records-dir", str(records),
                                 *map(str, real_logs["paths"])])
    assert code == 0
    return records / "track_non_record_16mb" / f"{DATE}_Tiny_CPU"


def test_folder_holds_the_real_logs_and_their_source(real_logs, submission):
    for path in real_logs["paths"]:
        assert (submission / path.name).read_bytes() == path.read_bytes()
    shipped = (submission / "train_gpt.py").read_bytes()  # packed: the runs counted the packed file
    assert shipped == (real_logs["cwd"] / "packed" / "train_gpt.py").read_bytes()
    for path in real_logs["paths"]:  # the plain runs and the packed run count as the same code
        packed, code_id = line_value(path.read_text(), r"^Code size: \d+ bytes packed:(\d+) code_id:(\w+)$")
        assert (int(packed), code_id) == (len(shipped), hashlib.sha256(shipped).hexdigest())


def test_summary_values_are_the_logs_values(real_logs, submission):
    summary = json.loads((submission / "submission.json").read_text())
    logs = [path.read_text() for path in real_logs["paths"]]
    exact = [line_value(log, r"^final_int8_zlib_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$") for log in logs]
    totals = [int(line_value(log, r"^Total submission size int8\+zlib: (\d+) bytes$")) for log in logs]
    last_steps = [line_value(log, r"^step:(\d+)/\d+ .*train_time:(\d+)ms step_avg:(\S+)ms$") for log in logs]
    assert summary["val_loss"] == pytest.approx(sum(float(e[0]) for e in exact) / 3, abs=1e-8)
    assert summary["val_bpb"] == pytest.approx(sum(float(e[1]) for e in exact) / 3, abs=1e-8)
    assert summary["bytes_total"] == max(totals)  # the logs' own total: the folder ships the code form they counted
    assert summary["bytes_code"] == len((submission / "train_gpt.py").read_bytes())
    for seed_summary, seed, (loss, bpb), total, (steps, train_ms, _) in zip(
            summary["seeds"], SEEDS, exact, totals, last_steps):
        assert (seed_summary["seed"], seed_summary["val_loss"], seed_summary["val_bpb"]) == (seed, float(loss), float(bpb))
        assert (seed_summary["bytes_total"], seed_summary["steps"], seed_summary["train_time_ms"]) == \
            (total, int(steps), int(train_ms))


def test_readme_has_a_row_per_real_seed(real_logs, submission):
    readme = (submission / "README.md").read_text()
    for seed, path in zip(SEEDS, real_logs["paths"]):
        log = path.read_text()
        steps, step_avg = line_value(log, r"^step:(\d+)/\d+ .*step_avg:(\S+)ms$")
        bpb = line_value(log, r"^final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)$")
        assert f"| {seed} | {steps} | {step_avg} |" in readme and f"| {bpb} |" in readme


def test_plot_is_a_valid_png(submission):
    import matplotlib.image
    image = matplotlib.image.imread(submission / "training_curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_plot_draws_every_training_loss_and_validation_point_of_each_seed(real_logs):
    from run_log import read_run_log
    from training_curves import training_figure
    runs = [read_run_log(path) for path in real_logs["paths"]]
    figure = training_figure(make_submission.seed_curves(runs))
    train_ax, val_ax = figure.axes
    for index, (run, path) in enumerate(zip(runs, real_logs["paths"])):
        log = path.read_text()
        train = re.findall(r"^step:\d+/\d+ train_loss:(\S+) train_time:(\d+)ms", log, flags=re.MULTILINE)
        val = re.findall(r"^step:\d+/\d+ val_loss:\S+ val_bpb:(\S+) train_time:(\d+)ms", log, flags=re.MULTILINE)
        assert len(train) == 20 and len(val) == 3  # TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=10 of 20 steps
        train_line, (val_line, score_mark) = train_ax.lines[index], val_ax.lines[2 * index:2 * index + 2]
        assert list(train_line.get_xdata()) == [int(ms) / 1000 for _, ms in train]
        assert list(train_line.get_ydata()) == [float(loss) for loss, _ in train]
        assert list(val_line.get_xdata()) == [int(ms) / 1000 for _, ms in val]
        assert list(val_line.get_ydata()) == [float(bpb) for bpb, _ in val]
        exact = float(line_value(log, r"^final_int8_zlib_roundtrip_exact val_loss:\S+ val_bpb:(\S+)$"))
        assert list(score_mark.get_ydata()) == [exact]
        assert val_line.get_label() == f"seed {run.seed} (round-trip {exact:.4f})"
    import matplotlib.pyplot as plt
    plt.close(figure)


def test_compare_to_refuses_runs_on_a_split_that_is_not_the_published_one(real_logs, tmp_path, capsys):
    code = make_submission.main(["--track", "non_record_16mb", "--name", "Tiny", "--author", "Ada", "--github-id", "ada",
                                 "--records-dir", str(tmp_path), "--compare-to", "1.2244", *map(str, real_logs["paths"])])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --compare-to 1.2244: {real_logs['paths'][0]} scored a validation split that is not "
                          "the published one") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_non_record_folder_of_runs_on_another_split_says_so_at_the_top(submission):
    title, blank, note = (submission / "README.md").read_text().splitlines()[:3]
    assert (title, blank) == ("# Tiny CPU", "")
    assert note.startswith("**Not comparable with the records: scored on a validation split that is not the "
                           "published FineWeb split**")
    assert json.loads((submission / "submission.json").read_text())["val_split"]["published"] is False


def test_a_real_prefix_scored_log_is_refused(real_logs, tmp_path, capsys):
    code = make_submission.main(["--track", "non_record_16mb", "--name", "Prefix", "--author", "Ada",
                                 "--github-id", "ada", "--records-dir", str(tmp_path), str(real_logs["prefix"])])
    assert code == 2
    assert f"error: {real_logs['prefix']}: scored only a prefix of the validation split" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_real_logs_of_an_unpublished_split_are_refused_on_the_10_minute_track(real_logs, tmp_path, capsys):
    code = make_submission.main(["--track", "10min_16mb", "--name", "Tiny", "--author", "Ada", "--github-id", "ada",
                                 "--records-dir", str(tmp_path), *map(str, real_logs["paths"])])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {real_logs['paths'][0]}: the trainer warned that its validation split")
    assert "not the published split's count" in err and not any(tmp_path.iterdir())
