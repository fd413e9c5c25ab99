"""Does a published record's score stand under the 10-minute track's rules? The figures, from its own files and logs.

    python3 records/audit.py FOLDER... [--compare-to RECORD] [--claims FILE] [--code NAME] [--table]

For each record folder (ours or the official repository's) it prints, check by check, the figures behind it, since
the rules leave some questions open (records/README.md, "Auditing published records"):
- artifact: the model bytes each log reports plus the bytes of the folder's code file, against 16,000,000; and what
  the log counted for the code when that differs (a packed copy, another version);
- training: train_time, and training plus GPTQ (its Hessians, its calibration data, its rounding, where logged);
- evaluation: every pass's eval_time and their sum, and any compile, warm-up or precompute logged beside the timed
  passes;
- code: whether the source embedded in each log is the folder's code file, byte for byte;
- seeds: the val_bpb mean and sample std of the logs, and with --compare-to (or --claims) the one-sided t-test of
  the record rule (improvement > 0.005 nats per token) against the record it claims to beat.
The logs are read with run_log.py (any layout it reads, subfolders included; a byte-identical copy counts once).
What a log does not say is printed as "not logged", never guessed. --table prints one markdown row per folder.
"""
from __future__ import annotations

import argparse
import ast
import base64
import difflib
import hashlib
import lzma
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from run_log import (MODEL_BYTES_LINE, OFFICIAL_SEPARATOR, TIME_CAP_MS, TIME_PREFIX, Record, Refusal, ScoredRun,
                     nats_per_bpb, read_record, read_run_log, split_layout)
from significance import mean_difference

ARTIFACT_CAP_BYTES = 16_000_000
MIN_DELTA_NATS = 0.005  # the record rule: beat the record by this much, one-sided ...
ALPHA = 0.01            # ... with p below this
NOT_LOGGED = "not logged"
# What published scripts log around GPTQ (times in seconds).
HESSIANS_LINE = re.compile(r"^(?:GPTQ:collected \d+ Hessians|gptq:calibrated \d+ layers) in ([\d.]+)s")
CALIBRATION_DATA_LINE = re.compile(r"^gptq:generated \d+ sequences in ([\d.]+)s")  # self-generated calibration
ROUNDING_LINE = re.compile(r"^GPTQ:quantized in ([\d.]+)s")
GPTQ_DONE_LINE = re.compile(r"^gptq:done in ([\d.]+)s")
POST_GPTQ_LINE = re.compile(r"^wallclock:post_gptq total_elapsed:([\d.]+)s")  # training clock start to GPTQ's end
# An evaluation pass: `quantized_ttt val_loss:... val_bpb:... eval_time:366525ms`, names with spaces included.
EVAL_LINE = re.compile(r"^([A-Za-z][\w\- ]*?)\s+(?:stride:\d+\s+)?val_loss:\s*\S+\s+val_bpb:\s*([\d.]+).*?"
                       r"\beval_time:\s*(\d+)ms")
# Work on the validation data logged beside the timed passes.
COMPILE_WARMUP_START = re.compile(r"^ttt_lora:warming up compile(.*)$")
COMPILE_WARMUP_DONE = re.compile(r"^ttt_lora:compile warmup done \(([\d.]+)s\)")
SLIDING_COMPILE_LINE = re.compile(r"^Compiling forward_logits for sliding window eval")
NGRAM_PRECOMPUTE_LINE = re.compile(r"^ngram_tilt:precompute n_tok=(\d+).*\belapsed=([\d.]+)s")
TEMPERATURE_FIT_LINE = re.compile(r"^temp_scaling optimal_T:(\S+) eval_time:(\d+)ms")
SOURCE_BLOCK = re.compile(rb"^Source code:\r?\n={100}\r?\n", re.MULTILINE)  # newer published scripts
HYPERPARAMETERS_BLOCK = re.compile(rb"\A={100}\r?\nHyperparameters:\r?\n(?:  .*\n)*")
CODE_SUFFIXES = (".py", ".cpp", ".c", ".cu", ".h", ".sh")  # files of code a folder may ship beside its code file


@dataclass
class LogAudit:
    """One log's figures; None where the log does not say."""
    path: Path
    run: ScoredRun
    model_bytes: int | None
    eval_passes: list        # (name, val_bpb as printed, eval_time ms), in order
    beside_timer: list       # what the log says was done on the side, as text
    gptq_parts: list         # (what, ms)
    post_gptq_ms: int | None
    rounding_logged: bool
    source: bytes | None     # the code the log embeds
    runs_in_file: int

    @property
    def counted_code_bytes(self) -> int | None:
        """What the log's total counted for the code."""
        a, m = self.run.artifact_bytes, self.model_bytes
        return None if None in (a, m) else a - m

    @property
    def train_and_gptq_ms(self) -> int | None:
        if self.run.train_time_ms is None or not self.gptq_parts:
            return None
        return self.run.train_time_ms + sum(ms for _, ms in self.gptq_parts)

    @property
    def eval_total_ms(self) -> int | None:
        return sum(ms for *_, ms in self.eval_passes) if self.eval_passes else None


@dataclass
class FolderAudit:
    folder: Path
    name: str
    published_val_bpb: float | None
    code_name: str | None
    code: bytes | None
    other_code: list                 # (file name, bytes, named by the code file or by a file it names)
    logs: list[LogAudit]
    copies: list                     # (copy, of)
    unread: list                     # (file, why)
    comparison: str | None = None
    comparison_cell: str = "no claim given"
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reading a folder.


def run_lines(path: Path, raw: bytes) -> list[str]:
    """The log's lines after its embedded source, unix-time prefixes removed, as read_run_log reads them."""
    layout, _, rest = split_layout(path, raw)
    lines = rest.decode("utf-8", errors="replace").splitlines()
    return lines if layout == "kit" else [TIME_PREFIX.sub("", line) for line in lines]


def published_source(raw: bytes) -> bytes | None:
    """The code a published script wrote into its log (its own file, plus the newline of its log call): after a
    `Source code:` banner, else before the first line of `=`, else after the Hyperparameters block that opens the
    log; None when the log holds none (console logs)."""
    if m := SOURCE_BLOCK.search(raw):
        end = OFFICIAL_SEPARATOR.search(raw, m.end())
        block = raw[m.end():end.start() if end else len(raw)]
    elif (first := OFFICIAL_SEPARATOR.search(raw)) is None:
        return None
    elif first.start() > 0:
        block = raw[:first.start()]
    elif m := HYPERPARAMETERS_BLOCK.match(raw):
        end = OFFICIAL_SEPARATOR.search(raw, m.end())
        block = raw[m.end():end.start() if end else len(raw)]
    else:
        return None
    block = block.removesuffix(b"\n")
    return block or None


def audit_log(path: Path, score_line: str | None) -> LogAudit:
    raw = path.read_bytes()
    run = read_run_log(path, score_line)
    lines = run_lines(path, raw)
    stops = [i for i, line in enumerate(lines) if line.startswith("stopping_early:")]
    after_training = lines[stops[-1]:] if stops else lines  # a file of several runs: the last one's
    gptq_parts, post_gptq_ms, rounding, passes, beside = [], None, False, [], []
    warmup_data = ""
    for line in after_training:
        if m := HESSIANS_LINE.match(line):
            gptq_parts.append(("GPTQ Hessians", seconds_ms(m[1])))
        elif m := CALIBRATION_DATA_LINE.match(line):
            gptq_parts.append(("GPTQ calibration data", seconds_ms(m[1])))
        elif m := ROUNDING_LINE.match(line):
            gptq_parts.append(("GPTQ rounding", seconds_ms(m[1])))
            rounding = True
        elif m := GPTQ_DONE_LINE.match(line):  # the whole of GPTQ: it replaces its parts
            gptq_parts, rounding = [("GPTQ", seconds_ms(m[1]))], True
        elif m := POST_GPTQ_LINE.match(line):
            post_gptq_ms = seconds_ms(m[1])
        elif m := EVAL_LINE.match(line):
            passes.append((m[1], m[2], int(m[3])))
        elif m := COMPILE_WARMUP_START.match(line):
            warmup_data = m[1].strip().strip("()") or "its data not stated"
        elif m := COMPILE_WARMUP_DONE.match(line):
            beside.append(f"TTT compile warm-up {float(m[1]):.1f} s ({warmup_data or 'its data not stated'})")
        elif SLIDING_COMPILE_LINE.match(line):
            beside.append("sliding-window compile (time not logged)")
        elif m := NGRAM_PRECOMPUTE_LINE.match(line):
            beside.append(f"n-gram precompute over {int(m[1]):,} tokens {float(m[2]):.1f} s")
        elif m := TEMPERATURE_FIT_LINE.match(line):
            beside.append(f"temperature fit (T = {m[1]}) {int(m[2]):,} ms")
    if run.gptq_time_ms is not None:  # the kit's own line: calibration and rounding together
        gptq_parts, rounding = [("GPTQ", run.gptq_time_ms)], True
    models = [int(m[2]) for line in after_training if (m := MODEL_BYTES_LINE.match(line))]
    model_bytes = run.model_bytes if run.model_bytes is not None else (models[-1] if models else None)
    return LogAudit(path, run, model_bytes, passes, beside, gptq_parts, post_gptq_ms, rounding,
                    run.source if run.layout == "kit" else published_source(raw), max(len(stops), 1))


def seconds_ms(text: str) -> int:
    return round(float(text) * 1000)


def log_files(folder: Path) -> list[Path]:
    """The folder's run logs: *.log and *.txt files, subfolders included, that mention val_bpb."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".log", ".txt"))
    return [p for p in files if b"val_bpb" in p.read_bytes()]


def code_file(folder: Path, name: str | None) -> Path | None:
    """The code the folder ships: NAME, else train_gpt.py, else its one train_gpt*.py."""
    if name is not None:
        return folder / name if (folder / name).is_file() else None
    if (folder / "train_gpt.py").is_file():
        return folder / "train_gpt.py"
    candidates = sorted(folder.glob("train_gpt*.py"))
    return candidates[0] if len(candidates) == 1 else None


def readable_code(code: bytes) -> str:
    """The code's text and, inside a packed wrapper (`exec(lzma.decompress(base64.b85decode("...")))`), the text
    it unpacks to: read, never run."""
    text = code.decode("utf-8", errors="replace")
    try:
        literals = [node.value for node in ast.walk(ast.parse(text))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 64]
    except (SyntaxError, ValueError):
        return text
    raw_lzma2 = {"format": lzma.FORMAT_RAW, "filters": [{"id": lzma.FILTER_LZMA2}]}
    for literal in literals:
        for options in ({}, raw_lzma2):
            try:
                text += "\n" + lzma.decompress(base64.b85decode(literal), **options).decode("utf-8", errors="replace")
                break
            except (ValueError, lzma.LZMAError):
                continue
    return text


def names_file(text: str, path: Path) -> bool:
    """Does this code use the file: import it (a .py) or name it?"""
    return path.name in text or (path.suffix == ".py" and re.search(rf"\b(?:import|from)\s+{re.escape(path.stem)}\b",
                                                                   text) is not None)


def other_code_files(folder: Path, code: bytes | None, code_path: Path | None) -> list:
    """The folder's other files of code, and whether the code file uses them (directly or through one it uses)."""
    others = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in CODE_SUFFIXES and p != code_path]
    texts, named = [readable_code(code or b"")], set()
    while new := [p for p in others if p not in named and any(names_file(text, p) for text in texts)]:
        named.update(new)
        texts = [readable_code(p.read_bytes()) for p in new]
    return [(p.relative_to(folder).as_posix(), p.stat().st_size, p in named) for p in others]


def audit_folder(folder: Path, code_name: str | None = None, score_line: str | None = None) -> FolderAudit:
    code_path = code_file(folder, code_name)
    code = code_path.read_bytes() if code_path else None
    other_code = other_code_files(folder, code, code_path)
    logs, copies, unread, seen = [], [], [], {}
    for path in log_files(folder):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            copies.append((path, seen[digest]))
            continue
        seen[digest] = path
        try:
            logs.append(audit_log(path, score_line))
        except Refusal as refusal:
            unread.append((path, str(refusal).removeprefix(f"{path}: ")))
    try:
        record = read_record(str(folder))
        name, published = record.name, record.val_bpb
    except Refusal:
        name, published = folder.name, None
    audit = FolderAudit(folder, name, published, code_path.name if code_path else None, code, other_code, logs,
                        copies, unread)
    if code_path is None:
        candidates = ", ".join(p.name for p in sorted(folder.glob("train_gpt*.py"))) or "none"
        audit.notes.append(f"no code file ({code_name or 'train_gpt.py'}; candidates: {candidates}): "
                           "name it with --code")
    return audit


# ----------------------------------------------------------------------------------------------
# The seeds and the claim.


def distinct_runs(audit: FolderAudit) -> list[ScoredRun]:
    return [log.run for log in audit.logs]


def repeated_seeds(runs: list[ScoredRun]) -> list[int]:
    seeds = [run.seed for run in runs if run.seed is not None]
    return sorted({seed for seed in seeds if seeds.count(seed) > 1})


def seed_summary(runs: list[ScoredRun]) -> tuple[float, float | None]:
    scores = [run.val_bpb for run in runs]
    return statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else None


def compare_with_claim(audit: FolderAudit, baseline: Record) -> None:
    """The record rule's one-sided test of the logs' val_loss against the baseline's val_bpb, taken to nats per token
    of these logs' split with their tokens per byte (as make_submission.py --compare-to)."""
    runs = distinct_runs(audit)
    where = f"vs {baseline.describe()}"
    why_not = None
    if not runs:
        why_not = "no log with a score"
    elif repeats := repeated_seeds(runs):
        why_not = f"seeds repeat ({', '.join(map(str, repeats))}): not independent samples"
    elif nats_per_bpb(runs) is None:
        why_not = "a log gives no val_loss"
    if why_not:
        audit.comparison, audit.comparison_cell = f"{where}: not tested: {why_not}", f"not tested: {why_not}"
        return
    factor = nats_per_bpb(runs)
    base = baseline.baseline
    base_nats = [x * factor for x in base] if isinstance(base, list) else base * factor
    test = mean_difference(base_nats, [run.val_loss for run in runs], margin=MIN_DELTA_NATS)
    if test.p_beats_margin is None:
        audit.comparison = f"{where}: improvement {test.mean:.5f} nats per token; no p-value ({test.test})"
        audit.comparison_cell = f"{test.mean:+.5f} nats, no p-value ({test.test})"
        return
    verdict = "below" if test.p_beats_margin < ALPHA else "not below"
    audit.comparison = (f"{where}: improvement {test.mean:.5f} nats per token ({test.test}); H0 improvement <= "
                        f"{MIN_DELTA_NATS}: t = {test.t_beats_margin:.2f}, df = {test.df:.2f}, "
                        f"p = {test.p_beats_margin:.3g} ({verdict} {ALPHA})")
    label = baseline.name if baseline.where == "a number" else Path(baseline.where).name
    audit.comparison_cell = f"{test.mean:+.5f} nats vs {label} ({test.test}): p = {test.p_beats_margin:.2g}"


def read_claims(path: Path) -> dict[str, str]:
    """`RECORD -> BASELINE` per line (folder names; `#` starts a comment)."""
    claims = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        record, arrow, baseline = line.partition(" -> ")
        if not arrow:
            raise Refusal(f"{path}: line {number} is not 'RECORD -> BASELINE'")
        claims[record.strip()] = baseline.strip()
    return claims


def baseline_folder(name: str, folders: list[Path]) -> Path:
    matches = [f for f in folders if f.name == name]
    return matches[0] if matches else Path(name)


# ----------------------------------------------------------------------------------------------
# The report.


def count(value: int | None) -> str:
    return NOT_LOGGED if value is None else f"{value:,}"


def ms(value: int | None) -> str:
    return NOT_LOGGED if value is None else f"{value:,} ms"


def over(value: int | None, cap: int) -> str:
    return "" if value is None else f" ({'over' if value > cap else 'within'} {cap:,})"


def artifact_line(audit: FolderAudit, log: LogAudit) -> str:
    run, counted = log.run, log.counted_code_bytes
    if log.model_bytes is None:
        return f"model bytes {NOT_LOGGED} (the log's total: {count(run.artifact_bytes)})"
    if audit.code is None:
        return f"model {log.model_bytes:,} + no code file; the log's total {count(run.artifact_bytes)}"
    shipped = log.model_bytes + len(audit.code)
    text = (f"model {log.model_bytes:,} + {audit.code_name} {len(audit.code):,} = {shipped:,} bytes"
            f"{over(shipped, ARTIFACT_CAP_BYTES)}")
    if counted is not None and counted != len(audit.code):
        text += f"; the log counted {counted:,} for the code (total {run.artifact_bytes:,})"
    named = sum(size for _, size, is_named in audit.other_code if is_named)
    if named:
        text += f"; with the other code files it uses: {shipped + named:,}"
    return text


def training_line(log: LogAudit) -> str:
    run, total = log.run, log.train_and_gptq_ms
    text = f"train_time {ms(run.train_time_ms)}{over(run.train_time_ms, TIME_CAP_MS)}"
    if run.train_time_ms is not None and run.train_time_ms > TIME_CAP_MS and run.stopped_by_wallclock_cap:
        steps = NOT_LOGGED if run.step_avg_ms is None else f"{2 * run.step_avg_ms:,.0f} ms"
        text += f", {run.train_time_ms - TIME_CAP_MS:,} ms after the wallclock stop (two steps: {steps})"
    if log.gptq_parts:
        parts = " + ".join(f"{what} {ms(t)}" for what, t in log.gptq_parts)
        text += f"; + {parts} = {ms(total)}{over(total, TIME_CAP_MS)}"
        text += "" if log.rounding_logged else " (rounding not logged)"
    else:
        text += "; no GPTQ logged"
    if log.post_gptq_ms is not None:
        text += f"; the log's own elapsed time at GPTQ's end: {ms(log.post_gptq_ms)}"
    return text


def evaluation_line(log: LogAudit) -> str:
    if not log.eval_passes:
        return f"eval_time {NOT_LOGGED}"
    passes = ", ".join(f"{name} {t:,} ms ({bpb})" for name, bpb, t in log.eval_passes)
    return f"{passes}; all passes {ms(log.eval_total_ms)}{over(log.eval_total_ms, TIME_CAP_MS)}"


def source_verdict(audit: FolderAudit, log: LogAudit) -> str:
    if log.source is None:
        return NOT_LOGGED
    if audit.code is None:
        return f"logged ({len(log.source):,} bytes); no code file to compare"
    if log.source == audit.code:
        return f"same as {audit.code_name}"
    if log.source.rstrip(b"\n") == audit.code.rstrip(b"\n"):
        return f"same as {audit.code_name} but for the newlines at its end"
    if f"code_id:{hashlib.sha256(audit.code).hexdigest()}".encode() in log.path.read_bytes():
        return f"{audit.code_name} is its packed form (its sha256 is the logged code_id)"
    diff = difflib.unified_diff(log.source.decode(errors="replace").splitlines(),
                                audit.code.decode(errors="replace").splitlines(), lineterm="", n=0)
    changed = sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    return f"differs: {len(log.source):,} bytes logged vs {len(audit.code):,}; {changed} lines differ"


def describe_folder(audit: FolderAudit) -> list[str]:
    published = "" if audit.published_val_bpb is None else f", published val_bpb {audit.published_val_bpb:.8g}"
    others = ", ".join(f"{n} {size:,}" + (" (used by the code)" if named else "") for n, size, named in
                       audit.other_code) or "none"
    lines = [f"{audit.folder}: {audit.name!r}{published}",
             f"  code file    {audit.code_name or 'none'}"
             + (f" {len(audit.code):,} bytes" if audit.code is not None else "") + f"; other code files: {others}"]
    lines += [f"  note         {note}" for note in audit.notes]
    for log in audit.logs:
        run = log.run
        seed = "seed unknown" if run.seed is None else f"seed {run.seed}"
        lines += [f"  {log.path.relative_to(audit.folder)} ({seed}, {run.score_line} val_bpb {run.val_bpb:.8f})",
                  f"    artifact   {artifact_line(audit, log)}",
                  f"    training   {training_line(log)}",
                  f"    evaluation {evaluation_line(log)}",
                  f"    beside     {'; '.join(log.beside_timer) or 'nothing logged'}",
                  f"    source     {source_verdict(audit, log)}"]
        if log.runs_in_file > 1:
            lines.append(f"    note       {log.runs_in_file} runs in this file: the figures are the last run's")
    lines += [f"  copy         {c.relative_to(audit.folder)} is {o.relative_to(audit.folder)}" for c, o in audit.copies]
    lines += [f"  not read     {p.relative_to(audit.folder)}: {why}" for p, why in audit.unread]
    lines.append(f"  seeds        {seeds_text(audit)}")
    lines.append(f"  claim        {audit.comparison or 'no record to compare with given (--compare-to or --claims)'}")
    return lines


def seeds_text(audit: FolderAudit) -> str:
    runs = distinct_runs(audit)
    if not runs:
        return "no log with a score"
    mean, std = seed_summary(runs)
    seeds = ", ".join("unknown" if r.seed is None else str(r.seed) for r in runs)
    repeats = repeated_seeds(runs)
    return (f"{len(runs)} log{'s' * (len(runs) > 1)} (seeds {seeds}): val_bpb mean {mean:.8f}, std "
            + ("n/a (one log)" if std is None else f"{std:.8f}")
            + (f"; seeds repeat: {', '.join(map(str, repeats))}" if repeats else ""))


# ----------------------------------------------------------------------------------------------
# The table: one row per folder, the largest figure over its logs.


TABLE_HEADER = ("| record | logs (seeds) | val_bpb: logs' mean ± std (published) | artifact as shipped, largest: "
                "model + code file (log's count) | training, longest: train_time; + GPTQ | evaluation, longest: all "
                "passes (score pass) | beside the timed passes | logged source = code file | vs the record it "
                "claims to beat |\n|---|---|---|---|---|---|---|---|---|")


def seconds(value: int | None) -> str:
    return "n/l" if value is None else f"{value / 1000:.3f} s"


def table_row(audit: FolderAudit) -> str:
    runs, logs = distinct_runs(audit), audit.logs
    if not logs:
        cells = ["0"] + ["no log with a score"] * 6
    else:
        mean, std = seed_summary(runs)
        seeds = ", ".join("?" if r.seed is None else str(r.seed) for r in runs)
        published = "n/a" if audit.published_val_bpb is None else f"{audit.published_val_bpb:.8g}"
        cells = [f"{len(logs)} ({seeds})", f"{mean:.5f} ± {'n/a' if std is None else f'{std:.5f}'} ({published})",
                 artifact_cell(audit), training_cell(logs), evaluation_cell(logs), beside_cell(logs),
                 source_cell(audit)]
    name = audit.folder.name.replace("|", "/")
    return "| " + " | ".join([name, *cells, audit.comparison_cell]) + " |"


def artifact_cell(audit: FolderAudit) -> str:
    logs = [log for log in audit.logs if log.model_bytes is not None]
    if not logs:
        return f"model bytes {NOT_LOGGED}"
    log = max(logs, key=lambda log: log.model_bytes)
    counted = "n/l" if log.counted_code_bytes is None else f"{log.counted_code_bytes:,}"
    if audit.code is None:
        return f"{log.model_bytes:,} + no code file ({counted})"
    shipped = log.model_bytes + len(audit.code)
    named = sum(size for _, size, is_named in audit.other_code if is_named)
    text = f"{log.model_bytes:,} + {len(audit.code):,} = **{shipped:,}** ({counted})"
    return text + (f"; with the code files it uses: {shipped + named:,}" if named else "")


def training_cell(logs: list[LogAudit]) -> str:
    train = max((log.run.train_time_ms for log in logs if log.run.train_time_ms is not None), default=None)
    total = max((log.train_and_gptq_ms for log in logs if log.train_and_gptq_ms is not None), default=None)
    if total is None:
        return f"{seconds(train)}; no GPTQ logged"
    with_gptq = [log for log in logs if log.gptq_parts]
    parts = sorted({what.removeprefix("GPTQ ") for log in with_gptq for what, _ in log.gptq_parts})
    unrounded = sum(not log.rounding_logged for log in with_gptq)
    return (f"{seconds(train)}; {seconds(total)} ({', '.join(parts)}"
            + (f"; rounding not logged in {unrounded} of {len(with_gptq)}" if unrounded else "") + ")")


def evaluation_cell(logs: list[LogAudit]) -> str:
    timed = [log for log in logs if log.eval_total_ms is not None]
    if not timed:
        return "n/l"
    log = max(timed, key=lambda log: log.eval_total_ms)
    return f"{seconds(log.eval_total_ms)} ({seconds(log.run.eval_time_ms)})"


def beside_cell(logs: list[LogAudit]) -> str:
    texts = [text for log in logs for text in log.beside_timer]
    if not texts:
        return "none logged"
    longest = max(texts, key=lambda t: float(m[1]) if (m := re.search(r"([\d.]+) s\b", t)) else 0.0)
    return longest if len(texts) == 1 else f"{longest} (longest of {len(texts)})"


def source_cell(audit: FolderAudit) -> str:
    verdicts = [source_verdict(audit, log) for log in audit.logs]
    counts = {"same": sum(v.startswith("same") or "packed form" in v for v in verdicts),
              "differ": sum(v.startswith("differs") for v in verdicts),
              "not logged": sum(v == NOT_LOGGED for v in verdicts)}
    if audit.code is None:
        return f"no code file; {len(verdicts) - counts['not logged']} logged"
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n) + f" (of {len(verdicts)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER", help="record folders")
    parser.add_argument("--compare-to", metavar="RECORD",
                        help="the record every folder claims to beat: a record folder, its submission json, a val_bpb")
    parser.add_argument("--claims", type=Path, metavar="FILE",
                        help="a file of 'RECORD -> BASELINE' lines (folder names): the record each claims to beat")
    parser.add_argument("--code", metavar="NAME",
                        help="the code file's name in the folders (default train_gpt.py, or the folder's one "
                             "train_gpt*.py)")
    parser.add_argument("--score-line", metavar="NAME", help="the name of the score's line (default: as run_log.py)")
    parser.add_argument("--table", action="store_true", help="one markdown row per folder")
    args = parser.parse_args(argv)
    try:
        for folder in args.folders:
            if not folder.is_dir():
                raise Refusal(f"{folder}: not a folder")
        claims = read_claims(args.claims) if args.claims else {}
        compare_to = read_record(args.compare_to) if args.compare_to else None
        audits = [audit_folder(folder, args.code, args.score_line) for folder in args.folders]
        for audit in audits:
            if compare_to is not None:
                compare_with_claim(audit, compare_to)
            elif audit.folder.name in claims:
                try:
                    compare_with_claim(audit, read_record(str(baseline_folder(claims[audit.folder.name],
                                                                              args.folders))))
                except Refusal as refusal:  # one unreadable baseline leaves the other folders' audits whole
                    audit.comparison = audit.comparison_cell = f"the record to beat is not readable: {refusal}"
    except (Refusal, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.table:
        print("\n".join([TABLE_HEADER, *map(table_row, audits)]))
    else:
        print("\n\n".join("\n".join(describe_folder(audit)) for audit in audits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
