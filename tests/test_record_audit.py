"""records/audit.py: the figures behind each rule, read from a record folder's own files and logs.

On the published record folders in ../shared/reference (their logs, code and submission.json) and on folders
written here. Every expected figure is read by hand from the log text (or is the size of a file), never computed by
the code under test.
"""
from __future__ import annotations

import base64
import lzma
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats

from test_records import RECORDS, render_log  # noqa: F401  (puts records/ on sys.path)

import audit  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
R0810 = REFERENCE / "record_2026-04-09_sp8192_1.0810"
R0734 = REFERENCE / "record_2026-04-10_sp8192_1.0734"
R0714 = REFERENCE / "record_2026-04-16_sp8192_1.0714"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="needs ../shared/reference")
SOURCE = 'print("a published trainer")\n'


def run_audit(capsys, *args) -> str:
    assert audit.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def section(output: str, log_name: str) -> str:
    """The lines the audit prints for one log."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {log_name} "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    return "\n".join(lines[start:end])


def official_log(source: str | None = SOURCE, *, seed: int = 1, train_time_ms: int = 587_000,
                 model_bytes: int = 15_900_000, counted_code: int = 30_000, val_bpb: float = 1.08,
                 val_loss: float = 2.79, ttt_ms: int = 400_000) -> str:
    """A log as a published script writes it: its source (with its log call's newline), a line of `=`, the
    environment, another line of `=`, then the run."""
    head = "" if source is None else source + "\n" + "=" * 100 + "\nRunning Python 3.12.3\n" + "=" * 100 + "\n"
    return head + "\n".join([
        f"seed:{seed}",
        f"stopping_early: wallclock_cap train_time: {train_time_ms}ms step: 4800/20000",
        "GPTQ:collecting Hessians from calibration data...",
        "GPTQ:collected 67 Hessians in 12.5s",
        f"Serialized model quantized+brotli: {model_bytes} bytes",
        f"Total submission size quantized+brotli: {model_bytes + counted_code} bytes",
        "quantized val_loss:2.84000000 val_bpb:1.10000000 eval_time:9000ms",
        f"quantized_ttt val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{ttt_ms}ms",
    ]) + "\n"


def folder(tmp_path: Path, name: str = "record", code: str | None = SOURCE, **logs: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    if code is not None:
        (path / "train_gpt.py").write_text(code, encoding="utf-8")
    for log_name, text in logs.items():
        (path / f"{log_name}.log").write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# The published folders.


@needs_reference
def test_the_artifact_as_shipped_is_the_logged_model_plus_the_folders_code_file(capsys):
    out = section(run_audit(capsys, R0714), "train_seed0.log")
    # `Serialized model quantized+brotli: 15906856 bytes`, `Total submission size ...: 15934411 bytes`
    shipped = 15_906_856 + (R0714 / "train_gpt.py").stat().st_size
    assert f"model 15,906,856 + train_gpt.py 122,501 = {shipped:,} bytes (over 16,000,000)" in out
    assert "the log counted 27,555 for the code (total 15,934,411)" in out  # `Code size (compressed): 27555 bytes`


@needs_reference
def test_training_plus_gptq_adds_the_logged_hessian_time_and_says_rounding_is_not_logged(capsys):
    out = section(run_audit(capsys, R0810, "--code", "train_gpt_as_submitted.py"), "train_seed42.log")
    # `stopping_early: ... train_time: 588047ms`, `GPTQ:collected 67 Hessians in 12.7s`
    assert f"+ GPTQ Hessians 12,700 ms = {588_047 + 12_700:,} ms (over 600,000) (rounding not logged)" in out


@needs_reference
def test_every_evaluation_pass_is_listed_with_their_sum(capsys):
    out = section(run_audit(capsys, R0810, "--code", "train_gpt_as_submitted.py"), "train_seed42.log")
    passes = {"pre-quantization post-ema": (7_440, "1.08734790"), "quantized": (25_515, "1.09970431"),
              "quantized_sliding_window": (120_961, "1.08286335"), "quantized_ttt": (366_525, "1.08079352")}
    listed = ", ".join(f"{name} {ms:,} ms ({bpb})" for name, (ms, bpb) in passes.items())
    assert f"{listed}; all passes {sum(ms for ms, _ in passes.values()):,} ms (within 600,000)" in out


@needs_reference
def test_a_compile_warmup_beside_the_timer_is_reported_with_what_the_log_says_of_its_data(capsys):
    assert "TTT compile warm-up 122.0 s (its data not stated)" in section(run_audit(capsys, R0734), "logs/train0.txt")
    assert "TTT compile warm-up 96.4 s (random tokens, no val data)" in section(run_audit(capsys, R0714),
                                                                               "train_seed0.log")


@needs_reference
def test_the_source_each_log_embeds_is_compared_with_the_committed_file(capsys):
    out = run_audit(capsys, R0734)  # seed 2 ran the committed file; seeds 0 and 1 a slightly different one
    assert "source     same as train_gpt.py" in section(out, "logs/train2.txt")
    assert "source     differs" in section(out, "logs/train0.txt")
    assert "source     not logged" in section(run_audit(capsys, R0714), "train_seed0.log")


@needs_reference
def test_the_seeds_mean_and_sample_std_are_the_logs(capsys):
    val_bpbs = [1.07139175, 1.07057187, 1.07220821]  # the logs' last lines, seeds 0, 1337, 42
    out = run_audit(capsys, R0714)
    assert (f"3 logs (seeds 0, 1337, 42): val_bpb mean {statistics.mean(val_bpbs):.8f}, "
            f"std {statistics.stdev(val_bpbs):.8f}") in out


@needs_reference
def test_the_claim_is_the_one_sided_welch_test_in_nats_against_the_records_seeds(capsys):
    out = run_audit(capsys, R0734, "--compare-to", R0810)
    scores = [(2.77059090, 1.07258208), (2.77230836, 1.07324696), (2.77493185, 1.07426259)]  # 1.0734's logs
    baseline_bpb = [1.08079, 1.08103, 1.08118]  # 1.0810's submission.json seed_results
    nats_per_bit = math.log(2) / statistics.mean(bpb * math.log(2) / loss for loss, bpb in scores)
    baseline = [bpb * nats_per_bit for bpb in baseline_bpb]
    losses = [loss for loss, _ in scores]
    expected = stats.ttest_ind([b - 0.005 for b in baseline], losses, equal_var=False, alternative="greater")
    improvement = statistics.mean(baseline) - statistics.mean(losses)
    assert (f"improvement {improvement:.5f} nats per token (welch); H0 improvement <= 0.005: "
            f"t = {expected.statistic:.2f}, df = {expected.df:.2f}, p = {expected.pvalue:.3g}") in out


@needs_reference
def test_a_folder_with_two_candidate_code_files_asks_for_one(capsys):
    out = run_audit(capsys, R0810)  # train_gpt_as_submitted.py and train_gpt_decompressed.py, no train_gpt.py
    assert "no code file (train_gpt.py; candidates: train_gpt_as_submitted.py, train_gpt_decompressed.py)" in out
    assert "model 15,975,300 + no code file; the log's total 15,991,930" in section(out, "train_seed42.log")


# ----------------------------------------------------------------------------------------------
# Folders written here.


def test_a_log_whose_embedded_source_differs_from_the_folders_code_is_reported(tmp_path, capsys):
    record = folder(tmp_path, code='print("the committed trainer")\n', seed1=official_log('print("another")\n'))
    committed, logged = len('print("the committed trainer")\n'), len('print("another")\n')
    assert f"differs: {logged} bytes logged vs {committed}; 2 lines differ" in run_audit(capsys, record)


def test_a_log_that_embeds_the_folders_code_is_the_same(tmp_path, capsys):
    assert "source     same as train_gpt.py" in run_audit(capsys, folder(tmp_path, seed1=official_log()))


def test_a_folder_with_no_logs_is_reported_not_refused(tmp_path, capsys):
    out = run_audit(capsys, folder(tmp_path))
    assert "seeds        no log with a score" in out


def test_training_over_600_s_is_shown_with_its_figures(tmp_path, capsys):
    out = run_audit(capsys, folder(tmp_path, seed1=official_log(train_time_ms=612_345)))
    # train_time 612,345 ms, 12,345 ms past the stop at step 4800 (a step of 612,345 / 4800 ms, two of them 255 ms)
    assert "train_time 612,345 ms (over 600,000), 12,345 ms after the wallclock stop (two steps: 255 ms)" in out
    assert f"+ GPTQ Hessians 12,500 ms = {612_345 + 12_500:,} ms (over 600,000)" in out


def test_an_evaluation_over_600_s_in_all_passes_is_shown(tmp_path, capsys):
    out = run_audit(capsys, folder(tmp_path, seed1=official_log(ttt_ms=595_000)))
    assert ("quantized 9,000 ms (1.10000000), quantized_ttt 595,000 ms (1.08000000); "
            f"all passes {9_000 + 595_000:,} ms (over 600,000)") in out


def test_a_log_without_a_score_is_listed_as_not_read_with_the_reason(tmp_path, capsys):
    text = "stopping_early: wallclock_cap train_time: 587000ms step: 4800/20000\nval_bpb:enabled\n"
    out = run_audit(capsys, folder(tmp_path, seed1=official_log(), seed2=text))
    assert "not read     seed2.log: no final exact score line" in out
    assert "seeds        1 log (seeds 1)" in out


def test_a_byte_identical_copy_of_a_log_counts_once(tmp_path, capsys):
    out = run_audit(capsys, folder(tmp_path, train=official_log(seed=1), train_seed1=official_log(seed=1)))
    assert "copy         train_seed1.log is train.log" in out
    assert "1 log (seeds 1)" in out


def test_repeated_seeds_are_not_tested_against_the_claim(tmp_path, capsys):
    record = folder(tmp_path, a=official_log(seed=7, val_bpb=1.07), b=official_log(seed=7, val_bpb=1.071))
    assert "not tested: seeds repeat (7)" in run_audit(capsys, record, "--compare-to", "1.09")


def test_other_code_files_the_code_imports_are_added_beside(tmp_path, capsys):
    code = "import helper\n"
    record = folder(tmp_path, code=code, seed1=official_log(code))
    helper, kernel = "open('kernel.cpp')\n", "int main() {}\n"  # the code uses helper.py, and through it kernel.cpp
    (record / "helper.py").write_text(helper)
    (record / "kernel.cpp").write_text(kernel)
    (record / "prepare_data.py").write_text("pass\n")  # not used by the code
    out = run_audit(capsys, record)
    assert (f"helper.py {len(helper)} (used by the code), kernel.cpp {len(kernel)} (used by the code), "
            "prepare_data.py 5") in out
    assert f"with the other code files it uses: {15_900_000 + len(code) + len(helper) + len(kernel):,}" in out


def test_a_packed_code_file_is_read_inside_for_the_files_it_imports(tmp_path, capsys):
    packed = base64.b85encode(lzma.compress(("import helper\n" + "x = 1\n" * 400).encode())).decode()
    code = f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{packed}")))\n'
    record = folder(tmp_path, code=code, seed1=official_log(None))
    (record / "helper.py").write_text("pass\n")
    assert "helper.py 5 (used by the code)" in run_audit(capsys, record)


def test_a_kit_log_is_audited_with_its_own_gptq_line(tmp_path, capsys):
    text = render_log(1, export_lines=("gptq: 9000ms (calibration and rounding) train_time+gptq:608990ms",))
    out = run_audit(capsys, folder(tmp_path, code='"""A stand-in trainer."""\nprint("train")\n', seed1=text))
    assert "+ GPTQ 9,000 ms = 608,990 ms (over 600,000)" in out  # train_time 599,990 ms + 9,000 ms
    assert "source     same as train_gpt.py" in out


def test_the_table_has_one_row_per_folder_with_the_largest_figures(tmp_path, capsys):
    one = folder(tmp_path, "one", seed1=official_log(seed=1, model_bytes=15_900_000),
                 seed2=official_log(seed=2, model_bytes=15_950_000))
    two = folder(tmp_path, "two", code=None)
    rows = run_audit(capsys, "--table", one, two).splitlines()[2:]
    assert len(rows) == 2
    assert f"15,950,000 + {len(SOURCE)} = **{15_950_000 + len(SOURCE):,}** (30,000)" in rows[0]
    assert rows[1].startswith("| two | 0 |")


def test_a_claims_file_names_each_records_baseline(tmp_path, capsys):
    old = folder(tmp_path, "old", **{f"s{seed}": official_log(seed=seed, val_bpb=bpb, val_loss=bpb * 2.6)
                                      for seed, bpb in ((1, 1.20), (2, 1.21), (3, 1.19))})
    new = folder(tmp_path, "new", **{f"s{seed}": official_log(seed=seed, val_bpb=bpb, val_loss=bpb * 2.6)
                                      for seed, bpb in ((1, 1.10), (2, 1.11), (3, 1.09))})
    (old / "submission.json").write_text('{"name": "old", "val_bpb": 1.20}')  # its seeds: its logs
    claims = tmp_path / "claims.txt"
    claims.write_text("# record -> the record it claims to beat\nnew -> old  # as its README says\n")
    out = run_audit(capsys, "--claims", claims, old, new)
    assert out.count("claim        vs 'old'") == 1  # new claims to beat old; old claims nothing
    expected = stats.ttest_ind([x * 2.6 - 0.005 for x in (1.20, 1.21, 1.19)], [x * 2.6 for x in (1.10, 1.11, 1.09)],
                               equal_var=False, alternative="greater")
    assert f"p = {expected.pvalue:.3g}" in out


def test_a_path_that_is_not_a_folder_is_one_error_line(tmp_path, capsys):
    assert audit.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_claimed_record_that_cannot_be_read_is_said_in_its_row_and_the_others_are_audited(tmp_path, capsys):
    new = folder(tmp_path, "new", seed1=official_log())
    claims = tmp_path / "claims.txt"
    claims.write_text("new -> gone\n")
    out = run_audit(capsys, "--claims", claims, "--table", new)
    assert "| the record to beat is not readable: --compare-to gone: neither a val_bpb number" in out


def test_a_record_to_compare_with_that_cannot_be_read_is_one_error_line(tmp_path, capsys):
    assert audit.main([str(folder(tmp_path, seed1=official_log())), "--compare-to", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --compare-to nonsense: ") and err.count("\n") == 1
