"""records/: the seeds of one result are distinct runs of one configuration: one tokenizer, the same training data,
distinct seeds in the trainer's range, each run counted once; settings that cannot change the model may differ;
seeds whose scores do not vary get no p-value rather than a crash.
"""
from __future__ import annotations

import pytest

from test_records import (TOOLS, folder_of, read_summary, refused_by, render_log, run_tool, submit, write_logs)

import compare_runs  # noqa: E402  (records/ is on sys.path through test_records)

SHA_A, SHA_B = "1" * 64, "2" * 64


def tokenizer_line(text: str) -> tuple[str, ...]:
    return (f"tokenizer: {text}",)


def shards_line(count: int, data_id: str | None = None) -> tuple[str, ...]:
    return (f"train_shards:{count} pattern:./data/datasets/fineweb10B_sp1024/fineweb_train_*.bin"
            + (f" data_id:{data_id}" if data_id else ""),)


# ----------------------------------------------------------------------------------------------
# One tokenizer.


@pytest.mark.parametrize("first, second", [
    (f"custom sha256:{SHA_A}", f"custom sha256:{SHA_B}"),
    (f"published sp8192 sha256:{SHA_A}", f"published sp8192 sha256:{SHA_B}"),
    (f"custom (sha256 {SHA_A})", f"custom (sha256 {SHA_B})"),  # older logs
    ("published sp8192", f"custom (sha256 {SHA_A})"),
])
def test_seeds_with_different_tokenizers_are_refused(tmp_path, capsys, first, second):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06, header_lines=tokenizer_line(first)),
                      render_log(2, 2.07, header_lines=tokenizer_line(second)))
    refused_by("make_submission", tmp_path, capsys, logs, f"ran with another tokenizer than {logs[0]}",
               "run every seed again with one tokenizer file")


def test_a_group_of_ablation_seeds_with_different_tokenizers_is_refused(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.06), render_log(2, 2.07))
    b = write_logs(tmp_path / "b", render_log(1, 2.05, run_id="b1", header_lines=tokenizer_line(f"custom sha256:{SHA_A}")),
                   render_log(2, 2.04, run_id="b2", header_lines=tokenizer_line(f"custom sha256:{SHA_B}")))
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {b[1]}: ran with another tokenizer than {b[0]}")


def test_a_published_tokenizer_named_with_and_without_its_sha256_is_one_tokenizer(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06, header_lines=tokenizer_line("published sp8192")),
                      render_log(2, 2.07, header_lines=tokenizer_line(f"published sp8192 sha256:{SHA_A}")))
    assert submit(tmp_path, logs) == 0


def test_logs_without_a_tokenizer_line_are_compared_by_their_tokenizer_path(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06),
                      render_log(2, 2.07, settings={"TOKENIZER_PATH": "/mnt/other.model"}))
    refused_by("make_submission", tmp_path, capsys, logs, 'TOKENIZER_PATH="/mnt/other.model" (vs unset)')


# ----------------------------------------------------------------------------------------------
# The same training data: a difference is a settings difference.


@pytest.mark.parametrize("first, second, message", [
    (shards_line(80, "0123456789abcdef"), shards_line(80, "fedcba9876543210"),
     'data_id="fedcba9876543210" (vs "0123456789abcdef")'),
    (shards_line(2), shards_line(1), "train_shards=1 (vs 2)"),  # older logs: the count is all they say
])
def test_seeds_trained_on_other_shards_are_refused_like_other_settings(tmp_path, capsys, first, second, message):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06, header_lines=first),
                      render_log(2, 2.07, header_lines=second))
    refused_by("make_submission", tmp_path, capsys, logs, "settings or training data differ", message,
               "--allow-mixed-settings")
    assert submit(tmp_path, logs, "--allow-mixed-settings") == 0


def test_another_data_path_is_the_same_data_when_the_data_id_is(tmp_path):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06, header_lines=shards_line(80, "0123456789abcdef")),
                      render_log(2, 2.07, header_lines=shards_line(80, "0123456789abcdef"),
                                 settings={"DATA_PATH": "/mnt/other_machine/fineweb10B_sp1024"}))
    assert submit(tmp_path, logs) == 0


def test_another_data_path_without_a_data_id_is_refused(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06, header_lines=shards_line(80)),
                      render_log(2, 2.07, header_lines=shards_line(80), settings={"DATA_PATH": "/mnt/other"}))
    refused_by("make_submission", tmp_path, capsys, logs, 'DATA_PATH="/mnt/other"')


# ----------------------------------------------------------------------------------------------
# Settings that cannot change the model (tests/test_settings_without_effect.py shows they do not) are not a mix.


def test_seeds_that_differ_only_in_settings_without_effect_are_one_configuration(tmp_path):
    tokenizer, data = tokenizer_line(f"custom sha256:{SHA_A}"), shards_line(80, "0123456789abcdef")
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06, header_lines=tokenizer + data),
                      render_log(2, 2.07, header_lines=tokenizer + data, settings={
                          "TRAIN_LOG_EVERY": 1, "VAL_LOSS_EVERY": 0, "OVERWRITE": 1, "DATA_PATH": "/mnt/data",
                          "TOKENIZER_PATH": "/mnt/tokenizer.model"}))
    assert submit(tmp_path, logs) == 0
    readme = (folder_of(tmp_path) / "README.md").read_text()
    assert "for SEED in 1 2; do" in readme and "OVERWRITE" not in readme  # one command: not a mix


def test_a_setting_that_changes_the_model_is_still_refused(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(2, 2.07, settings={"VAL_BATCH_SIZE": 8192}))
    refused_by("make_submission", tmp_path, capsys, logs, "VAL_BATCH_SIZE=8192 (vs unset)")


# ----------------------------------------------------------------------------------------------
# Each run counts once.


def copy_under_another_name(text: str, run_id: str) -> str:
    """The same run's log with another RUN_ID written in: its losses are the run's."""
    return text.replace("run_id:seed1 ", f"run_id:{run_id} ").replace('"RUN_ID": "seed1"', f'"RUN_ID": "{run_id}"')


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("copy", ["the same file", "another file name", "another RUN_ID", "another seed's name"])
def test_a_run_given_twice_is_refused_by_every_tool(tmp_path, capsys, tool, copy):
    first = render_log(1, 2.06)
    logs = write_logs(tmp_path / "logs", first, render_log(2, 2.07))
    if copy == "the same file":
        logs.append(logs[0])
        why = "the same file"
    elif copy == "another file name":  # a byte-for-byte copy
        logs.append(write_logs(tmp_path / "copies", first)[0])
        why = "the same RUN_ID seed1 and start time 2026-05-01T10:00:00+00:00"
    elif copy == "another RUN_ID":
        logs.append(write_logs(tmp_path / "copies", copy_under_another_name(first, "renamed"))[0])
        why = "the same settings and identical losses at every logged step and in the score"
    else:  # the same RUN_ID and start: one run, whatever the log says besides
        logs.append(write_logs(tmp_path / "copies", render_log(3, 2.08, run_id="seed1"))[0])
        why = "the same RUN_ID seed1 and start time"
    if tool == "compare_runs":  # a copy in the other group counts the run on both sides
        assert compare_runs.main(["--a", str(logs[0]), str(logs[1]), "--b", str(logs[2])]) == 2
        err = capsys.readouterr().err
    else:
        assert run_tool(tool, tmp_path, logs) == 2
        err = capsys.readouterr().err
        assert not (tmp_path / "records").exists()
    assert err.strip().splitlines()[-1].startswith(f"error: {logs[2]}: the same run as {logs[0]} ({why}")


def test_runs_with_identical_losses_but_other_settings_are_two_runs(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.06), render_log(2, 2.07))
    b = write_logs(tmp_path / "b", *(render_log(s, x, run_id=f"b{s}", settings={"EVAL_SLIDING": 1})
                                     for s, x in ((1, 2.06), (2, 2.07))))  # a change that left these losses alone
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b)]) == 0


# ----------------------------------------------------------------------------------------------
# Distinct seeds, in the trainer's range.


@pytest.mark.parametrize("tool", ["make_submission", "compare_runs"])
def test_seeds_outside_the_trainers_range_are_refused(tmp_path, capsys, tool):
    # torch.manual_seed wraps -1 to 2**64 - 1: the older trainer ran these two as one seed
    logs = write_logs(tmp_path / "logs", render_log(1, 2.06), render_log(2**64 - 1, 2.07), render_log(-1, 2.08))
    if tool == "compare_runs":
        assert compare_runs.main(["--a", str(logs[0]), "--b", str(logs[1]), str(logs[2])]) == 2
        err = capsys.readouterr().err
    else:
        assert submit(tmp_path, logs) == 2
        err = capsys.readouterr().err
    assert err.startswith(f"error: {logs[1]}: SEED=18446744073709551615 is not in 0..4294967295, the range the "
                          "trainer takes")


def test_ablation_seeds_repeated_within_a_group_are_refused(tmp_path, capsys):
    a = write_logs(tmp_path / "a", render_log(1, 2.06), render_log(1, 2.07, run_id="seed1_again"))
    b = write_logs(tmp_path / "b", render_log(1, 2.05, run_id="b1"), render_log(2, 2.04, run_id="b2"))
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {a[1]}: SEED=1 was already run in {a[0]}")


# ----------------------------------------------------------------------------------------------
# Seeds whose scores do not vary: no p-value, not a crash.


def equal_scores(folder, name: str, loss: float) -> list:
    """Two seeds with one score and different training curves."""
    return write_logs(folder, *(render_log(s, loss, run_id=f"{name}{s}") for s in (1, 2)))


def test_compare_runs_with_equal_scores_in_each_group_reports_no_t_test(tmp_path, capsys):
    a, b = equal_scores(tmp_path / "a", "a", 2.10), equal_scores(tmp_path / "b", "b", 2.08)
    assert compare_runs.main(["--a", *map(str, a), "--b", *map(str, b), "--min-delta-nats", "0.005"]) == 0
    out = capsys.readouterr().out
    no_test = "(not significant: the seeds' scores do not vary (all equal), so the t-test is undefined)"
    assert f"nats per token   +0.02000  95% CI n/a  {no_test}" in out
    assert f"one-sided, H0 improvement <= 0.005 nats: n/a {no_test}" in out


def test_make_submission_with_equal_scores_writes_no_p_value_and_no_claim(tmp_path, capsys):
    assert submit(tmp_path, equal_scores(tmp_path / "logs", "seed", 2.06), "--compare-to", "1.2244") == 0
    comparison = read_summary(tmp_path)["comparison"]
    assert (comparison["p_value"], comparison["significant"]) == (None, False)
    assert comparison["verdict"] == "not significant: the seeds' scores do not vary (all equal), so the t-test is undefined"
    assert "NOT A SIGNIFICANT IMPROVEMENT" in capsys.readouterr().out
