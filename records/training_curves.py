"""The training curves of runs, as one figure: the training loss and every validation val_bpb against training time,
and each run's final score (the pass it came from named in the legend). make_submission.py draws one curve per seed;
compare_runs.py --plot draws two groups of runs, one colour each.
"""
from __future__ import annotations

from pathlib import Path

from run_log import PASS_NAMES, ScoredRun


def pass_name(run: ScoredRun) -> str:
    return PASS_NAMES.get(run.score_pass, run.score_pass)


def training_figure(groups: dict[str, list[ScoredRun]], baseline: tuple[str, float] | None = None):
    """A matplotlib figure: left the training loss, right val_bpb, against training time; one colour per group,
    an x at each run's final score (plotted at the end of its training). `baseline` (label, val_bpb) adds a line."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, (label, runs) in enumerate(groups.items()):
        color = f"C{index % 10}"
        for i, run in enumerate(runs):
            legend = label if i == 0 else None
            train_ax.plot([ms / 1000 for _, ms, _ in run.train_curve], [loss for *_, loss in run.train_curve],
                          color=color, linewidth=1, label=legend)
            val_ax.plot([p.train_time_ms / 1000 for p in run.val_curve], [p.val_bpb for p in run.val_curve],
                        color=color, marker=".", label=legend)
            if run.train_time_ms is not None:
                val_ax.plot([run.train_time_ms / 1000], [run.val_bpb], color=color, marker="x", markersize=9,
                            linestyle="none")
    if baseline is not None:
        val_ax.axhline(baseline[1], color="gray", linestyle="--", label=baseline[0])
    passes = sorted({pass_name(run) for runs in groups.values() for run in runs})
    train_ax.set(xlabel="training time (s)", ylabel="train_loss (nats per token)", title="training loss")
    val_ax.set(xlabel="training time (s)", ylabel="val_bpb",
               title=f"validation bits per byte (x: the final score, {' / '.join(passes)} pass)")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save_training_figure(groups: dict[str, list[ScoredRun]], path: Path,
                         baseline: tuple[str, float] | None = None) -> None:
    fig = training_figure(groups, baseline)
    import matplotlib.pyplot as plt  # after training_figure chose the backend
    fig.savefig(path, dpi=120)
    plt.close(fig)
