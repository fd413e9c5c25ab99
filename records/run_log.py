"""Read run logs and published record folders into the numbers a submission or a comparison needs.

    python3 records/run_log.py LOG_OR_FOLDER... [--score-line NAME] [--seeds SEED...]

prints what was read from each log (a folder: each of its *.txt and *.log files), and an `error:` line
for each log that cannot be used, with the reason. Three log layouts are read (records/README.md, "Logs"):
- the kit's: its first line a `source train_gpt.py bytes:<N> sha256:<hex>` header, the script's
  source (N bytes, never read as the run's lines), `end_of_source`, then one line per event,
  beginning `run_id:<RUN_ID> started:<time>` (settings, the validation split's fingerprint, ...);
- the official script's and the published records': the source, a line of 100 `=`, Python,
  PyTorch and `nvidia-smi` lines, another line of `=`, then the run's lines;
- a plain console log (the run's lines only, torchrun warnings and all).
The score is the last `<name>_exact` line carrying val_bpb (or the last `<NAME>` line given by
--score-line); in another script's log with no `_exact` line, the last line carrying val_bpb that is not a
`diagnostic` one (published scripts print their score there at full precision). Lines this reader does
not know are ignored; what a log does not say stays None and is printed as "unknown", never guessed. A
log with an `error:` line, or one that announces an evaluation pass (`eval_pass:<name>`, or `ttt_eval`)
without its score pair after it, is refused: the run failed or was cut off, and an earlier pass's score
must not stand in for it. So is a kit log whose structure shows lines written into it by a value (a RUN_ID
with a line break, in older trainers).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

TIME_CAP_MS = 600_000  # 10-minute track: training and evaluation, each
SOURCE_HEADER = re.compile(rb"^source \S+ bytes:(\d+) sha256:([0-9a-f]{64})\n", re.MULTILINE)  # a kit log's first line
SOURCE_END = b"end_of_source\n"
OFFICIAL_SEPARATOR = re.compile(rb"^={100}\r?$", re.MULTILINE)
KEY_VALUE = re.compile(r"(\w+):\s*(\S+)")  # newer scripts write `train_time: 599462ms`
STEP_LINE = re.compile(r"^(?:step:\s*)?(\d+)/(\d+)\s+(.*)$")  # newer scripts drop the `step:` prefix
SCORE_LINE = re.compile(r"^(\w+)\s+(.*\bval_bpb:.*)$")
SEED_LINE = re.compile(r"^(?:  )?seed:\s*(\d+)\s*$")  # indented: a published script's Hyperparameters block
SEED_IN_FILE_NAME = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)
DEVICE_LINE = re.compile(r"^device:(\S+) name:(.*?) world_size:(\d+)")
VAL_SPLIT_LINE = re.compile(r"^val_split tokens:(\d+) sha256:([0-9a-f]+) scope:(\w+)")
MODEL_BYTES_LINE = re.compile(r"^Serialized model (\S+): (\d+) bytes")
TOTAL_BYTES_LINE = re.compile(r"^Total submission size (\S+): (\d+) bytes")
CODE_BYTES_LINE = re.compile(r"^Code size: (\d+) bytes(?: packed:(\d+) code_id:([0-9a-f]{64})\b)?")
RUN_LINE = re.compile(r"^run_id:(.*) started:(\S+)(?: log:.*)?$")  # after the source (newer trainers add log:<path>)
# `published sp8192 sha256:<hex>` or `custom sha256:<hex>`; older: `published sp8192`, `custom (sha256 <hex>)`
TOKENIZER_LINE = re.compile(r"^tokenizer: (?:published (\S+)(?: sha256:([0-9a-f]{64}))?|"
                            r"custom (?:sha256:|\(sha256 )([0-9a-f]{64})\)?)$")
TRAIN_SHARDS_LINE = re.compile(r"^train_shards:(\d+) pattern:(?:.* data_id:([0-9a-f]{16})\b)?")  # data_id: newer
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where a reader splits lines (str.splitlines)
ERROR_LINE = re.compile(r"^(?:\[[\w-]+\]:\s*)?error:")  # a failed run's last line (torchrun may prefix [rank0]:)
EVAL_PASS_LINE = re.compile(r"^(?:eval_pass:(\w+)|ttt_eval\b)")  # a final pass begins (`ttt_eval`: older logs)
GPTQ_LINE = re.compile(r"^gptq: (\d+)ms .*\btrain_time\+gptq:(\d+)ms")
GPTQ_OVER_CAP_LINE = re.compile(r"^WARNING: training plus GPTQ took (\d+)ms")
UNPUBLISHED_SPLIT_LINE = re.compile(r"^WARNING: \d+ validation tokens is not the published split's count")
TIME_PREFIX = re.compile(r"^\d{10}\.\d{3} ")  # some published logs start each line with the unix time
PASS_NAMES = {"roundtrip": "round-trip", "sliding": "sliding-window", "ttt": "TTT"}  # the final passes, as told
PER_RUN_SETTINGS = ("SEED", "RUN_ID")  # what each seed's command sets for itself
SEED_RANGE = (0, 2**32 - 1)  # the trainer's SEED: torch and numpy take it as it is, without wrapping
# The settings that cannot change the trained model or its score: the seeds of one configuration may differ in them.
# Every other setting changes training or evaluation. tests/test_settings_without_effect.py runs the tiny trainer
# with all of these changed and finds every loss, score and model byte unchanged.
SETTINGS_WITHOUT_EFFECT = (
    "RUN_ID",  # the run's name
    "OVERWRITE",  # whether a used RUN_ID's files are first renamed aside
    "TRAIN_LOG_EVERY",  # how often the training loss is logged
    "VAL_LOSS_EVERY",  # how often training pauses for a validation score (outside the training clock)
    "DATA_PATH",  # where the shards are: the data are known by the logged data_id (older logs: by this path)
    "TOKENIZER_PATH",  # where the tokenizer is: it is known by its logged sha256 (older logs: by this path)
)


class Refusal(ValueError):
    """Why a log or a record cannot be used; the message names the file and the rule it breaks."""


@dataclass(frozen=True)
class ValPoint:
    step: int
    train_time_ms: int
    val_loss: float
    val_bpb: float


@dataclass(frozen=True)
class ScoredRun:
    """A finished run as its log tells it; None where the log does not say."""
    path: Path
    layout: str                  # "kit", "official" or "plain" (see the module's docstring)
    source: bytes | None         # the kit's trainer code, byte for byte as it ran (kit logs only)
    score_line: str              # the name of the line the score was read from
    val_loss: float | None       # the score, nats per token ...
    val_bpb: float               # ... and bits per byte
    seed: int | None
    seed_from: str               # "settings", "seed line", "file name", "--seeds" or "unknown"
    device: str                  # e.g. "cuda NVIDIA H100 80GB HBM3", or "unknown"
    world_size: int | None
    settings: dict               # env var name -> value (kit logs)
    model_params: int | None
    val_tokens: int | None       # the validation split's fingerprint is (val_tokens, val_sha256)
    val_sha256: str | None
    val_scope: str | None        # "full", or "prefix" when MAX_VAL_TOKENS cut the split short
    val_curve: tuple[ValPoint, ...]
    steps: int | None
    iterations: int | None
    train_time_ms: int | None    # train_time of the last step line that has one
    gptq_time_ms: int | None     # GPTQ's calibration and rounding, which count in the training budget
    train_and_gptq_ms: int | None  # what the log says training plus GPTQ took (None without GPTQ)
    step_avg_ms: float | None
    stopped_by_wallclock_cap: bool
    export_format_id: str | None  # "int8_zlib" for the "int8+zlib" format
    model_bytes: int | None
    artifact_bytes: int | None   # the last "Total submission size": code plus compressed model
    code_bytes: int | None
    eval_time_ms: int | None     # eval_time of the score's rounded line (or of the score line itself)
    unpublished_split: bool      # the trainer warned: the split's token count is not the published one
    eval_passes_ms: tuple        # (pass, eval_time in ms) of every score line with one, in order
    score_pass: str = "unknown"  # the final pass the score came from: "roundtrip", "sliding", "ttt", or its line's name
    train_curve: tuple = ()      # (step, train_time_ms, train_loss) of every training-loss line
    run_id: str | None = None    # the kit's `run_id:<RUN_ID> started:<time>` line
    started: str | None = None
    tokenizer: str | None = None  # "published sp8192" or "custom" (the `tokenizer:` line) ...
    tokenizer_sha256: str | None = None  # ... and its sha256 (older logs name a published tokenizer without it)
    train_shards: int | None = None
    data_id: str | None = None   # the training shards' identity (a digest of their names and sizes; newer logs)
    packed_code_bytes: int | None = None  # the `Code size` line: the packed file's bytes and sha256 (code_id)
    code_id: str | None = None

    @property
    def eval_total_ms(self) -> int | None:
        """All evaluation passes together: what the 10-minute evaluation cap bounds."""
        return sum(ms for _, ms in self.eval_passes_ms) if self.eval_passes_ms else None

    @property
    def pre_export_val_bpb(self) -> float | None:
        return self.val_curve[-1].val_bpb if self.val_curve else None

    @property
    def budget_time_ms(self) -> int | None:
        """The time judged against the 600 s training cap: train_time, plus GPTQ's time when it ran."""
        return max((ms for ms in (self.train_time_ms, self.train_and_gptq_ms) if ms is not None), default=None)

    @property
    def tokens_per_byte(self) -> float | None:
        # val_bpb = val_loss / ln 2 * tokens / bytes
        return None if self.val_loss is None else self.val_bpb * math.log(2) / self.val_loss

    @property
    def val_split(self) -> str:
        if self.val_sha256 is None:
            return "unknown"
        return f"tokens:{self.val_tokens} sha256:{self.val_sha256} scope:{self.val_scope}"

    @property
    def source_sha256(self) -> str:
        return "unknown" if self.source is None else hashlib.sha256(self.source).hexdigest()

    @property
    def code_form_counted(self) -> str | None:
        """"packed" or "plain": the code the log's `Total submission size` counted beside the model."""
        if None in (self.artifact_bytes, self.model_bytes):
            return None
        counted = self.artifact_bytes - self.model_bytes
        return "packed" if counted == self.packed_code_bytes else "plain" if counted == self.code_bytes else None

    @property
    def val_bytes(self) -> float | None:
        """The validation text's UTF-8 bytes that the score counted: tokens x val_loss / (ln 2 x val_bpb)."""
        if None in (self.val_tokens, self.val_loss):
            return None
        return self.val_tokens * self.val_loss / (math.log(2) * self.val_bpb)

    @cached_property
    def losses(self) -> tuple:
        """Every loss the log gives (training, validation, final score): two runs agree in all only if one ran twice."""
        return (tuple((step, loss) for step, _, loss in self.train_curve),
                tuple((p.step, p.val_loss, p.val_bpb) for p in self.val_curve), self.val_loss, self.val_bpb)

    @property
    def configuration(self) -> dict:
        """What seeds of one result must share: the settings that change training or evaluation, the training data's
        identity and, for logs without a tokenizer line, TOKENIZER_PATH (the tokenizer is checked on its own)."""
        ignored = {"SEED", *SETTINGS_WITHOUT_EFFECT}
        ignored -= {"DATA_PATH"} if self.data_id is None else set()  # older logs: the path is the only identity
        ignored -= {"TOKENIZER_PATH"} if self.tokenizer is None else set()
        config = {key: value for key, value in self.settings.items() if key not in ignored}
        data = {"train_shards": self.train_shards, "data_id": self.data_id}
        return {**config, **{key: value for key, value in data.items() if value is not None}}


def format_id(export_format: str) -> str:
    """`int8+zlib` -> `int8_zlib`: how the final score lines spell a format."""
    return re.sub(r"\W", "_", export_format)


def key_values(text: str) -> dict[str, str]:
    return dict(KEY_VALUE.findall(text))


def number(value: str | None) -> float | None:
    """`600038ms` -> 600038.0; None when absent or not a number (a line of an unknown form)."""
    try:
        return float(value.removesuffix("ms"))
    except (AttributeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# A log: its layout, then its lines.


def split_layout(path: Path, raw: bytes) -> tuple[str, bytes | None, bytes]:
    """(layout, the kit's verified source or None, the run's lines)."""
    header = SOURCE_HEADER.match(raw)  # the kit writes it first, then its source: never read as the run's lines
    if header is None:
        separator = OFFICIAL_SEPARATOR.search(raw)
        # the official layout's source precedes its first separator, and may hold any text
        if separator is not None:
            return "official", None, raw[separator.end():]
        if misplaced := SOURCE_HEADER.search(raw):
            line = raw.count(b"\n", 0, misplaced.start()) + 1
            raise Refusal(f"{path}: line {line} is a kit log's source header, but not the log's first line: other "
                          "text was put before it (logs joined or edited); use the log the run wrote")
        return "plain", None, raw
    start, size = header.end(), int(header.group(1))
    source, end = raw[start:start + size], start + size
    if len(source) != size or raw[end:end + len(SOURCE_END)] != SOURCE_END:
        raise Refusal(f"{path}: the embedded source is not {size} bytes followed by 'end_of_source' "
                      "(the log is truncated or was edited)")
    if hashlib.sha256(source).hexdigest() != header.group(2).decode():
        raise Refusal(f"{path}: the embedded source does not match the sha256 of its source header")
    return "kit", source, raw[end + len(SOURCE_END):]


def read_run_log(path: str | Path, score_line: str | None = None, fallback_seed: int | None = None) -> ScoredRun:
    """Parse a finished run's log; raise Refusal naming the log when it has no usable score.

    `score_line` names the score's line (default: the last `*_exact` line carrying val_bpb);
    `fallback_seed` is used when neither the log's lines nor its file name give one."""
    path = Path(path)
    raw = read_log_bytes(path)
    layout, source, rest = split_layout(path, raw)
    found: dict = {"val_curve": [], "train_curve": [], "model_bytes": {}, "scores": [], "passes": [],
                   "settings_lines": []}
    lines_before = raw.count(b"\n", 0, len(raw) - len(rest))  # so that messages give the file's line numbers
    lines = rest.decode("utf-8", errors="replace").splitlines()  # a cut-off run may end mid-character
    if layout != "kit":
        lines = [TIME_PREFIX.sub("", line) for line in lines]
    for number_in_file, line in enumerate(lines, start=lines_before + 1):
        parse_line(line, number_in_file, found)
    settings = found.get("settings", {})
    if layout == "kit":
        check_kit_structure(path, lines, lines_before + 1, found, settings)
    check_finished(path, layout, raw, found, settings)
    if score_line is None and layout != "kit":
        score_line = published_score_line(found["scores"])
    name, score_fields, rounded_fields = chosen_score(path, found["scores"], score_line)
    score_number = next(number_in_file for n, number_in_file, *_ in reversed(found["scores"]) if n == name)
    seed, seed_from = next(((s, where) for s, where in (
        (settings.get("SEED"), "settings"), (found.get("seed"), "seed line"),
        (seed_in_file_name(path), "file name"), (fallback_seed, "--seeds")) if s is not None), (None, "unknown"))
    steps, iterations, train_time_ms, step_avg_ms = found.get("last_step", (None, None, None, None))
    val_tokens, val_sha256, val_scope = found.get("val_split", (None, None, None))
    export_format, artifact_bytes = found.get("artifact_bytes", (None, None))
    device, device_name, world_size = found.get("device", ("unknown", "", None))
    eval_time_ms = number(rounded_fields.get("eval_time"))
    gptq_ms, logged_total_ms = found.get("gptq", (None, None))
    totals = [ms for ms in (logged_total_ms, found.get("gptq_over_cap_ms"),
                            None if None in (gptq_ms, train_time_ms) else gptq_ms + train_time_ms) if ms is not None]
    return ScoredRun(
        path=path, layout=layout, source=source, score_line=name,
        val_loss=score_fields.get("val_loss"), val_bpb=score_fields["val_bpb"], seed=seed, seed_from=seed_from,
        device=f"{device} {device_name}".strip(), world_size=world_size, settings=settings,
        model_params=found.get("model_params"), val_tokens=val_tokens, val_sha256=val_sha256,
        val_scope=val_scope, val_curve=tuple(found["val_curve"]), steps=steps, iterations=iterations,
        train_time_ms=train_time_ms, gptq_time_ms=gptq_ms, train_and_gptq_ms=max(totals, default=None),
        step_avg_ms=step_avg_ms,
        stopped_by_wallclock_cap=found.get("stopped", False),
        export_format_id=None if export_format is None else format_id(export_format),
        model_bytes=found["model_bytes"].get(export_format), artifact_bytes=artifact_bytes,
        code_bytes=found.get("code_bytes"), eval_time_ms=None if eval_time_ms is None else int(eval_time_ms),
        unpublished_split="unpublished_split" in found,
        eval_passes_ms=eval_passes(found["scores"], lines),
        score_pass=pass_of_score(name, score_number, found["passes"]), train_curve=tuple(found["train_curve"]),
        **dict(zip(("run_id", "started"), found.get("run", (None, None)))),
        **dict(zip(("tokenizer", "tokenizer_sha256"), found.get("tokenizer", (None, None)))),
        **dict(zip(("train_shards", "data_id"), found.get("train_data", (None, None)))),
        **dict(zip(("packed_code_bytes", "code_id"), found.get("packed_code", (None, None)))),
    )


def read_log_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Refusal(f"{path}: no such file; give the path of a run's log (logs/<RUN_ID>.txt)") from None
    except IsADirectoryError:
        raise Refusal(f"{path}: a folder, not a log; give its log files (e.g. {path}/*.txt)") from None
    except OSError as e:
        raise Refusal(f"{path}: cannot be read ({e.strerror})") from None


def pass_of_score(name: str, number_in_file: int, passes: list) -> str:
    """The final pass a score line belongs to: the last pass announced before it (the kit names every pass with
    `eval_pass:<name>`), else what its name says (`final_int8_zlib_roundtrip`, `..._sliding_window`, `legal_ttt`)."""
    announced = [pass_name for pass_name, start, _ in passes if start < number_in_file]
    if announced:
        return announced[-1]
    return next((key for key in ("ttt", "sliding", "roundtrip") if key in name), name.removesuffix("_exact"))


def eval_passes(scores: list, lines: list[str]) -> tuple:
    """(name, ms) of each score line that gives its eval_time (official logs write `eval_time:366525ms`), named
    by the kit's `eval_pass:<name>` lines where they announce them all."""
    timed = [(name, int(ms)) for name, _, _, fields in scores
             if not name.endswith("_exact") and (ms := number(fields.get("eval_time"))) is not None]
    announced = [line.split()[0].removeprefix("eval_pass:") for line in lines if line.startswith("eval_pass:")]
    if len(announced) == len(timed):
        timed = [(name, ms) for name, (_, ms) in zip(announced, timed)]
    return tuple(timed)


def parse_line(line: str, number_in_file: int, found: dict) -> None:
    """Note in `found` what one log line says; a later line of a kind replaces an earlier one."""
    if ERROR_LINE.match(line):
        found.setdefault("error", (number_in_file, line))
    elif m := EVAL_PASS_LINE.match(line):
        found["passes"].append((m.group(1) or "ttt", number_in_file, line))
    elif m := STEP_LINE.match(line):
        fields, step, iterations = key_values(m.group(3)), int(m.group(1)), int(m.group(2))
        train_time_ms, step_avg_ms = number(fields.get("train_time")), number(fields.get("step_avg"))
        if train_time_ms is not None:  # `step:1000/10000 loss:3.3 t:91682ms` and the like say no train_time
            found["last_step"] = (step, iterations, int(train_time_ms), step_avg_ms)
            val_loss, val_bpb = number(fields.get("val_loss")), number(fields.get("val_bpb"))
            if val_loss is not None and val_bpb is not None:
                found["val_curve"].append(ValPoint(step, int(train_time_ms), val_loss, val_bpb))
            if (train_loss := number(fields.get("train_loss"))) is not None:
                found["train_curve"].append((step, int(train_time_ms), train_loss))
    elif m := SCORE_LINE.match(line):
        found["scores"].append((m.group(1), number_in_file, line, key_values(m.group(2))))
    elif m := TOTAL_BYTES_LINE.match(line):
        found["artifact_bytes"] = (m.group(1), int(m.group(2)))
    elif m := MODEL_BYTES_LINE.match(line):
        found["model_bytes"][m.group(1)] = int(m.group(2))
    elif m := CODE_BYTES_LINE.match(line):
        found["code_bytes"] = int(m.group(1))
        if m.group(2):
            found["packed_code"] = (int(m.group(2)), m.group(3))
    elif m := RUN_LINE.match(line):
        found.setdefault("run", (m.group(1), m.group(2)))
    elif m := TOKENIZER_LINE.match(line):
        found["tokenizer"] = ("published " + m.group(1), m.group(2)) if m.group(1) else ("custom", m.group(3))
    elif m := TRAIN_SHARDS_LINE.match(line):
        found["train_data"] = (int(m.group(1)), m.group(2))
    elif m := VAL_SPLIT_LINE.match(line):
        found["val_split"] = (int(m.group(1)), m.group(2), m.group(3))
    elif m := DEVICE_LINE.match(line):
        found["device"] = (m.group(1), m.group(2), int(m.group(3)))
    elif m := SEED_LINE.match(line):
        found["seed"] = int(m.group(1))
    elif m := GPTQ_LINE.match(line):
        found["gptq"] = (int(m.group(1)), int(m.group(2)))
    elif m := GPTQ_OVER_CAP_LINE.match(line):
        found["gptq_over_cap_ms"] = int(m.group(1))
    elif UNPUBLISHED_SPLIT_LINE.match(line):
        found["unpublished_split"] = True
    elif line.startswith("settings:"):
        try:
            settings = json.loads(line.removeprefix("settings:"))
        except ValueError:
            return  # another script's `settings:` line, not the kit's json
        if isinstance(settings, dict):
            found["settings"] = settings
            found["settings_lines"].append(number_in_file)
    elif line.startswith("model_params:") and (params := number(line.removeprefix("model_params:"))):
        found["model_params"] = int(params)
    elif line.startswith("stopping_early: wallclock_cap"):
        found["stopped"] = True
        # newer scripts give train_time in minutes on step lines (`train_time: 9.7m`), in ms only on this one
        fields, last = key_values(line), found.get("last_step")
        step, _, iterations = fields.get("step", "").partition("/")
        train_time_ms = number(fields.get("train_time"))
        if train_time_ms is not None and step.isdigit() and (last is None or int(step) > last[0]):
            found["last_step"] = (int(step), int(iterations) if iterations.isdigit() else None, int(train_time_ms),
                                  train_time_ms / max(int(step), 1))  # the official scripts' step_avg


def published_score_line(scores: list) -> str | None:
    """The score of a log that prints no `_exact` line: published scripts print it at full precision, on the last
    line of the final passes (`quantized_ttt val_loss:2.79180191 val_bpb:1.08079352 eval_time:366525ms`); lines
    named `diagnostic` are not scores. None when the log has `_exact` lines (they hold the score) or none of these."""
    if any(name.endswith("_exact") for name, *_ in scores):
        return None
    names = [name for name, *_ in scores if not name.lower().startswith("diagnostic")]
    return names[-1] if names else None


def seed_in_file_name(path: Path) -> int | None:
    m = SEED_IN_FILE_NAME.search(path.name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------
# A kit log's structure: lines that a value wrote into the log (RUN_ID="x\nfinal_..._exact ...") are not the run's.


def check_kit_structure(path: Path, lines: list[str], first_number: int, found: dict, settings: dict) -> None:
    """After its source, the trainer writes `run_id:<RUN_ID> started:<time>`, then one `settings:` line whose json
    holds every value as the run read it; a value with a line break would write lines of its own into the log."""
    for key, value in settings.items():
        if isinstance(value, str) and any(c in value for c in LINE_BREAKS):
            raise Refusal(f"{path}: its setting {key}={value!r} holds a line break, which writes lines of its own "
                          "into the log (a killed run can then look finished), so the log's lines cannot be trusted; "
                          f"run it again with a {key} of one line" + (" (letters, digits, '.', '_', '-')"
                                                                        if key == "RUN_ID" else ""))
    first = lines[0] if lines else ""
    run = RUN_LINE.match(first)
    if run is None or ("RUN_ID" in settings and run.group(1) != str(settings["RUN_ID"])):
        raise Refusal(f"{path}: line {first_number} {first[:80]!r} is not 'run_id:<RUN_ID> started:<time>' with the "
                      f"RUN_ID of its settings line ({settings.get('RUN_ID', 'none')!r}), as the trainer writes it "
                      "after its source: the log was cut off, edited, or a value wrote lines into it")
    if len(found["settings_lines"]) > 1:
        raise Refusal(f"{path}: lines {', '.join(map(str, found['settings_lines']))} are each a 'settings:' line; the "
                      "trainer writes one: the log was edited, or a value wrote lines into it")


# ----------------------------------------------------------------------------------------------
# A finished run: no error, no evaluation pass left without its score.


def check_finished(path: Path, layout: str, raw: bytes, found: dict, settings: dict) -> None:
    """A run that failed, or a log cut off (a kill, a full disk, a copy taken too early), has no score: an earlier
    pass's score must not stand in for the pass that never finished."""
    if "error" in found:
        number_in_file, line = found["error"]
        raise Refusal(f"{path}: line {number_in_file} {line!r}: the run ended in an error, so it has no score; "
                      "fix the cause and run it again")
    if layout == "kit" and not raw.endswith(b"\n"):  # the trainer ends every line it writes
        raise Refusal(f"{path}: the log ends in the middle of a line: it was cut off (the run was killed, its disk "
                      "was full, or the log was copied before the run ended); use the complete log")
    passes, scores = found["passes"], found["scores"]
    for (name, start, line), end in zip(passes, [p[1] for p in passes[1:]] + [math.inf]):
        names = {s[0] for s in scores if start < s[1] < end}
        if not any(n.endswith("_exact") and n.removesuffix("_exact") in names for n in names):
            raise Refusal(f"{path}: line {start} {line[:60]!r} begins the {name!r} evaluation pass, but its score "
                          "pair (the rounded line and its _exact line) never follows: the run was cut off during it "
                          "(killed, a full disk, or the log copied too early), so the log has no final score")
    ttt_epochs = number(str(settings.get("TTT_EPOCHS", 0)))
    if ttt_epochs and ttt_epochs > 0 and not any(name == "ttt" for name, _, _ in passes):
        raise Refusal(f"{path}: its settings say TTT_EPOCHS={settings['TTT_EPOCHS']}, but no test-time-training "
                      "pass was logged (an 'eval_pass:ttt' or 'ttt_eval' line and its score pair): the run was cut "
                      "off before it, so the log has no final score")


# ----------------------------------------------------------------------------------------------
# The score: the chosen line, a finite number, and the rounded line beside it agreeing.


def chosen_score(path: Path, scores: list, score_line: str | None) -> tuple[str, dict, dict]:
    """(line name, its val_loss/val_bpb as floats, the fields of its rounded line (itself if not `_exact`) or {})."""
    if score_line is None:
        chosen = [s for s in scores if s[0].endswith("_exact")]
        if not chosen:
            raise Refusal(f"{path}: no final exact score line ('<name>_exact val_loss:... val_bpb:...', "
                          "e.g. final_int8_zlib_roundtrip_exact); did the run crash or get cut off? (a log of "
                          "another script that names its score line otherwise: pass --score-line NAME)")
    else:
        chosen = [s for s in scores if s[0] == score_line]
        if not chosen:
            raise Refusal(f"{path}: no '{score_line} ... val_bpb:...' line (--score-line {score_line})")
    name, number_in_file, line, fields = chosen[-1]
    values = {key: number(fields.get(key)) for key in ("val_loss", "val_bpb")}
    if values["val_bpb"] is None or any(v is not None and not (math.isfinite(v) and v > 0) for v in values.values()):
        raise Refusal(f"{path}: line {number_in_file} {line!r}: the score is not a positive finite number "
                      "(a diverged run has no score)")
    rounded = [s for s in scores if s[0] == name.removesuffix("_exact") and s[1] < number_in_file]
    if name.endswith("_exact") and rounded:
        check_rounding(path, (number_in_file, line), values, rounded[-1])
        return name, values, rounded[-1][3]
    return name, values, {} if name.endswith("_exact") else fields  # a rounded line chosen: its own eval_time


def check_rounding(path: Path, exact: tuple[int, str], values: dict, rounded: tuple) -> None:
    """The exact score must round to the value printed beside it: an edited score does not."""
    _, rounded_number, rounded_line, rounded_fields = rounded
    for key, exact_value in values.items():
        printed = rounded_fields.get(key)
        if exact_value is None or number(printed) is None:
            continue
        decimals = len(printed.partition(".")[2])
        if not abs(exact_value - number(printed)) <= 0.5 * 10 ** -decimals + 1e-12:  # nan printed: never
            raise Refusal(f"{path}: line {exact[0]} {exact[1]!r} contradicts line {rounded_number} "
                          f"{rounded_line!r}: {key} {exact_value} does not round to {printed} "
                          "(the log was edited)")


# ----------------------------------------------------------------------------------------------
# Checks shared by the tools.


def read_run_logs(paths, score_line: str | None = None, seeds: list[int] | None = None) -> list[ScoredRun]:
    """`seeds`, when given, has one seed per log, used where the log and its file name name none. A run given twice
    is refused (check_distinct_runs)."""
    paths = list(paths)
    if seeds and len(seeds) != len(paths):
        raise Refusal(f"--seeds gives {len(seeds)} seed(s) for {len(paths)} log(s); give one per log, in order")
    runs = [read_run_log(path, score_line, seeds[i] if seeds else None) for i, path in enumerate(paths)]
    check_distinct_runs(runs)
    return runs


def check_same_val_split(runs: list[ScoredRun]) -> None:
    """Seeds are only comparable when they scored the very same tokens (unknown splits cannot be checked)."""
    known = [run for run in runs if run.val_sha256 is not None]
    for run in known[1:]:
        if run.val_split != known[0].val_split:
            raise Refusal(f"{run.path} scored a different validation split than {known[0].path} "
                          f"({run.val_split} vs {known[0].val_split}); all logs must score the same split")


def check_same_settings(runs: list[ScoredRun], allow_mixed: bool = False) -> None:
    """Seeds are samples of one configuration: their settings (the kit's `settings:` line) and training data may
    differ only in SEED and the settings that cannot change the model, unless --allow-mixed-settings says the mix is
    meant."""
    if allow_mixed:
        return
    for run in runs[1:]:
        if differing := differing_settings([runs[0], run]):
            values = ", ".join(f"{key}={setting_text(run, key)} (vs {setting_text(runs[0], key)})" for key in differing)
            raise Refusal(f"{run.path}: its settings or training data differ from those of {runs[0].path}: {values}; "
                          f"seeds may differ only in SEED and in settings that cannot change the model "
                          f"({', '.join(SETTINGS_WITHOUT_EFFECT)}): run them again with the same settings and "
                          "shards, or pass --allow-mixed-settings if the mix is meant")


def differing_settings(runs: list[ScoredRun]) -> list[str]:
    """The settings (and `train_shards`, `data_id`) of `runs`' configurations that differ between them."""
    keys = sorted({key for run in runs for key in run.configuration})
    return [key for key in keys if len({json.dumps(run.configuration.get(key)) for run in runs}) > 1]


def setting_text(run: ScoredRun, key: str) -> str:
    return json.dumps(run.configuration[key]) if key in run.configuration else "unset"


def check_same_tokenizer(runs: list[ScoredRun]) -> None:
    """The tokenizer decides the bytes each token counts: seeds scored under two tokenizers are not one result, even
    when the tokens are the same (a byte table changed in one piece). Logs without a tokenizer line cannot tell (their
    TOKENIZER_PATH is compared as a setting)."""
    for run in runs[1:]:
        first = runs[0]
        both_hashed = run.tokenizer_sha256 and first.tokenizer_sha256
        if None in (run.tokenizer, first.tokenizer):
            continue
        if both_hashed and run.tokenizer_sha256 != first.tokenizer_sha256 or \
                not both_hashed and run.tokenizer != first.tokenizer:
            raise Refusal(f"{run.path}: ran with another tokenizer than {first.path} ({tokenizer_text(run)} vs "
                          f"{tokenizer_text(first)}): the file at TOKENIZER_PATH changed between the runs; run every "
                          "seed again with one tokenizer file")


def tokenizer_text(run: ScoredRun) -> str:
    if run.tokenizer is None:
        return "not logged"
    return run.tokenizer + (f" sha256:{run.tokenizer_sha256}" if run.tokenizer_sha256 else "")


def check_distinct_runs(runs: list[ScoredRun]) -> None:
    """Each run counts once: a log given twice, or copied under another name, is not another seed."""
    for i, run in enumerate(runs):
        check_not_listed(run, runs[:i])


def check_not_listed(run: ScoredRun, earlier_runs: list[ScoredRun]) -> None:
    for earlier in earlier_runs:
        if why := same_run(earlier, run):
            raise Refusal(f"{run.path}: the same run as {earlier.path} ({why}); a run counts once: remove the copy")


def same_run(a: ScoredRun, b: ScoredRun) -> str | None:
    """Why `a` and `b` are one run, or None."""
    try:
        if os.path.samefile(a.path, b.path):
            return "the same file"
    except OSError:
        pass
    if a.run_id is not None and (a.run_id, a.started) == (b.run_id, b.started):
        return f"the same RUN_ID {a.run_id} and start time {a.started}"
    if (a.train_curve or a.val_curve) and a.val_bpb == b.val_bpb and a.losses == b.losses and \
            a.configuration == b.configuration:
        return "the same settings and identical losses at every logged step and in the score"
    return None


def check_seeds(runs: list[ScoredRun]) -> None:
    """The seeds of one result are distinct, and in the range the trainer takes as it is: older trainers passed any
    SEED to torch.manual_seed, which wraps it (SEED=-1 and SEED=2**64-1 are one seed)."""
    seen = {}
    for run in runs:
        if run.seed is None:
            continue
        if not isinstance(run.seed, int) or not SEED_RANGE[0] <= run.seed <= SEED_RANGE[1]:
            raise Refusal(f"{run.path}: SEED={run.seed!r} is not in {SEED_RANGE[0]}..{SEED_RANGE[1]}, the range the "
                          "trainer takes: older trainers passed any SEED to torch.manual_seed, which wraps negative "
                          "seeds (SEED=-1 and SEED=18446744073709551615 are one run); run it again with a SEED in "
                          "that range")
        if run.seed in seen:
            raise Refusal(f"{run.path}: SEED={run.seed} was already run in {seen[run.seed]}; "
                          "the significance test needs distinct seeds")
        seen[run.seed] = run.path


def nats_per_bpb(runs: list[ScoredRun]) -> float | None:
    """ln 2 / (tokens per byte): turns val_bpb into nats per token of these runs' split (None without val_loss)."""
    if any(run.val_loss is None for run in runs):
        return None
    return math.log(2) / (sum(run.tokens_per_byte for run in runs) / len(runs))


def training_time_check(run: ScoredRun) -> tuple[str, str | None]:
    """("within", None), ("overshoot", a warning) or ("over", the rule broken) for the 10-minute track.

    The official script reads its clock after queuing each step, before the GPU has finished it,
    and stops after the first step at which that reading is >= 600 s; the train_time it logs is
    taken after the GPU finished, so it can exceed 600 s by up to two steps. The leaderboard
    accepted such runs (600,034 to 600,137 ms in March 2026). One rule for every log: a run that
    stopped on the wallclock cap may exceed 600,000 ms by at most two of its average steps.
    GPTQ reads training tokens, so its time counts in the budget too: the rule judges training plus GPTQ."""
    ms = run.budget_time_ms
    if ms is None or ms <= TIME_CAP_MS:
        return "within", None
    allowance = 2 * run.step_avg_ms if run.stopped_by_wallclock_cap and run.step_avg_ms else 0.0
    steps = f", here 2 x {run.step_avg_ms} ms" if run.step_avg_ms else ""
    took = (f"training took {ms:,} ms" if run.train_and_gptq_ms is None else f"training plus GPTQ took {ms:,} ms "
            f"(train_time {known_ms(run.train_time_ms)}, GPTQ {known_ms(run.gptq_time_ms)})")
    if ms - TIME_CAP_MS <= allowance:
        return "overshoot", (f"{took}, {ms - TIME_CAP_MS:,} ms over 600 s: accepted as the official stop rule's "
                             f"overshoot (at most two steps after a wallclock stop{steps})")
    return "over", (f"{took}, over the 10-minute track's limit of {TIME_CAP_MS:,} ms "
                    f"(or two steps more after a wallclock stop, the official stop rule's overshoot{steps})")


def known_ms(ms: int | None) -> str:
    return "unknown" if ms is None else f"{ms:,} ms"


def describe_run(run: ScoredRun) -> list[str]:
    """What was read from one log, "unknown" where it does not say."""
    def known(value, spec: str = "") -> str:
        return "unknown" if value is None else format(value, spec)
    status, note = training_time_check(run)
    return [
        f"{run.path} ({run.layout} layout)",
        f"  score line       {run.score_line}: val_loss {known(run.val_loss, '.8f')} val_bpb {run.val_bpb:.8f} "
        f"({PASS_NAMES.get(run.score_pass, run.score_pass)} pass)",
        f"  seed             {known(run.seed)} (from {run.seed_from})",
        f"  hardware         {run.device}, world size {known(run.world_size)}",
        f"  steps            {known(run.steps)} of {known(run.iterations)}"
        + (", stopped on the wallclock cap" if run.stopped_by_wallclock_cap else ""),
        f"  train_time       {known(run.train_time_ms, ',')} ms (step_avg {known(run.step_avg_ms)} ms)",
        f"  eval_time        {known(run.eval_time_ms, ',')} ms",
        *([f"  eval passes      " + ", ".join(f"{name} {ms:,} ms" for name, ms in run.eval_passes_ms)
           + f"; total {run.eval_total_ms:,} ms"] if run.eval_passes_ms else []),
        f"  artifact bytes   {known(run.artifact_bytes, ',')} (code {known(run.code_bytes, ',')}, "
        f"format {known(run.export_format_id)})",
        f"  val split        {run.val_split}",
        f"  tokenizer        {tokenizer_text(run)}",
        "  training data    " + ("unknown" if run.train_shards is None else
                                 f"{run.train_shards} shard(s), data_id {known(run.data_id)}"),
        f"  source sha256    {run.source_sha256}",
        *([f"  gptq             {known(run.gptq_time_ms, ',')} ms, counted in the training budget: "
           f"training plus GPTQ {run.train_and_gptq_ms:,} ms"] if run.train_and_gptq_ms is not None else []),
        *([f"  warning: {note}"] if note else []),
    ]


# ----------------------------------------------------------------------------------------------
# A published record to compare with: a number, or a records folder (ours or the official repository's).


@dataclass(frozen=True)
class Record:
    name: str
    where: str                        # the folder or file it was read from, or "a number"
    val_bpb: float                    # the published mean
    seed_val_bpbs: tuple[float, ...]  # per-seed scores, when the record has them
    seeds_from: str                   # where they were read: "seed_results", "seeds", "logs" or "none"
    val_tokens: int | None = None     # the validation split it scored, where its json says (this kit's `val_split`)
    val_sha256: str | None = None
    val_bytes: float | None = None    # the bytes of that text its scores count (from val_split, val_loss and val_bpb)

    @property
    def baseline(self) -> float | list[float]:
        """Per-seed scores (Welch's two-sample test), or the mean taken as exact (one-sample test)."""
        return list(self.seed_val_bpbs) if len(self.seed_val_bpbs) >= 2 else self.val_bpb

    def describe(self) -> str:
        used = len(self.seed_val_bpbs) if len(self.seed_val_bpbs) >= 2 else 0
        per_seed = (f"{used} per-seed scores used (from {self.seeds_from})" if used
                    else "0 per-seed scores used (the mean alone, taken as exact)")
        return f"{self.name!r} ({self.where}), mean val_bpb {self.val_bpb:.8f}, {per_seed}"


def is_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def read_record(compare_to: str) -> Record:
    """--compare-to: a val_bpb, a record folder, or the submission json of one."""
    try:
        value = float(compare_to)
    except ValueError:
        pass
    else:
        if not is_score(value):
            raise Refusal(f"--compare-to {compare_to}: a val_bpb must be a positive finite number")
        return Record(f"val_bpb {compare_to}", "a number", value, (), "none")
    path = Path(compare_to)
    summary_path = path if path.is_file() else summary_file(path, compare_to)
    folder = summary_path.parent
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Refusal(f"{summary_path}: not readable as json ({e})") from None
    if not isinstance(summary, dict):
        raise Refusal(f"{summary_path}: not a json object with the record's val_bpb")
    mean = summary.get("val_bpb") if is_score(summary.get("val_bpb")) else None
    seed_val_bpbs, seeds_from = json_seed_val_bpbs(summary)
    if not seed_val_bpbs:
        log_val_bpbs = folder_log_val_bpbs(folder)
        # logs that do not average to the published mean are not that result's seeds (other runs)
        if log_val_bpbs and (mean is None or abs(sum(log_val_bpbs) / len(log_val_bpbs) - mean) <= 1e-4):
            seed_val_bpbs, seeds_from = log_val_bpbs, "logs"
    if mean is None and not seed_val_bpbs:
        raise Refusal(f"{summary_path}: no val_bpb, no per-seed val_bpb (seed_results, seeds) and no log in "
                      f"{folder} with a score; pass the record's val_bpb as a number instead")
    mean = sum(seed_val_bpbs) / len(seed_val_bpbs) if mean is None else mean
    name = summary["name"] if isinstance(summary.get("name"), str) else folder.name
    return Record(name, str(folder), mean, tuple(seed_val_bpbs), seeds_from if seed_val_bpbs else "none",
                  *json_val_split(summary))


def json_val_split(summary: dict) -> tuple:
    """(tokens, sha256, bytes) of a submission.json's `val_split` (this kit's), each None when it does not say."""
    split = summary.get("val_split")
    tokens = split.get("tokens") if isinstance(split, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        return None, None, None
    sha256 = split.get("sha256") if isinstance(split.get("sha256"), str) else None
    scores = [summary.get(key) for key in ("val_loss", "val_bpb")]
    return tokens, sha256, tokens * scores[0] / (math.log(2) * scores[1]) if all(map(is_score, scores)) else None


def summary_file(folder: Path, compare_to: str) -> Path:
    candidates = sorted(folder.glob("submission*.json")) if folder.is_dir() else []
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise Refusal(f"--compare-to {compare_to}: neither a val_bpb number nor a record folder with one "
                      f"submission.json or submission_<name>.json (found: {found}); pass the json file itself")
    return candidates[0]


def json_seed_val_bpbs(summary: dict) -> tuple[list[float], str]:
    """Per-seed val_bpb from `seed_results` ({"1337": {...}} or a list) or from a `seeds` list of objects;
    a `seeds` list of plain seed numbers carries no scores."""
    for key in ("seed_results", "seeds"):
        entries = summary.get(key)
        entries = list(entries.values()) if isinstance(entries, dict) else entries
        if isinstance(entries, list):
            val_bpbs = [e["val_bpb"] for e in entries if isinstance(e, dict) and is_score(e.get("val_bpb"))]
            if val_bpbs:
                return val_bpbs, key
    return [], "none"


def folder_log_val_bpbs(folder: Path) -> list[float]:
    """The scores of the folder's logs, one per (seed, score): a copy of a log is not another seed."""
    scores = {}
    for path in sorted([*folder.glob("*.log"), *folder.glob("*.txt")]):
        try:
            run = read_run_log(path)
        except Refusal:
            continue  # requirements.txt and the like
        scores[(run.seed, run.val_bpb)] = run.val_bpb
    return list(scores.values())


def listed_logs(paths: list[Path]) -> list[Path]:
    """The logs named, a folder standing for its *.txt and *.log files (a folder without any stays, to be refused)."""
    return [log for path in paths for log in
            (sorted([*path.glob("*.txt"), *path.glob("*.log")]) or [path] if path.is_dir() else [path])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path, help="logs, or folders of logs (their *.txt and *.log files)")
    parser.add_argument("--score-line", help="the name of the score's line (default: the last *_exact line)")
    parser.add_argument("--seeds", nargs="+", type=int, help="one per log, for logs that name no seed")
    args = parser.parse_args(argv)
    paths = listed_logs(args.logs)
    if args.seeds and len(args.seeds) != len(paths):
        print(f"error: --seeds gives {len(args.seeds)} seed(s) for {len(paths)} log(s); give one per log, in order",
              file=sys.stderr)
        return 2
    runs, broken = [], 0
    for i, path in enumerate(paths):  # each log on its own: a broken one is named with its reason, the others listed
        try:
            run = read_run_log(path, args.score_line, args.seeds[i] if args.seeds else None)
            check_not_listed(run, runs)
        except Refusal as refusal:
            print(f"error: {refusal}", file=sys.stderr, flush=True)
            broken += 1
            continue
        runs.append(run)
        print("\n".join(describe_run(run)), flush=True)
    return 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
