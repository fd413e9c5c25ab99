"""Did an ablation help? Compare two groups of run logs, seed against seed.

    python3 records/compare_runs.py --a logs/base_*.txt --b logs/idea_*.txt

prints the improvement of B over A (mean of A - mean of B: positive when B has the lower loss)
in nats per token and in bits per byte, each with a 95% confidence interval and a two-sided
p-value from Welch's t-test (the statistics of make_submission.py). Prefix-scored runs
(MAX_VAL_TOKENS) are fine for ablations, as long as both groups scored the same tokens; when the
groups scored different splits (another tokenizer), nats per token are not comparable and only
bits per byte are reported.
"""
from __future__ import annotations

import argparse
import sys

from run_log import Refusal, ScoredRun, check_same_val_split, read_run_logs
from significance import Difference, mean_difference


def describe(unit: str, difference: Difference) -> str:
    ci = "n/a" if difference.ci95 is None else f"[{difference.ci95[0]:+.5f}, {difference.ci95[1]:+.5f}]"
    p = "n/a" if difference.p_two_sided is None else f"{difference.p_two_sided:.3g}"
    return f"{unit:<16} {difference.mean:+.5f}  95% CI {ci}  p (two-sided) = {p}  ({difference.test})"


def compare(a: list[ScoredRun], b: list[ScoredRun]) -> list[str]:
    """The report's lines; nats only when both groups scored the same validation tokens."""
    for group in (a, b):
        check_same_val_split(group)
    lines = [f"{name}: {len(runs)} log(s), mean val_bpb {sum(r.val_bpb for r in runs) / len(runs):.6f}, "
             f"val split {runs[0].val_split}" for name, runs in (("A", a), ("B", b))]
    lines.append("improvement of B over A (mean A - mean B; positive: B is better):")
    if a[0].val_split == b[0].val_split:
        lines.append(describe("nats per token", mean_difference([r.val_loss for r in a], [r.val_loss for r in b])))
    else:
        lines.append("nats per token   n/a: the groups scored different validation splits")
    lines.append(describe("bits per byte", mean_difference([r.val_bpb for r in a], [r.val_bpb for r in b])))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", required=True, help="logs of the baseline group")
    parser.add_argument("--b", nargs="+", required=True, help="logs of the changed group")
    args = parser.parse_args(argv)
    try:
        print("\n".join(compare(read_run_logs(args.a), read_run_logs(args.b))))
    except Refusal as refusal:
        print(f"refused: {refusal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
