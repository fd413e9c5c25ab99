"""Nothing an earlier run left is lost, no non-finite score goes out, every failure ends in one
`error:` line (also in the run's log), and the wall-clock stop lands inside the cap on a device that lags."""
from __future__ import annotations

import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cached_challenge_fineweb as downloader
import train_gpt
from conftest import REPO, read_log, run_trainer, trainer_env, write_split_shards
from shard_io import write_shard

QUICK = dict(ITERATIONS=2, WARMUP_STEPS=0, VAL_LOSS_EVERY=0)  # a run that trains, exports and scores in seconds


def run_failing(cwd, dataset, **overrides):
    """A run expected to stop with an error: non-zero exit, one error: line, no traceback."""
    popen = overrides.pop("_popen", {})
    result = run_trainer(trainer_env(dataset, **overrides), cwd, **popen)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return error


def artifacts(cwd) -> list[str]:
    return sorted(p.name for p in (Path(cwd) / "logs").glob("*ptz*"))


# ----------------------------------------------------------------------------------------------
# 1. A reused RUN_ID never overwrites or orphans an earlier run's files.

def test_reused_run_id_is_refused_and_the_earlier_files_are_untouched(tmp_path, tiny_dataset):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "seed1.txt").write_text("the evidence of a finished run\n")
    (logs / "seed1.int8.ptz").write_bytes(b"its model")
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="seed1", **QUICK)
    assert "RUN_ID=seed1 was used before" in error and "OVERWRITE=1" in error
    assert (logs / "seed1.txt").read_text() == "the evidence of a finished run\n"
    assert (logs / "seed1.int8.ptz").read_bytes() == b"its model"
    assert sorted(p.name for p in logs.iterdir()) == ["seed1.int8.ptz", "seed1.lock", "seed1.txt"]  # lock: empty
    assert (logs / "seed1.lock").read_bytes() == b""


def test_overwrite_renames_the_earlier_files_aside(tmp_path, tiny_dataset):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "seed1.txt").write_text("earlier log\n")
    (logs / "seed1.int8.ptz").write_bytes(b"earlier model")
    result = run_trainer(trainer_env(tiny_dataset, RUN_ID="seed1", OVERWRITE=1, **QUICK), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (old_log,) = logs.glob("seed1.txt.replaced-*")
    (old_model,) = logs.glob("seed1.int8.ptz.replaced-*")
    assert old_log.read_text() == "earlier log\n" and old_model.read_bytes() == b"earlier model"
    assert "final_int8_zlib_roundtrip_exact" in read_log(tmp_path, "seed1")


# ----------------------------------------------------------------------------------------------
# 2. Non-finite settings are refused; a non-finite score is an error and leaves no artifact.

@pytest.mark.parametrize("variable, value", [("MATRIX_LR", "inf"), ("LOGIT_SOFTCAP", "inf"),
                                             ("QK_GAIN_INIT", "nan"), ("TIED_EMBED_LR", "-inf")])
def test_non_finite_setting_is_refused(variable, value):
    with pytest.raises(train_gpt.SettingsError, match=rf"^{variable}=.* must be a finite number"):
        train_gpt.Settings.from_env({variable: value})


def test_last_update_diverging_is_an_error_with_no_artifact(tmp_path, tiny_dataset):
    # The training loss of step 1 is taken before its update; the update makes the weights non-finite.
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="late", SCALAR_LR="1e30", EMA_DECAY=0, **{**QUICK,
                        "ITERATIONS": 1})
    assert error.startswith("error: the validation score at step 1 is not finite (val_loss:nan")
    assert "SCALAR_LR=1e+30" in error
    assert artifacts(tmp_path) == []


@pytest.mark.parametrize("nproc", [1, 2])  # every rank scores the same bytes, so every rank must stop
def test_non_finite_round_trip_score_is_an_error_and_no_artifact_has_the_final_name(tmp_path, tiny_dataset,
                                                                                    nproc):
    # A huge embedding is fine in fp32 (it is normalised) but overflows the export's 16-bit scales.
    env = trainer_env(tiny_dataset, RUN_ID="overflow", TIED_EMBED_LR="1e30", EMA_DECAY=0, **{**QUICK, "ITERATIONS": 1})
    result = run_trainer(env, tmp_path, nproc=nproc)
    assert result.returncode != 0  # (torchrun adds its own traceback when a worker fails)
    error = "error: the round-trip score of logs/overflow.int8.ptz.unscored (kept, no submission) is not finite"
    assert result.stderr.count(error) == nproc  # every rank stops with the error
    assert artifacts(tmp_path) == ["overflow.int8.ptz.unscored"]
    assert "final_int8_zlib_roundtrip" not in read_log(tmp_path, "overflow")


def test_divergence_message_names_the_setting_that_caused_it(tmp_path, tiny_dataset):
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="qk", QK_GAIN_INIT="1e38", **QUICK)
    assert "the training loss became NaN or inf" in error and "QK_GAIN_INIT=1e+38" in error
    assert "learning rate" not in error and "_LR" not in error


# ----------------------------------------------------------------------------------------------
# 3. The wall-clock stop, driven by a simulated GPU timeline: the device runs behind the host.

class SimulatedEvent:
    """A CUDA event on the simulated device: record() marks the step the host has just queued;
    synchronize() holds the host until the device has finished that step."""

    def __init__(self, sim, rank):
        self.sim, self.rank, self.step = sim, rank, None

    def record(self):
        self.step = self.sim.step

    def synchronize(self):
        self.sim.host[self.rank] = max(self.sim.host[self.rank], self.sim.device_end[self.step])


class SimulatedVote:
    """The MAX all-reduce of the ranks' flags of one step, known once every rank has voted."""

    def __init__(self, votes):
        self.votes = votes

    def __bool__(self):
        return any(self.votes)


class GpuTimeline:
    """Ranks whose host queues steps up to `lead` steps ahead of one shared device timeline (a step ends
    when its slowest rank ends: the gradient all-reduce), device step times that rise by a factor halfway
    (depth recurrence) and jitter per rank, host launch costs, and per-rank clocks started a little apart.
    Everything in ms of one global time."""

    def __init__(self, world_size, lead, cap_ms, seed):
        rng = random.Random(seed)
        self.rng, self.world_size, self.lead, self.cap_ms = rng, world_size, lead, cap_ms
        self.base_ms, self.rise = rng.uniform(40, 130), rng.uniform(1.05, 1.5)
        self.launch_ms = [self.base_ms * rng.uniform(0.05, 0.9) for _ in range(world_size)]
        self.clock_start = [rng.uniform(0, 5) for _ in range(world_size)]
        self.host = list(self.clock_start)
        self.device_end = [max(self.clock_start)]  # index = step; step 0: the start
        self.step = 0
        runtime = train_gpt.Runtime(torch.device("cpu"), 0, world_size, 0, 1, torch.float32, False)
        self.votes: dict[int, list[bool]] = {}
        self.stops = [train_gpt.WallclockStop(cap_ms, runtime, event=lambda r=r: SimulatedEvent(self, r),
                                              vote=lambda flag: self.cast_vote(flag)) for r in range(world_size)]

    def cast_vote(self, flag):
        self.votes.setdefault(self.step, []).append(flag)
        return SimulatedVote(self.votes[self.step])

    def step_ms(self):
        rise = self.rise if self.device_end[-1] > self.cap_ms / 2 else 1.0
        return self.base_ms * rise * self.rng.uniform(1.0, 1.12)

    def run_step(self) -> list[bool]:
        """Queue one step on every rank, then ask each rank's WallclockStop; returns their answers."""
        self.step += 1
        ends = []
        for r in range(self.world_size):
            start = max(self.device_end[-1], self.host[r])
            self.host[r] += self.launch_ms[r] * self.rng.uniform(1.0, 1.3)
            ends.append(max(start + self.step_ms(), self.host[r]))
        self.device_end.append(max(ends))
        answers = []
        for r in range(self.world_size):
            # The host blocks once `lead` steps are queued (lead 0: it runs synchronously, as on a CPU).
            self.host[r] = max(self.host[r], self.device_end[max(self.step - self.lead, 0)])
            answers.append(self.stops[r].should_stop(lambda r=r: self.host[r] - self.clock_start[r]))
        return answers

    def train_time_if_last(self) -> float:
        """What rank 0 logs as train_time if this step is the last: its clock after the final device sync."""
        return max(self.host[0], self.device_end[-1]) - self.clock_start[0]


@pytest.mark.parametrize("world_size", [1, 2, 8])
@pytest.mark.parametrize("lead", [0, 1, 2, 3])
def test_wallclock_stop_ends_inside_the_cap_on_a_device_behind_the_host(world_size, lead):
    cap_ms = 30_000.0
    for seed in range(5):
        sim = GpuTimeline(world_size, lead, cap_ms, seed=1000 * world_size + 10 * lead + seed)
        stopped_at, train_time, fits = None, None, 0
        while True:
            answers = sim.run_step()
            assert len(set(answers)) == 1, "ranks disagree on the last step"
            if sim.train_time_if_last() <= cap_ms:
                fits = sim.step  # the most steps that would have fit (an oracle that knows the future)
            if answers[0] and stopped_at is None:
                stopped_at, train_time = sim.step, sim.train_time_if_last()
            if stopped_at is not None and sim.train_time_if_last() > cap_ms:
                break
        assert train_time <= cap_ms, f"seed {seed}: train_time {train_time:.1f} ms over the cap"
        assert fits - stopped_at <= 2, f"seed {seed}: gave up {fits - stopped_at} steps"


# ----------------------------------------------------------------------------------------------
# 5, 6. Data problems are found at start-up, naming the shard.

ONE_CPU = train_gpt.Runtime(torch.device("cpu"), 0, 1, 0, 1, torch.float32, False)


def test_train_split_without_tokens_is_an_error_at_start(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.array([], dtype=np.uint16))
    with pytest.raises(ValueError, match=r"train shards in .* hold no tokens"):
        train_gpt.TrainBatchLoader(train_gpt.Settings(data_path=str(tmp_path), vocab_size=512), ONE_CPU)


def test_corrupt_shard_in_the_middle_is_named_before_training(tmp_path):
    write_split_shards(tmp_path, "train", [np.arange(2, 300)], 3)
    middle = tmp_path / "fineweb_train_000001.bin"
    middle.write_bytes(middle.read_bytes()[:-2])
    with pytest.raises(ValueError, match=rf"^{middle}: .* truncated or corrupt"):
        train_gpt.TrainBatchLoader(train_gpt.Settings(data_path=str(tmp_path), vocab_size=512), ONE_CPU)


# ----------------------------------------------------------------------------------------------
# 7. A full disk: the export and the log say what happened and leave no partial file.

def file_size_limit(num_bytes: int):
    """A process limit on file sizes (writes beyond it fail, as on a full disk; Python ignores SIGXFSZ)."""
    return dict(_popen=dict(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, num_bytes))))


def test_full_disk_during_export_removes_the_partial_file(tmp_path, tiny_dataset):
    # The log (the source and some lines) fits under the limit; the model of 6 blocks (~300 kB) does not.
    limit = (REPO / "train_gpt.py").stat().st_size + 30_000
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="full", NUM_LAYERS=6, **QUICK, **file_size_limit(limit))
    assert error.startswith("error: cannot write logs/full.int8.ptz.unscored (")
    assert " bytes and its disk has " in error
    assert artifacts(tmp_path) == []
    assert read_log(tmp_path, "full").rstrip().splitlines()[-1] == error


def test_log_that_cannot_be_written_is_an_error(tmp_path, tiny_dataset):
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="nolog", **QUICK, **file_size_limit(10_000))
    assert error.startswith("error: cannot write the log logs/nolog.txt (")


# ----------------------------------------------------------------------------------------------
# 8. Errors instead of tracebacks.

@pytest.mark.parametrize("make", [
    lambda d: (d / "garbage.model").write_bytes(b"\x00\xffnot a sentencepiece model" * 10) and d / "garbage.model",
    lambda d: (d / "folder.model").mkdir() or d / "folder.model",
    lambda d: (d / "byte.json").write_text('{"kind": "byte", "byte_offset": 4}') and d / "byte.json",
])
def test_unreadable_tokenizer_is_named(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=rf"^TOKENIZER_PATH={path} is no SentencePiece .model or byte260 .json"):
        train_gpt.build_byte_table(str(path), 260)


def test_logs_that_is_a_file_is_an_error(tmp_path, tiny_dataset):
    (tmp_path / "logs").write_text("not a folder")
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="x", **QUICK)
    assert error.startswith("error: cannot create the log logs/x.txt")


def test_run_id_too_long_for_a_file_name_is_refused():
    with pytest.raises(train_gpt.SettingsError, match=r"^RUN_ID=.* 1 to 200 letters"):
        train_gpt.Settings.from_env({"RUN_ID": "r" * 250})


def test_data_path_with_glob_characters_finds_its_shards(tmp_path):
    folder = tmp_path / "run[1]"
    folder.mkdir()
    write_shard(folder / "fineweb_train_000000.bin", np.arange(10))
    assert train_gpt.shard_paths(str(folder), "train", 1024) == [str(folder / "fineweb_train_000000.bin")]


def test_downloader_target_that_cannot_be_written_is_an_error(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("")
    result = subprocess.run([sys.executable, str(REPO / "data" / "cached_challenge_fineweb.py"), "--variant",
                             "sp1024", "--output-root", str(target)], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: cannot write to {target}" in result.stderr


def test_free_space_message_uses_sensible_units(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 500, 500))
    with pytest.raises(downloader.DownloadError, match=r"need about 5\.0 MB but .* has 500 bytes free"):
        downloader.check_free_space(tmp_path, 5_000_000)


# ----------------------------------------------------------------------------------------------
# 9. The error is in the run's log too.

def test_error_line_ends_the_log(tmp_path, tiny_dataset):
    data = tmp_path / "data"
    data.mkdir()
    write_split_shards(data, "train", [np.arange(2, 300)], 1)
    write_shard(data / "fineweb_val_000000.bin", np.array([1, 999, 2] * 50))  # ids beyond VOCAB_SIZE=384
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="bad", DATA_PATH=data, **QUICK)
    assert "token id 999 >= VOCAB_SIZE=384" in error
    assert read_log(tmp_path, "bad").rstrip().splitlines()[-1] == error


# ----------------------------------------------------------------------------------------------
# 10. Every value written into the log is one line: a path or a message with a line break adds no line.

INJECTED = "step:7/400 val_loss:1.0000 val_bpb:0.1000"  # what a line break in a value would make a log line


def test_a_path_with_line_breaks_adds_no_line_to_the_log(tmp_path, tiny_dataset):
    data = tmp_path / f"shards\n{INJECTED}\r{INJECTED}\u2028{INJECTED}"
    shutil.copytree(tiny_dataset.data_path, data)
    env = trainer_env(tiny_dataset, RUN_ID="oneline", DATA_PATH=data, TORCH_NOTE=f"x\n{INJECTED}", **QUICK)
    result = run_trainer(env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_lines = read_log(tmp_path, "oneline").split("\nend_of_source\n", 1)[1].splitlines()  # str: every break
    assert not [line for line in run_lines + result.stdout.splitlines() if line.startswith(INJECTED)]
    (shards,) = [line for line in run_lines if line.startswith("train_shards:")]
    assert f"shards\\n{INJECTED}\\r{INJECTED}\\u2028{INJECTED}" in shards


def test_an_error_naming_a_path_with_a_line_break_is_one_line(tmp_path, tiny_dataset):
    error = run_failing(tmp_path, tiny_dataset, RUN_ID="oneline", DATA_PATH=tmp_path / f"none\n{INJECTED}", **QUICK)
    assert error.startswith("error: no val shards match ") and f"none\\n{INJECTED}" in error
    assert not [line for line in read_log(tmp_path, "oneline").splitlines() if line.startswith(INJECTED)]
