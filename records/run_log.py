"""Read a train_gpt.py run log (logs/<RUN_ID>.txt) into the numbers a submission needs.

The log format is the trainer's (../../shared/SPEC.md, "Names users already know"): the script's
own source between a `source train_gpt.py bytes:<N> sha256:<hex>` header and `end_of_source`,
then one line per event. Lines this reader does not know are ignored, so the trainer may add
informational lines freely. Export formats are matched generically
(`final_<format_id>_roundtrip_exact`), so `int8+zlib`, `int6+lzma` and later ones all parse.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

SOURCE_HEADER = re.compile(rb"^source \S+ bytes:(\d+) sha256:([0-9a-f]{64})\n", re.MULTILINE)
SOURCE_END = b"end_of_source\n"
KEY_VALUE = re.compile(r"(\w+):(\S+)")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) (.*)$")
DEVICE_LINE = re.compile(r"^device:(\S+) name:(.*?) world_size:(\d+)")
VAL_SPLIT_LINE = re.compile(r"^val_split tokens:(\d+) sha256:([0-9a-f]+) scope:(\w+)")
MODEL_BYTES_LINE = re.compile(r"^Serialized model (\S+): (\d+) bytes")
TOTAL_BYTES_LINE = re.compile(r"^Total submission size (\S+): (\d+) bytes")
CODE_BYTES_LINE = re.compile(r"^Code size: (\d+) bytes")
ROUNDTRIP_LINE = re.compile(r"^final_(\w+?)_roundtrip (.*)$")
EXACT_LINE = re.compile(r"^final_(\w+?)_roundtrip_exact (.*)$")


class Refusal(ValueError):
    """Why logs cannot back a submission; the message names the log and the rule it breaks."""


@dataclass(frozen=True)
class ValPoint:
    step: int
    train_time_ms: int
    val_loss: float
    val_bpb: float


@dataclass(frozen=True)
class ScoredRun:
    """A finished run as its log tells it."""
    path: Path
    source: bytes            # the trainer's code, byte for byte as it ran
    device: str              # e.g. "cuda NVIDIA H100 80GB HBM3"
    world_size: int
    settings: dict           # env var name -> value, every setting of the run
    model_params: int | None
    val_tokens: int          # the validation split's fingerprint is (val_tokens, val_sha256)
    val_sha256: str
    val_scope: str           # "full", or "prefix" when MAX_VAL_TOKENS cut the split short
    val_curve: tuple[ValPoint, ...]
    steps: int
    iterations: int
    train_time_ms: int       # train_time of the last step line
    step_avg_ms: float
    stopped_by_wallclock_cap: bool
    export_format_id: str    # "int8_zlib" for the "int8+zlib" format
    model_bytes: int | None
    artifact_bytes: int      # "Total submission size": code plus compressed model
    code_bytes: int
    eval_time_ms: int        # eval_time of the final round-trip line
    val_loss: float          # the exact round-trip score, nats per token
    val_bpb: float

    @property
    def seed(self) -> int | None:
        return self.settings.get("SEED")

    @property
    def pre_export_val_bpb(self) -> float | None:
        return self.val_curve[-1].val_bpb if self.val_curve else None

    @property
    def tokens_per_byte(self) -> float:
        # val_bpb = val_loss / ln 2 * tokens / bytes
        return self.val_bpb * math.log(2) / self.val_loss

    @property
    def val_split(self) -> str:
        return f"tokens:{self.val_tokens} sha256:{self.val_sha256} scope:{self.val_scope}"


def format_id(export_format: str) -> str:
    """`int8+zlib` -> `int8_zlib`: how the final score lines spell a format."""
    return re.sub(r"\W", "_", export_format)


def key_values(text: str) -> dict[str, str]:
    return dict(KEY_VALUE.findall(text))


def milliseconds(value: str) -> float:
    return float(value.removesuffix("ms"))


def split_source(path: Path, raw: bytes) -> tuple[bytes, bytes]:
    """Return (the embedded source, the log after it), checked against the source header."""
    header = SOURCE_HEADER.search(raw)
    if header is None:
        raise Refusal(f"{path}: no 'source train_gpt.py bytes:<N> sha256:<hex>' header; "
                      "a log must carry the code that produced it")
    start, size = header.end(), int(header.group(1))
    source, end = raw[start:start + size], start + size
    if len(source) != size or raw[end:end + len(SOURCE_END)] != SOURCE_END:
        raise Refusal(f"{path}: the embedded source is not {size} bytes followed by 'end_of_source' "
                      "(the log is truncated or was edited)")
    if hashlib.sha256(source).hexdigest() != header.group(2).decode():
        raise Refusal(f"{path}: the embedded source does not match the sha256 of its source header")
    return source, raw[end + len(SOURCE_END):]


def read_run_log(path: str | Path) -> ScoredRun:
    """Parse a finished run's log; raise Refusal naming the log and the missing line."""
    path = Path(path)
    source, rest = split_source(path, path.read_bytes())
    found: dict = {"val_curve": [], "model_bytes": {}, "artifact_bytes": {}, "eval_time_ms": {}}
    for line in rest.decode("utf-8", errors="replace").splitlines():  # a cut-off run may end mid-character
        parse_line(line, found)

    def required(key: str, line_format: str):
        if key not in found:
            raise Refusal(f"{path}: no '{line_format}' line")
        return found[key]

    if "score" not in found:
        raise Refusal(f"{path}: no final exact score line ('final_<format>_roundtrip_exact val_loss:... "
                      "val_bpb:...'); a submission needs finished runs (did this one crash or get cut off?)")
    score_format, (val_loss, val_bpb) = found["score"]
    steps, iterations, train_time_ms, step_avg_ms = required("last_step", "step:<s>/<n> ... train_time:<ms>ms")
    val_tokens, val_sha256, val_scope = required("val_split", "val_split tokens:<N> sha256:<hex> scope:<scope>")
    if score_format not in found["artifact_bytes"] or score_format not in found["eval_time_ms"]:
        raise Refusal(f"{path}: the scored format {score_format} lacks its 'Total submission size' "
                      f"or 'final_{score_format}_roundtrip ... eval_time:<ms>ms' line")
    device, device_name, world_size = found.get("device", ("unknown", "", 1))
    return ScoredRun(
        path=path, source=source, device=f"{device} {device_name}".strip(), world_size=world_size,
        settings=found.get("settings", {}), model_params=found.get("model_params"),
        val_tokens=val_tokens, val_sha256=val_sha256, val_scope=val_scope,
        val_curve=tuple(found["val_curve"]), steps=steps, iterations=iterations,
        train_time_ms=train_time_ms, step_avg_ms=step_avg_ms,
        stopped_by_wallclock_cap=found.get("stopped", False), export_format_id=score_format,
        model_bytes=found["model_bytes"].get(score_format), artifact_bytes=found["artifact_bytes"][score_format],
        code_bytes=required("code_bytes", "Code size: <bytes> bytes"),
        eval_time_ms=found["eval_time_ms"][score_format], val_loss=val_loss, val_bpb=val_bpb,
    )


def parse_line(line: str, found: dict) -> None:
    """Note in `found` what one log line says; a later line of a kind replaces an earlier one."""
    if m := STEP_LINE.match(line):
        fields, step, iterations = key_values(m.group(3)), int(m.group(1)), int(m.group(2))
        train_time_ms = int(milliseconds(fields["train_time"]))
        found["last_step"] = (step, iterations, train_time_ms, milliseconds(fields["step_avg"]))
        if "val_bpb" in fields:
            found["val_curve"].append(ValPoint(step, train_time_ms, float(fields["val_loss"]),
                                               float(fields["val_bpb"])))
    elif m := EXACT_LINE.match(line):
        fields = key_values(m.group(2))
        found["score"] = (m.group(1), (float(fields["val_loss"]), float(fields["val_bpb"])))
    elif m := ROUNDTRIP_LINE.match(line):
        found["eval_time_ms"][m.group(1)] = int(milliseconds(key_values(m.group(2))["eval_time"]))
    elif m := TOTAL_BYTES_LINE.match(line):
        found["artifact_bytes"][format_id(m.group(1))] = int(m.group(2))
    elif m := MODEL_BYTES_LINE.match(line):
        found["model_bytes"][format_id(m.group(1))] = int(m.group(2))
    elif m := CODE_BYTES_LINE.match(line):
        found["code_bytes"] = int(m.group(1))
    elif m := VAL_SPLIT_LINE.match(line):
        found["val_split"] = (int(m.group(1)), m.group(2), m.group(3))
    elif m := DEVICE_LINE.match(line):
        found["device"] = (m.group(1), m.group(2), int(m.group(3)))
    elif line.startswith("settings:"):
        found["settings"] = json.loads(line.removeprefix("settings:"))
    elif line.startswith("model_params:"):
        found["model_params"] = int(line.removeprefix("model_params:"))
    elif line.startswith("stopping_early: wallclock_cap"):
        found["stopped"] = True


def read_run_logs(paths) -> list[ScoredRun]:
    return [read_run_log(path) for path in paths]


def check_same_val_split(runs: list[ScoredRun]) -> None:
    """Seeds are only comparable when they scored the very same tokens."""
    first = runs[0]
    for run in runs[1:]:
        if run.val_split != first.val_split:
            raise Refusal(f"{run.path} scored a different validation split than {first.path} "
                          f"({run.val_split} vs {first.val_split}); all logs must score the same split")
