"""The settings that records/ lets the seeds of one result differ in (run_log.SETTINGS_WITHOUT_EFFECT) cannot change
the trained model: a tiny run with every one of them changed logs the same losses, scores and model bytes.
"""
from __future__ import annotations

import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

from conftest import REPO, read_log, run_trainer, trainer_env

sys.path.insert(0, str(REPO / "records"))

import run_log  # noqa: E402
import train_gpt  # noqa: E402

LOSS_LINE = re.compile(r"^step:(\d+)/\d+ (train_loss|val_loss):(\S+(?: val_bpb:\S+)?)", re.MULTILINE)
SCORE_LINE = re.compile(r"^(final_\w+ val_loss:\S+ val_bpb:\S+|Serialized model \S+: \d+ bytes)", re.MULTILINE)


def changed_values(tiny_dataset, elsewhere) -> dict:
    """Another value than the tiny run's for each setting without effect; the data and tokenizer copied elsewhere."""
    (elsewhere / "data").mkdir()
    for shard in sorted(Path(tiny_dataset.data_path).glob("fineweb_*.bin")):
        shutil.copy(shard, elsewhere / "data" / shard.name)
    tokenizer = shutil.copy(tiny_dataset.tokenizer_path, elsewhere / "tokenizer.model")
    return {"RUN_ID": "changed", "OVERWRITE": 1, "TRAIN_LOG_EVERY": 3, "VAL_LOSS_EVERY": 4,
            "DATA_PATH": elsewhere / "data", "TOKENIZER_PATH": tokenizer}


def test_the_settings_without_effect_are_settings_of_the_trainer():
    names = {f.name.upper() for f in fields(train_gpt.Settings)}
    assert set(run_log.SETTINGS_WITHOUT_EFFECT) <= names


def test_settings_without_effect_leave_every_loss_score_and_model_byte_unchanged(tiny_dataset, tmp_path):
    changed = changed_values(tiny_dataset, tmp_path)
    assert set(changed) == set(run_log.SETTINGS_WITHOUT_EFFECT)  # every one of them is changed here
    cheap = {"MAX_VAL_TOKENS": 8192}  # both runs score the same prefix: seven validations stay cheap
    envs = {"base": trainer_env(tiny_dataset, RUN_ID="base", **cheap),
            "changed": trainer_env(tiny_dataset, **cheap, **changed)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda env: run_trainer(env, tmp_path), envs.values()))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    base, other = (read_log(tmp_path, run_id) for run_id in ("base", "changed"))
    base_losses, other_losses = ({(int(step), kind): values for step, kind, values in LOSS_LINE.findall(log)}
                                 for log in (base, other))
    common = base_losses.keys() & other_losses.keys()
    # training losses at steps 1-10, 12, 15, 18 (TRAIN_LOG_EVERY 1 and 3); validation at steps 0 and 20 (10 and 4)
    assert {step for step, kind in common if kind == "train_loss"} == {*range(1, 11), 12, 15, 18}
    assert {step for step, kind in common if kind == "val_loss"} == {0, 20}
    assert all(base_losses[key] == other_losses[key] for key in common)
    assert SCORE_LINE.findall(base) == SCORE_LINE.findall(other) and len(SCORE_LINE.findall(base)) == 3
    runs = [run_log.read_run_log(tmp_path / "logs" / f"{run_id}.txt") for run_id in ("base", "changed")]
    # one configuration: a log with the data's identity (data_id) needs no DATA_PATH; without it, the path is all
    assert run_log.differing_settings(runs) == ([] if runs[0].data_id else ["DATA_PATH"])
