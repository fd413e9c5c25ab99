"""Did an ablation help? Compare two groups of run logs, seed against seed, or logs against a record.

    python3 records/compare_runs.py --a logs/base_*.txt --b logs/idea_*.txt
    python3 records/compare_runs.py --a records/track_10min_16mb/<a record> --b logs/idea_*.txt
    python3 records/compare_runs.py --a logs/base_*.txt --b logs/idea_*.txt --plot base_vs_idea.png

prints the improvement of B over A (mean of A - mean of B: positive when B has the lower loss)
in nats per token and in bits per byte, each with a 95% confidence interval, the t statistic and
a two-sided p-value (the statistics of make_submission.py: Welch's t-test, or a one-sample test
when A is one number). With --min-delta-nats or --min-delta-bpb it also prints the one-sided
test of H0 improvement <= that margin. A is logs, or one record folder, submission json or val_bpb
(as make_submission.py's --compare-to). Logs of any layout run_log.py reads are accepted.
Prefix-scored runs (MAX_VAL_TOKENS) are fine for ablations, as long as both groups scored the
same tokens; nats per token are compared only when both groups are logs of one known validation
split (a record's val_bpb is taken to B's split with B's tokens per byte); else only bits per byte.
A run given twice (the same file, or a copy) is refused; within a group, the seeds must be distinct and
share their tokenizer and settings (as make_submission.py's seeds). --plot FILE draws both groups'
training curves (training loss and val_bpb against training time) into one PNG.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from run_log import (Record, Refusal, ScoredRun, check_same_settings, check_same_tokenizer, check_same_val_split,
                     check_seeds, nats_per_bpb, read_record, read_run_logs, training_time_check)
from significance import Difference, mean_difference


def describe(unit: str, difference: Difference) -> str:
    ci = "n/a" if difference.ci95 is None else f"[{difference.ci95[0]:+.5f}, {difference.ci95[1]:+.5f}]"
    if difference.p_two_sided is None:
        return f"{unit:<16} {difference.mean:+.5f}  95% CI {ci}  ({difference.test})"
    return (f"{unit:<16} {difference.mean:+.5f}  95% CI {ci}  t = {difference.t:.2f}, df = {difference.df:.2f}, "
            f"p (two-sided) = {difference.p_two_sided:.3g}  ({difference.test})")


def describe_margin_test(difference: Difference, unit: str) -> str:
    if difference.p_beats_margin is None:
        return f"one-sided, H0 improvement <= {difference.margin} {unit}: n/a ({difference.test})"
    return (f"one-sided, H0 improvement <= {difference.margin} {unit}: t = {difference.t_beats_margin:.2f}, "
            f"df = {difference.df:.2f}, p = {difference.p_beats_margin:.3g}")


def describe_logs(name: str, runs: list[ScoredRun]) -> str:
    seeds = ", ".join("unknown" if r.seed is None else str(r.seed) for r in runs)
    score_lines = ", ".join(sorted({r.score_line for r in runs}))
    return (f"{name}: {len(runs)} log(s), seeds {seeds}, mean val_bpb {sum(r.val_bpb for r in runs) / len(runs):.8f}, "
            f"score line {score_lines}, val split {group_split(runs)}")


def group_split(runs: list[ScoredRun]) -> str:
    return runs[0].val_split if len({r.val_split for r in runs}) == 1 else "unknown"


def nats_baseline(a: list[ScoredRun] | Record, b: list[ScoredRun]) -> tuple[float | list[float] | None, str]:
    """A's scores in nats per token of B's validation split, or None and why there are none."""
    factor = nats_per_bpb(b)
    if factor is None:
        return None, "B's score lines do not all give val_loss"
    if isinstance(a, Record):  # a published val_bpb, taken to B's split with B's tokens per byte
        return ([x * factor for x in a.baseline] if isinstance(a.baseline, list) else a.baseline * factor), ""
    splits = (group_split(a), group_split(b))
    if "unknown" in splits:
        return None, "a group's validation split is unknown"
    if splits[0] != splits[1]:
        return None, "the groups scored different validation splits"
    if any(r.val_loss is None for r in a):
        return None, "A's score lines do not all give val_loss"
    return [r.val_loss for r in a], ""


def compare(a: list[ScoredRun] | Record, b: list[ScoredRun], margin: tuple[str, float] | None = None,
            allow_mixed_settings: bool = False) -> list[str]:
    """The report's lines; `margin` (unit, min_delta) adds the one-sided test of the record rule. The seeds of a
    group must be distinct seeds of one tokenizer and validation split, and share their settings (but those without
    effect on the model) unless `allow_mixed_settings`."""
    groups = [b] if isinstance(a, Record) else [a, b]
    for group in groups:
        check_same_val_split(group)
        check_same_tokenizer(group)
        check_same_settings(group, allow_mixed_settings)
        check_seeds(group)
    lines = [f"A: record {a.describe()}" if isinstance(a, Record) else describe_logs("A", a), describe_logs("B", b)]
    lines += [f"warning: {run.path}: {note}" for group in groups for run in group if (note := training_time_check(run)[1])]
    unit, min_delta = margin or ("bpb", 0.0)
    a_nats, why_no_nats = nats_baseline(a, b)
    if margin and unit == "nats" and a_nats is None:
        raise Refusal(f"--min-delta-nats needs nats per token ({why_no_nats}); use --min-delta-bpb")
    lines.append("improvement of B over A (mean A - mean B; positive: B is better):")
    if a_nats is None:
        lines.append(f"nats per token   n/a: {why_no_nats}")
    else:
        nats = mean_difference(a_nats, [r.val_loss for r in b], margin=min_delta if unit == "nats" else 0.0)
        lines.append(describe("nats per token", nats))
    a_bpb = a.baseline if isinstance(a, Record) else [r.val_bpb for r in a]
    bpb = mean_difference(a_bpb, [r.val_bpb for r in b], margin=min_delta if unit == "bpb" else 0.0)
    lines.append(describe("bits per byte", bpb))
    if margin:
        lines.append(describe_margin_test(nats if unit == "nats" else bpb, unit))
    return lines


def plot_groups(a: list[ScoredRun] | Record, b: list[ScoredRun], path: Path) -> None:
    """A's and B's training curves in one figure (a record: its mean val_bpb as a line)."""
    from training_curves import save_training_figure
    try:
        if isinstance(a, Record):
            save_training_figure({"B": b}, path, baseline=(f"A: {a.name} {a.val_bpb:.4f}", a.val_bpb))
        else:
            save_training_figure({"A": a, "B": b}, path)
    except OSError as e:
        raise Refusal(f"--plot {path}: cannot write it ({e.strerror}); give a file in a folder you can write") from None
    print(f"plotted the training curves into {path}")


def is_record(value: str) -> bool:
    """--a names a record (a val_bpb, a folder, a submission json) rather than a log."""
    if Path(value).is_dir() or value.endswith(".json"):
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", required=True,
                        help="logs of the baseline group, or one record folder, submission json or val_bpb")
    parser.add_argument("--b", nargs="+", required=True, help="logs of the changed group")
    parser.add_argument("--score-line", help="the name of the score's line (default: the last *_exact line)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="one per log (--a's, then --b's), for logs whose lines and file name name no seed")
    parser.add_argument("--allow-mixed-settings", action="store_true",
                        help="accept a group whose seeds' settings that change the model, or training data, "
                             "differ")
    margin = parser.add_mutually_exclusive_group()
    margin.add_argument("--min-delta-nats", type=float, help="also test H0 improvement <= this many nats per token")
    margin.add_argument("--min-delta-bpb", type=float, help="also test H0 improvement <= this many bits per byte")
    parser.add_argument("--plot", type=Path, help="also draw both groups' training curves into this PNG file")
    args = parser.parse_args(argv)
    margin = (("nats", args.min_delta_nats) if args.min_delta_nats is not None
              else ("bpb", args.min_delta_bpb) if args.min_delta_bpb is not None else None)
    a_is_record = len(args.a) == 1 and is_record(args.a[0])
    try:
        runs = read_run_logs((args.b if a_is_record else args.a + args.b), args.score_line, args.seeds)
        a = read_record(args.a[0]) if a_is_record else runs[:len(args.a)]
        b = runs[-len(args.b):]
        print("\n".join(compare(a, b, margin, args.allow_mixed_settings)))
        if args.plot:
            plot_groups(a, b, args.plot)
    except Refusal as refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
