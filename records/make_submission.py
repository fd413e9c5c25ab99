"""Turn finished run logs into a verified submission folder (see records/README.md).

    python3 records/make_submission.py --track 10min_16mb --name "My Idea" --author "Ada" \\
        --github-id ada --compare-to 1.2244 logs/seed1.txt logs/seed2.txt logs/seed3.txt

writes records/track_<track>/<YYYY-MM-DD>_<Name>/ with the logs, train_gpt.py recovered from
them, submission.json, README.md and training_curves.png. It refuses (exit code 2, an `error: ...`
line, nothing written) when the logs cannot back a valid score; the message names the log and the rule.
Only logs of this kit's train_gpt.py can back a submission (records/README.md, "Logs").
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from run_log import (PER_RUN_SETTINGS, TIME_CAP_MS, Record, Refusal, ScoredRun, check_same_settings,
                     check_same_tokenizer, check_same_val_split, check_seeds, differing_settings, nats_per_bpb,
                     read_record, read_run_logs, tokenizer_text, training_time_check)
from significance import Difference, mean_difference
from training_curves import pass_name, save_training_figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402  (pack_code: the one truth of the packed file's format)

TRACKS = ("10min_16mb", "non_record_16mb")
ARTIFACT_CAP_BYTES = 16_000_000  # decimal bytes: code plus compressed model
MIN_DELTA_NATS = 0.005           # a new record must beat the best by this much ...
ALPHA = 0.01                     # ... with a one-sided p-value below this
FOLDER_FILES = ("train_gpt.py", "submission.json", "README.md", "training_curves.png")
RECORD_WORLD_SIZE = 8  # the 10-minute track: 8xH100 SXM
BYTES_TOLERANCE = 1e-6  # val_bytes from 8-decimal scores: exact to ~1e-8 of the bytes


# ----------------------------------------------------------------------------------------------
# The rules a set of logs must pass.


def check_runs(runs: list[ScoredRun], track: str, allow_mixed_settings: bool = False) -> None:
    for run in runs:
        check_run(run, track)
    check_same_source(runs)
    check_same_tokenizer(runs)
    check_same_val_split(runs)
    check_same_settings(runs, allow_mixed_settings)
    check_seeds(runs)
    check_distinct_names(runs)


def check_run(run: ScoredRun, track: str) -> None:
    require_kit_log(run)
    if run.val_scope != "full":
        raise Refusal(f"{run.path}: scored only a prefix of the validation split (MAX_VAL_TOKENS); "
                      "a submission needs the full split")
    if run.code_bytes != len(run.source):
        raise Refusal(f"{run.path}: 'Code size' says {run.code_bytes} bytes but the embedded source is "
                      f"{len(run.source)} bytes; the code counted in the artifact must be the code that ran")
    if track == "10min_16mb":
        status, note = training_time_check(run)
        if status == "over":
            raise Refusal(f"{run.path}: {note}; submit to non_record_16mb instead")
        if run.unpublished_split:
            raise Refusal(f"{run.path}: the trainer warned that its validation split ({run.val_tokens:,} tokens) is "
                          "not the published split's count, so its score is not comparable with the records; "
                          "score the published split (data/cached_challenge_fineweb.py) or submit to non_record_16mb")
        if (eval_ms := run.eval_total_ms or run.eval_time_ms) > TIME_CAP_MS:  # every final pass counts
            raise Refusal(f"{run.path}: evaluation took {eval_ms:,} ms, over the 10-minute track's limit of "
                          f"{TIME_CAP_MS:,} ms (600 s, every final pass together); submit to non_record_16mb instead")
        if not on_record_hardware(run):
            raise Refusal(f"{run.path}: the log says it ran on {run.device} with world_size "
                          f"{run.world_size if run.world_size is not None else 'unknown'}; the 10-minute track is "
                          f"{RECORD_WORLD_SIZE}xH100 SXM (the log's 'device:cuda name:NVIDIA H100 80GB HBM3 "
                          f"world_size:{RECORD_WORLD_SIZE}' line): a run on other hardware belongs on the non-record "
                          "track: pass --track non_record_16mb")


def on_record_hardware(run: ScoredRun) -> bool:
    """8 CUDA processes on H100 SXM, as the log's device line says (H100 PCIe and NVL are other cards)."""
    device, _, name = run.device.partition(" ")
    return (device == "cuda" and run.world_size == RECORD_WORLD_SIZE and "H100" in name
            and not re.search(r"PCIe|NVL", name, re.IGNORECASE))


def require_kit_log(run: ScoredRun) -> None:
    """A submission is built only from the kit's logs: their code and validation split can be verified."""
    if run.layout != "kit":
        layout = ("the official script's layout: its source, a line of 100 '=', then the run"
                  if run.layout == "official" else "no source of the script that ran")
        raise Refusal(f"{run.path}: not a log of this kit's train_gpt.py ({layout}); make_submission.py builds "
                      "a submission only from the kit's own logs, which carry a 'source train_gpt.py bytes:N "
                      "sha256:H' header, the val_split fingerprint and the settings; read other logs with "
                      "records/run_log.py or compare them with records/compare_runs.py")
    for value, line_format in ((run.train_time_ms, "step:<s>/<n> ... train_time:<ms>ms"),
                               (run.val_sha256, "val_split tokens:<N> sha256:<hex> scope:<scope>"),
                               (run.code_bytes, "Code size: <bytes> bytes"),
                               (run.artifact_bytes, "Total submission size <format>: <bytes> bytes"),
                               (run.eval_time_ms, f"{run.score_line.removesuffix('_exact')} ... eval_time:<ms>ms"),
                               (run.val_loss, f"{run.score_line} val_loss:<x> val_bpb:<x>")):
        if value is None:
            raise Refusal(f"{run.path}: no '{line_format}' line")


def check_same_source(runs: list[ScoredRun]) -> None:
    for run in runs[1:]:
        if run.source != runs[0].source and code_id(run) != code_id(runs[0]):
            raise Refusal(f"{run.path}: its train_gpt.py differs from the one in {runs[0].path}; "
                          "all logs of a submission must come from the same code")


def code_id(run: ScoredRun) -> str:
    """The code's identity: the logged sha256 of train_gpt.py packed (train_gpt.pack_code), which a packed run and a
    plain run of one commit share; for logs without one, the sha256 of the source."""
    return run.code_id or hashlib.sha256(run.source).hexdigest()


def check_distinct_names(runs: list[ScoredRun]) -> None:
    """Each log keeps its file name in the folder."""
    names = {}
    for run in runs:
        if run.path.name in FOLDER_FILES or run.path.name in names:
            raise Refusal(f"{run.path}: a log named {run.path.name!r} clashes with "
                          f"{names.get(run.path.name, 'a file the folder needs')}; rename it")
        names[run.path.name] = run.path


# ----------------------------------------------------------------------------------------------
# Significance against the best record (or any baseline).


def compare_with_baseline(runs: list[ScoredRun], record: Record, unit: str, min_delta: float,
                          alpha: float) -> dict:
    # The record's val_bpb is converted to nats per token of these logs' split, so both sides share
    # one unit, also when the record used another tokenizer; in bpb no conversion is needed.
    factor = nats_per_bpb(runs)
    if unit == "bpb":
        bpb = mean_difference(record.baseline, [run.val_bpb for run in runs], margin=min_delta)
        nats, tested = bpb.scaled(factor), bpb
    else:
        baseline = record.baseline
        baseline_nats = [x * factor for x in baseline] if isinstance(baseline, list) else baseline * factor
        nats = mean_difference(baseline_nats, [run.val_loss for run in runs], margin=min_delta)
        bpb, tested = nats.scaled(1 / factor), nats
    significant = tested.p_beats_margin is not None and tested.p_beats_margin < alpha
    return {
        "baseline": record.describe(),
        "baseline_val_bpb": record.val_bpb,
        "baseline_seeds": len(record.baseline) if isinstance(record.baseline, list) else None,
        "tokens_per_byte": math.log(2) / factor,
        "rule": {"unit": unit, "min_delta": min_delta, "alpha": alpha,
                 "h0": f"improvement <= {min_delta} {unit}", "h1": f"improvement > {min_delta} {unit}",
                 "test": tested.test, "t": tested.t_beats_margin, "df": tested.df},
        "improvement_nats": nats.mean,
        "improvement_bpb": bpb.mean,
        "ci95_nats": nats.ci95,
        "p_value": tested.p_beats_margin,
        "significant": significant,
        "verdict": verdict(tested, unit, alpha, significant),
    }


def verdict(tested: Difference, unit: str, alpha: float, significant: bool) -> str:
    if tested.p_beats_margin is None:  # too few seeds, or no spread: the test says why
        return tested.test if tested.test.startswith("not significant") else "not significant: no p-value"
    relation = "<" if significant else ">="
    return (f"{'significant' if significant else 'not significant'}: improvement {tested.mean:.5f} {unit}, "
            f"t = {tested.t_beats_margin:.2f}, df = {tested.df:.2f}, p = {tested.p_beats_margin:.3g} {relation} "
            f"{alpha} for H0 improvement <= {tested.margin} {unit}")


# ----------------------------------------------------------------------------------------------
# submission.json, README.md and the plot.


def shipped_code(runs: list[ScoredRun], pack: bool) -> bytes:
    """The train_gpt.py the folder holds: packed (train_gpt.pack_code), the file the runs counted, or the source."""
    if not pack:
        return runs[0].source
    packed = train_gpt.pack_code(runs[0].source)[1]
    if runs[0].code_id and hashlib.sha256(packed).hexdigest() != runs[0].code_id:
        raise Refusal(f"--pack-code: packing the source of {runs[0].path} here gives another file than the run "
                      f"counted (its code_id); pack with the run's Python ({sys.version.split()[0]} here) "
                      "or pass --no-pack-code")
    return packed


def counted_packed(runs: list[ScoredRun]) -> bool:
    """Whether the runs' `Total submission size` counted the packed file: the folder then ships it, so that
    bytes_total is the logs' total."""
    return all(run.code_form_counted == "packed" for run in runs)


def published_split(run: ScoredRun) -> bool:
    """The trainer's own rule (its `not the published split's count` warning): the whole split, of a published count
    for the run's vocabulary (any vocabulary, when the log does not say)."""
    vocab = run.settings.get("VOCAB_SIZE")
    counts = train_gpt.PUBLISHED_VAL_TOKENS.get(vocab, ()) if vocab else [
        n for counts in train_gpt.PUBLISHED_VAL_TOKENS.values() for n in counts]
    return run.val_scope == "full" and run.val_tokens in counts and not run.unpublished_split


def check_split_matches_record(runs: list[ScoredRun], record: Record, compare_to: str) -> None:
    """A val_bpb measures one text: the runs and the record must have scored the same validation text, the published
    split's unless both scored one other split (the same tokens). Its bytes, which tokenizers do not change, must
    agree when the record's folder gives them (a record made by this tool)."""
    run = runs[0]
    same_tokens = record.val_sha256 is not None and (record.val_tokens, record.val_sha256) == (run.val_tokens,
                                                                                             run.val_sha256)
    record_split = ("stands for a score on the published split" if record.val_tokens is None else
                    f"scored {record.val_tokens:,} tokens (sha256 {record.val_sha256})")
    if not same_tokens and not published_split(run):
        raise Refusal(f"--compare-to {compare_to}: {run.path} scored a validation split that is not the published one "
                      f"({run.val_tokens:,} tokens, sha256 {run.val_sha256}), and the record {record_split}: the "
                      "val_bpb of two texts are not comparable; compare runs on the published split "
                      "(data/cached_challenge_fineweb.py), or leave out --compare-to")
    if not same_tokens and record.val_tokens is not None and not any(
            record.val_tokens in counts for counts in train_gpt.PUBLISHED_VAL_TOKENS.values()):
        raise Refusal(f"--compare-to {compare_to}: the record {record_split}, not a published split's count, and "
                      f"{run.path} another split ({run.val_tokens:,} tokens, sha256 {run.val_sha256}): the val_bpb "
                      "of two texts are not comparable; compare with a record of the published split")
    bytes_ = sum(r.val_bytes for r in runs) / len(runs)  # require_kit_log: each run gives val_tokens and val_loss
    if record.val_bytes is not None and abs(bytes_ - record.val_bytes) > BYTES_TOLERANCE * record.val_bytes:
        raise Refusal(f"--compare-to {compare_to}: the runs' scores count {bytes_:,.0f} bytes of validation text "
                      f"({run.val_tokens:,} tokens), the record's {record.val_bytes:,.0f} ({record.val_tokens:,} "
                      "tokens): not the same text, or another byte count for it (a tokenizer's byte table differs), "
                      "so the val_bpb are not comparable")


def check_artifacts_fit(runs: list[ScoredRun], code: bytes) -> None:
    """The cap counts the code the folder ships, packed or not, beside each run's model."""
    for run in runs:
        if run.model_bytes is None:
            raise Refusal(f"{run.path}: no 'Serialized model <format>: <bytes> bytes' line")
        if run.model_bytes + len(code) > ARTIFACT_CAP_BYTES:
            raise Refusal(f"{run.path}: artifact of {run.model_bytes + len(code):,} bytes (model {run.model_bytes:,}, "
                          f"code {len(code):,}) exceeds the cap of {ARTIFACT_CAP_BYTES:,} bytes")


def submission_summary(args: argparse.Namespace, runs: list[ScoredRun], comparison: dict | None,
                       code: bytes | None = None) -> dict:
    code = runs[0].source if code is None else code
    losses, bpbs = [run.val_loss for run in runs], [run.val_bpb for run in runs]
    sample_std = (lambda xs: float(np.std(xs, ddof=1)) if len(xs) > 1 else None)
    summary = {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": args.date,
        "val_loss": round(float(np.mean(losses)), 8), "val_bpb": round(float(np.mean(bpbs)), 8),
        "bytes_total": max(run.model_bytes + len(code) for run in runs),  # the largest seed must fit
        "bytes_code": len(code),
        "track": args.track,
        "val_loss_std": sample_std(losses), "val_bpb_std": sample_std(bpbs),
        "export_format": runs[0].export_format_id,
        "score_pass": score_pass(runs),
        "val_split": {"tokens": runs[0].val_tokens, "sha256": runs[0].val_sha256, "published": published_split(runs[0])},
        "seeds": [seed_summary(run, len(code)) for run in runs],
        "compliance": {
            "artifact_cap_bytes": ARTIFACT_CAP_BYTES,
            "artifact_under_cap": all(run.model_bytes + len(code) <= ARTIFACT_CAP_BYTES for run in runs),
            "time_cap_s": TIME_CAP_MS // 1000,
            "train_time_under_cap": all(run.budget_time_ms <= TIME_CAP_MS for run in runs),
            "train_time_within_stop_rule": all(training_time_check(run)[0] != "over" for run in runs),
            "eval_time_under_cap": all((run.eval_total_ms or run.eval_time_ms) <= TIME_CAP_MS for run in runs),
        },
    }
    if warnings := [f"{run.path.name}: {note}" for run in runs
                    if (note := training_time_check(run)[1]) and args.track == "10min_16mb"]:
        summary["warnings"] = warnings
    if comparison is not None:
        summary["comparison"] = comparison
    return summary


def seed_summary(run: ScoredRun, code_bytes: int) -> dict:
    return {
        "seed": run.seed, "log": run.path.name, "val_loss": run.val_loss, "val_bpb": run.val_bpb,
        "score_pass": run.score_pass,
        "pre_export_val_bpb": run.pre_export_val_bpb, "steps": run.steps, "step_avg_ms": run.step_avg_ms,
        "train_time_ms": run.train_time_ms, "gptq_time_ms": run.gptq_time_ms, "eval_time_ms": run.eval_time_ms,
        "stopped_by_wallclock_cap": run.stopped_by_wallclock_cap,
        "bytes_total": run.model_bytes + code_bytes, "bytes_model": run.model_bytes,
    }


def settings_defaults(source: bytes) -> dict:
    """The defaults of the trainer's `class Settings` (env var name -> value), read without running it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            return {item.target.id.upper(): ast.literal_eval(item.value) for item in node.body
                    if isinstance(item, ast.AnnAssign) and item.value is not None}
    return {}


def score_pass(runs: list[ScoredRun]) -> str:
    """The final pass the seeds' scores came from ("roundtrip", "sliding", "ttt"), or "mixed"."""
    return runs[0].score_pass if len({run.score_pass for run in runs}) == 1 else "mixed"


def changed_settings(run: ScoredRun) -> dict:
    """The run's settings that differ from its code's defaults, less those each seed's command sets (and OVERWRITE,
    which a fresh RUN_ID never needs)."""
    defaults = settings_defaults(run.source)
    return {key: value for key, value in run.settings.items()
            if key not in (*PER_RUN_SETTINGS, "OVERWRITE") and (key not in defaults or defaults[key] != value)}


def reproduce_command(runs: list[ScoredRun], script: str) -> str:
    """A shell loop over the seeds that sets every setting that differs from the code's default; one command per
    seed, with its own settings, when the seeds' settings differ (--allow-mixed-settings). Each run gets a fresh
    RUN_ID (the time it starts), so that no earlier run's name is refused or taken over."""
    fresh = "_$(date +%Y%m%d_%H%M%S)"
    if differing_settings(runs):
        return "\n".join(seed_command(run, f"RUN_ID=reproduce_seed{run.seed}{fresh} SEED={run.seed}", script)
                         for run in runs)
    return (f"for SEED in {' '.join(str(run.seed) for run in runs)}; do\n"
            f"  {seed_command(runs[0], f'RUN_ID=reproduce_seed${{SEED}}{fresh} SEED=$SEED', script)}\n"
            "done")


def seed_command(run: ScoredRun, seed_env: str, script: str) -> str:
    env = "".join(f" {key}={shlex.quote(str(value))}" for key, value in changed_settings(run).items())
    launcher = (f"torchrun --standalone --nproc_per_node={run.world_size}"
                if run.device.startswith("cuda") else "python3")
    return f"{seed_env}{env} {launcher} {script}"


def render_readme(summary: dict, runs: list[ScoredRun], folder: str) -> str:
    first, compliance = runs[0], summary["compliance"]
    yes_no = {True: "yes", False: "**no**"}
    std = summary["val_bpb_std"]
    passes = {pass_name(run) for run in runs}
    scored_by = f"{passes.pop()} val_bpb" if len(passes) == 1 else "val_bpb (each seed's final pass)"
    lines = [
        f"# {summary['name']}", "",
        *([f"**Not comparable with the records: scored on a validation split that is not the published FineWeb "
           f"split** ({first.val_tokens:,} tokens, sha256 {first.val_sha256}), so its val_bpb measures another text.",
           ""] if not summary["val_split"]["published"] else []),
        *([summary["blurb"], ""] if summary["blurb"] else []),
        f"Track `{summary['track']}`, by {summary['author']} (@{summary['github_id']}), {summary['date']}.", "",
        "## Result", "",
        f"- {scored_by} **{summary['val_bpb']:.8f}** (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}"
        + (f", sample std {std:.8f})" if std is not None else ")"),
        f"- val_loss {summary['val_loss']:.8f} nats per token",
        f"- artifact {summary['bytes_total']:,} bytes (largest seed; code {summary['bytes_code']:,} bytes, "
        f"format {summary['export_format']})",
        f"- artifact <= {ARTIFACT_CAP_BYTES:,} bytes: {yes_no[compliance['artifact_under_cap']]}; "
        f"training <= {TIME_CAP_MS // 1000} s: {training_compliance(compliance)}; "
        f"evaluation <= {TIME_CAP_MS // 1000} s: {yes_no[compliance['eval_time_under_cap']]}", "",
    ]
    if summary.get("warnings"):
        lines += [*(f"- **warning**: {warning}" for warning in summary["warnings"]), ""]
    if "comparison" in summary:
        lines += comparison_section(summary["comparison"])
    lines += [
        "## Seeds", "",
        f"| seed | steps | ms/step | pre-export val_bpb | {scored_by} | artifact bytes | log |",
        "|---:|---:|---:|---:|---:|---:|---|",
        *(f"| {s['seed']} | {s['steps']} | {fmt(s['step_avg_ms'], '.2f')} | {fmt(s['pre_export_val_bpb'], '.4f')} | "
          f"{s['val_bpb']:.8f}{'' if summary['score_pass'] != 'mixed' else f' ({pass_name(run)})'} | "
          f"{s['bytes_total']:,} | [{s['log']}]({s['log']}) |" for s, run in zip(summary["seeds"], runs)),
        "", "## Configuration", "",
        f"- device: {first.device}, world size {first.world_size}",
        f"- model parameters: {fmt(first.model_params, ',')}",
        f"- validation split: {first.val_tokens:,} tokens, fingerprint {first.val_sha256}",
        f"- tokenizer: {tokenizer_identity(runs)}",
        "- training data: " + ("not in the logs" if first.train_shards is None else
                               f"{first.train_shards} shard(s), data_id {fmt(first.data_id, 's')}"),
        "- settings that differ from the defaults in train_gpt.py (all settings are in the logs):", "",
        "| setting | value |", "|---|---|",
        *(f"| {key} | `{value}` |" for key, value in changed_settings(first).items()), "",
    ]
    if differing := differing_settings(runs):
        lines += [f"Settings that differ between the seeds (--allow-mixed-settings): {', '.join(differing)}; "
                  "each seed's command below sets its own.", ""]
    lines += ["## Reproduce", "",
              "From the repository root, with the data in place:", "",
              "```bash", reproduce_command(runs, f"{folder}/train_gpt.py"), "```", "",
              "`training_curves.png`: each seed's training loss and validation val_bpb against training time; "
              f"x: its final score ({scored_by}).", ""]
    return "\n".join(lines)


def code_section(runs: list[ScoredRun], code: bytes) -> str:
    """How the shipped train_gpt.py relates to the readable source: the kit's commit and one command."""
    if not code.startswith(train_gpt.PACKED_CODE[0]):
        return ""
    commit = next(filter(None, (kit_commit(run.source) for run in runs)), None)
    get = (f"git show {commit}:train_gpt.py > train_gpt_readable.py" if commit else
           f"sed -n '/^source train_gpt.py bytes:/,/end_of_source$/p' {runs[0].path.name}  # the source the run logged")
    return "\n".join([
        "## Code", "",
        f"`train_gpt.py` is packed ({len(code):,} bytes): the kit's trainer without docstrings (through `ast`), "
        "compressed with brotli into a latin-1 string behind an `exec`. It runs the same program; the artifact counts "
        "these bytes." + (f" It is the trainer of the kit's commit `{commit}`." if commit else ""), "",
        "The readable source:", "", "```bash", get, "```", ""])


def kit_commit(source: bytes) -> str | None:
    """The first commit of this repository whose train_gpt.py is `source`, if git knows one."""
    blob = hashlib.sha1(b"blob %d\0" % len(source) + source).hexdigest()
    root = Path(__file__).resolve().parents[1]
    try:
        found = subprocess.run(["git", "-C", str(root), "log", "--all", "--reverse", "--format=%H",
                                f"--find-object={blob}", "--", "train_gpt.py"], capture_output=True, text=True,
                               timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.split()[0] if found.returncode == 0 and found.stdout.split() else None


def tokenizer_identity(runs: list[ScoredRun]) -> str:
    """What the logs' `tokenizer:` lines say: a published tokenizer's name, or custom, with its sha256."""
    said = sorted({tokenizer_text(run) for run in runs if run.tokenizer is not None})
    return " / ".join(said) or "not named in the logs (a train_gpt.py older than its tokenizer line wrote them)"


def training_compliance(compliance: dict) -> str:
    if compliance["train_time_under_cap"]:
        return "yes"
    return "yes, within the official stop rule's overshoot" if compliance["train_time_within_stop_rule"] else "**no**"


def comparison_section(comparison: dict) -> list[str]:
    rule = comparison["rule"]
    ci = comparison["ci95_nats"]
    return [
        "## Significance", "",
        f"Compared against {comparison['baseline']}; "
        + (f"its val_bpb taken to nats per token with these logs' {comparison['tokens_per_byte']:.6f} tokens per byte."
           if rule["unit"] == "nats" else "tested in bits per byte."),
        "",
        f"- H0: improvement <= {rule['min_delta']} {rule['unit']}; "
        f"H1: improvement > {rule['min_delta']} {rule['unit']}; required: one-sided p < {rule['alpha']} "
        f"({rule['test']} t-test over the seeds)",
        f"- improvement: {comparison['improvement_nats']:.5f} nats per token, "
        f"{comparison['improvement_bpb']:.5f} bpb"
        + (f" (95% CI {ci[0]:.5f} to {ci[1]:.5f} nats)" if ci else ""),
        f"- p-value: {fmt(comparison['p_value'], '.3g')}",
        f"- **{comparison['verdict']}**", "",
    ]


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def seed_curves(runs: list[ScoredRun]) -> dict[str, list[ScoredRun]]:
    """One curve per seed, its legend naming its score and the pass it came from."""
    return {f"seed {run.seed} ({pass_name(run)} {run.val_bpb:.4f})": [run] for run in runs}


# ----------------------------------------------------------------------------------------------
# The folder: built aside, then renamed into place, so a refusal or a crash leaves nothing behind.


def folder_name(date: str, name: str) -> str:
    safe = re.sub(r"[^\w.-]+", "_", name).strip("_.")
    if not safe:
        raise Refusal(f"--name {name!r}: needs at least one letter or digit for the folder name")
    return f"{date}_{safe}"


def write_folder(folder: Path, runs: list[ScoredRun], summary: dict, force: bool, code: bytes | None = None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for run in runs:
            shutil.copyfile(run.path, staging / run.path.name)
        (staging / "train_gpt.py").write_bytes(runs[0].source if code is None else code)
        (staging / "submission.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        relative_folder = f"records/{folder.parent.name}/{folder.name}"
        readme = render_readme(summary, runs, relative_folder)
        readme += code_section(runs, runs[0].source if code is None else code)
        (staging / "README.md").write_text(readme, encoding="utf-8")
        save_training_figure(seed_curves(runs), staging / "training_curves.png")
        if force and folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def iso_date(text: str) -> str:
    return datetime.date.fromisoformat(text).isoformat()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", required=True, choices=TRACKS)
    parser.add_argument("--name", required=True)
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", default="")
    parser.add_argument("--date", type=iso_date, help="YYYY-MM-DD, default today (UTC)",
                        default=datetime.datetime.now(datetime.timezone.utc).date().isoformat())
    parser.add_argument("--compare-to", help="the record to beat: its val_bpb, its folder or its submission json")
    margin = parser.add_mutually_exclusive_group()
    margin.add_argument("--min-delta-nats", type=float, default=MIN_DELTA_NATS,
                        help=f"the margin to beat, in nats per token (the default rule: {MIN_DELTA_NATS})")
    margin.add_argument("--min-delta-bpb", type=float, help="the margin to beat, in bits per byte instead")
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--records-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.add_argument("--allow-mixed-settings", action="store_true",
                        help="accept seeds whose settings that change the model, or training data, differ (the "
                             "README then gives each seed's own command)")
    parser.add_argument("--pack-code", action=argparse.BooleanOptionalAction, default=None,
                        help="ship train_gpt.py packed (train_gpt.pack_code); default: the form the runs' "
                             "'Total submission size' counted (packed unless EXPORT_PACKED_CODE=0)")
    parser.add_argument("logs", nargs="+", type=Path)
    return parser.parse_args(argv)


def record_margin(args: argparse.Namespace) -> tuple[str, float]:
    """(unit, margin) of the record rule: nats per token unless --min-delta-bpb is given."""
    return ("bpb", args.min_delta_bpb) if args.min_delta_bpb is not None else ("nats", args.min_delta_nats)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = read_run_logs(args.logs)
        check_runs(runs, args.track, args.allow_mixed_settings)
        folder = args.records_dir / f"track_{args.track}" / folder_name(args.date, args.name)
        if folder.exists() and not args.force:
            raise Refusal(f"{folder} already exists; pass --force to replace it")
        code = shipped_code(runs, counted_packed(runs) if args.pack_code is None else args.pack_code)
        check_artifacts_fit(runs, code)
        comparison = None
        if args.compare_to:
            record = read_record(args.compare_to)
            check_split_matches_record(runs, record, args.compare_to)
            comparison = compare_with_baseline(runs, record, *record_margin(args), args.alpha)
        summary = submission_summary(args, runs, comparison, code)
        write_folder(folder, runs, summary, args.force, code)
    except Refusal as refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    print_summary(folder, summary)
    return 0


def print_summary(folder: Path, summary: dict) -> None:
    std = summary["val_bpb_std"]
    print(f"wrote {folder}")
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}")
    print(f"val_bpb {summary['val_bpb']:.8f}" + (f" +- {std:.8f} (sample std)" if std is not None else "")
          + f" over {len(summary['seeds'])} seed(s); artifact {summary['bytes_total']:,} bytes"
          + f" (train_gpt.py {summary['bytes_code']:,})")
    if "comparison" in summary:
        comparison = summary["comparison"]
        claim = "SIGNIFICANT IMPROVEMENT" if comparison["significant"] else "NOT A SIGNIFICANT IMPROVEMENT"
        print(f"compared against {comparison['baseline']}")
        print(f"{claim}: {comparison['verdict']}")


if __name__ == "__main__":
    sys.exit(main())
