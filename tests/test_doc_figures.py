"""Figures the docs quote, checked: each against what produces it, read at test time (the code's settings and
constants, the models' parameter counts, the packed trainer, the tools' defaults, the record's own logs), so that
a figure that goes stale fails. A figure measured on a machine is not checked here: its text carries the command
that measures it, the machine and the date (MEASURED lists the passages and checks that they do), and a figure
only a GPU can give says "estimated" and how.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "records"))

import flops  # noqa: E402
import gpu_check  # noqa: E402
import make_submission  # noqa: E402
import throughput  # noqa: E402

README, DATA_README, RECORDS_README, BENCH_README = "README.md", "data/README.md", "records/README.md", "bench/README.md"
SPEC = REPO.parent / "shared" / "SPEC.md"


def doc(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def number(text: str) -> float:
    return float(text.replace(",", ""))


def found(pattern: str, text: str, what: str, flags: int = 0) -> re.Match:
    match = re.search(pattern, text, flags)
    assert match, f"the docs no longer state {what} as this test reads it ({pattern!r}): update the test"
    return match


def section(text: str, heading: str) -> str:
    """From the heading's line to the next heading of its level or above."""
    start = found(rf"^(#+) {re.escape(heading)}\s*$", text, f"the section {heading!r}", re.M)
    level = len(start.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start.end())
    return text[start.start():end.start() if end else len(text)]


def paragraph_of(text: str, anchor: str) -> str:
    """The paragraph (between blank lines) that holds `anchor`, which may be wrapped over lines."""
    match = re.search(r"\s+".join(map(re.escape, anchor.split())), text)
    assert match, f"the docs no longer hold {anchor!r}: update MEASURED"
    at = match.start()
    start, end = text.rfind("\n\n", 0, at), text.find("\n\n", at)
    return text[start + 2 if start >= 0 else 0:end if end >= 0 else len(text)]


def parameters(settings: train_gpt.Settings) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return sum(p.numel() for p in train_gpt.GPT(settings).parameters())


# ----------------------------------------------------------------------------------------------
# The settings table.

def settings_rows() -> dict[str, tuple[str, str]]:
    """{VARIABLE: (default cell, PRESET=baseline cell)}, a row of several variables split into one per variable."""
    table = found(r"^\| variable \| default \| `PRESET=baseline` \| meaning \|\n\|[-| ]+\|\n((?:\|.*\|\n)+)",
                  doc(README), "the settings table", re.M).group(1)
    rows = {}
    for line in table.splitlines():
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))  # `\|` is a bar inside a cell
        names_cell, default_cell, baseline_cell = [c.strip() for c in cells[:3]]
        names = re.findall(r"`([A-Z0-9_]+)`", names_cell)
        defaults, baselines = split_cell(default_cell, len(names)), split_cell(baseline_cell, len(names))
        rows.update({name: (d, b) for name, d, b in zip(names, defaults, baselines)})
    return rows


def split_cell(cell: str, count: int) -> list[str]:
    """A cell's value per variable: backticks and a trailing '(...)' gloss dropped, split at ' / ' or ', '."""
    value = re.sub(r"\s*\([^()]*\)$", "", cell.replace("`", "")).strip()
    parts = re.split(r" / |, ", value) if count > 1 and value else [value] * count
    assert len(parts) == count, f"{cell!r}: {count} values expected"
    return parts


WORDS = {"empty": "", "a fresh uuid": ""}  # how the table writes an empty default


def as_setting(text: str, field: dataclasses.Field, settings: train_gpt.Settings):
    text = WORDS.get(text, text).replace("<VOCAB_SIZE>", str(settings.vocab_size))
    return text if field.type in ("str", str) else float(text)


def setting_value(settings: train_gpt.Settings, field: dataclasses.Field):
    value = getattr(settings, field.name)
    if field.name == "run_id" or isinstance(value, str):
        return value
    return float(value)


def test_settings_table_has_one_row_for_every_setting():
    names = {f.name.upper() for f in dataclasses.fields(train_gpt.Settings)}
    rows = settings_rows()
    assert sorted(names - set(rows)) == [] and sorted(set(rows) - names) == []


def test_settings_table_defaults_are_the_settings_defaults():
    default = train_gpt.Settings()
    wrong = {f.name.upper(): (settings_rows()[f.name.upper()][0], setting_value(default, f))
             for f in dataclasses.fields(train_gpt.Settings)
             if as_setting(settings_rows()[f.name.upper()][0], f, default) != setting_value(default, f)}
    assert not wrong, f"README's settings table (default column) against train_gpt.Settings(): {wrong}"


def test_settings_table_baseline_column_is_the_baseline_preset():
    baseline = train_gpt.Settings.for_preset("baseline")
    wrong = {}
    for f in dataclasses.fields(train_gpt.Settings):
        default_cell, cell = settings_rows()[f.name.upper()]
        expected = setting_value(baseline, f)
        quoted = as_setting(cell or default_cell, f, baseline)  # blank: the default column's value
        if f.name != "preset" and quoted != expected:
            wrong[f.name.upper()] = (cell or "(blank: the default)", expected)
    assert not wrong, f"README's settings table (PRESET=baseline column) against PRESETS['baseline']: {wrong}"


# ----------------------------------------------------------------------------------------------
# Sizes and counts the code gives.

def test_packed_and_plain_sizes_of_train_gpt_py_are_as_quoted():
    """Quoted as "about N" to within 1%: the check allows 2%, so that a small edit of the trainer does not make the
    README wrong, and a larger one does."""
    plain = (REPO / "train_gpt.py").read_bytes()
    packed = len(train_gpt.pack_code(plain)[1])
    text = " ".join(doc(README).split())
    quoted_packed = [number(n) for n in re.findall(r"packed `train_gpt\.py`[^.;]*?\babout \**([\d,]+)", text)]
    quoted_plain = [number(n) for n in re.findall(r"(?:plain|readable) file about ([\d,]+)", text)]
    assert quoted_packed and quoted_plain, "README no longer quotes the packed and plain sizes as this test reads them"
    assert all(abs(q - packed) <= 0.02 * packed for q in quoted_packed), (quoted_packed, packed)
    assert all(abs(q - len(plain)) <= 0.02 * len(plain) for q in quoted_plain), (quoted_plain, len(plain))


def test_parameter_counts_are_those_of_the_kits_models():
    models = {"the default": train_gpt.Settings(), "PRESET=baseline": train_gpt.Settings.for_preset("baseline"),
              "PRESET=smoke": train_gpt.Settings.for_preset("smoke"),
              "PRESET=1.0810": train_gpt.Settings.for_preset("1.0810")}
    counts = {parameters(s): name for name, s in models.items()}
    for name in (README, BENCH_README):
        quoted = {number(n) for n in re.findall(r"\b(\d{1,3}(?:,\d{3})+)(?:-| )parameter", doc(name))}
        quoted |= {number(n) for n in re.findall(r"all parameters of the model \(([\d,]+) for the baseline\)", doc(name))}
        assert quoted and quoted <= set(counts), f"{name}: {sorted(quoted - set(counts))} not in {counts}"
    assert parameters(models["the default"]) == number(found(r"; ([\d,]+) parameters\.", doc(README),
                                                             "the default's parameter count").group(1))
    one_gpu_copy = found(r"4 bytes a parameter: (\d+) MB for the 1\.0714 model", doc(README), "the fp32 copy")
    assert round(4 * parameters(models["the default"]) / 1e6) == int(one_gpu_copy.group(1))


def test_the_packed_code_test_figure_is_its_constant():
    from test_pack_code import RECORD_LARGEST_MODEL_BYTES
    assert f"fits beside the 1.0714 record's largest model, {RECORD_LARGEST_MODEL_BYTES:,} bytes" in \
        " ".join(doc(README).split())


def test_derived_figures_of_the_default_are_its_settings():
    s, readme = train_gpt.Settings(), " ".join(doc(README).split())
    sequences = s.train_batch_tokens // 8 // s.train_seq_len  # one of the record's 8 GPUs' micro-batch
    tokens = s.gptq_calibration_batches * sequences * s.train_seq_len
    assert (f"{s.gptq_calibration_batches} x {sequences} sequences of {s.train_seq_len}, {tokens / 1e6:.1f}M tokens"
            in readme)
    megabytes = parameters(s) / 1e6  # int6 and int8 codes before compression: a byte each
    compression = found(r"brotli-11 of the default's ~(\d+) MB: about (\d+) s, estimated", readme, "compression")
    assert abs(int(compression.group(1)) - megabytes) < 1
    assert abs(int(compression.group(2)) - megabytes / train_gpt.COMPRESS_MB_PER_S["brotli"]) <= 5


def test_the_audits_claims_count_is_the_claims_file():
    claims = [line for line in (REPO / "records" / "published_claims.txt").read_text().splitlines()
              if "->" in line.split("#")[0]]
    assert f"names, for {len(claims)} of the" in " ".join(doc(RECORDS_README).split())


def test_the_defaults_depth_and_skips_are_its_models():
    s = train_gpt.Settings()
    with torch.device("meta"):
        model = train_gpt.GPT(s)
    readme = " ".join(doc(README).split())
    times, passes = found(r"run (\w+) times in a row \((\d+) block passes\)", readme, "the recurrence").groups()
    assert (times, int(passes)) == ({2: "two", 3: "three", 4: "four"}[1 + s.num_loops],
                                    flops.block_passes(s, recurrence=True))
    assert f"the U-Net skips are {model.skip_weights.shape[0]} sigmoid-gated ones" in readme and s.skip_gates


def test_smoke_preset_is_as_described():
    smoke = train_gpt.PRESETS["smoke"]
    readme = found(r"\(`PRESET=smoke`: (\d+) blocks of width (\d+), the second one\s+recurring, (\d+) steps of "
                   r"([\d,]+) tokens\)", doc(README), "the smoke preset").groups()
    assert list(map(number, readme)) == [smoke["num_layers"], smoke["model_dim"], smoke["iterations"],
                                         smoke["train_batch_tokens"]]
    assert smoke["recur_layers"] == "1"  # the second of two blocks
    data = found(r"\((\d+)\s+layers of width (\d+), sequence (\d+), ([\d,]+) tokens per step, (\d+) steps",
                 doc(DATA_README), "the smoke preset").groups()
    assert list(map(number, data)) == [smoke["num_layers"], smoke["model_dim"], smoke["train_seq_len"],
                                       smoke["train_batch_tokens"], smoke["iterations"]]
    from build_smoke_dataset import MAX_VAL_DOCS
    assert f"at most {MAX_VAL_DOCS}, for validation" in " ".join(doc(DATA_README).split())
    assert smoke["vocab_size"] == 512 and "a 512-token tokenizer" in " ".join(doc(README).split())


def test_flop_counts_and_mfu_are_bench_flops():
    baseline = train_gpt.Settings.for_preset("baseline")
    n_matmul, total = flops.matmul_params(baseline), flops.flops_per_token(baseline)
    attention = flops.attention_flops_per_token(baseline)
    per_gpu = gpu_check.REFERENCE_TOKENS_PER_S_PER_GPU
    tflops = total * per_gpu / 1e12
    peak = flops.peak_tflops("cuda", "NVIDIA H100 80GB HBM3")[0]
    bench = " ".join(doc(BENCH_README).split())
    shape = f"{baseline.num_layers} x {baseline.train_seq_len} x {baseline.model_dim}"
    assert f"= {n_matmul:,}; attention 6 x {shape} = {attention:,}; total {total:,} FLOPs per token" in bench
    assert f"`matmul_params` | N_matmul of the formula below ({n_matmul:,} for the baseline)" in bench
    assert f"({total:,} for the baseline)" in bench
    assert (f"{8 * per_gpu / 1e6:.2f}M tokens/s in all, {per_gpu / 1e6:.3f}M and {tflops:.1f} TFLOP/s per GPU: "
            f"**MFU {tflops / peak:.3f}** of the H100 SXM's {peak}") in bench
    assert f"8 x {gpu_check.REFERENCE_MS_PER_STEP} = {8 * gpu_check.REFERENCE_MS_PER_STEP:.2f} ms" in bench
    table = found(r"Peak table \(dense bf16.*?\): (.*?)\. Other", bench, "the peak table").group(1)
    assert dict(re.findall(r"(\w[\w ]*?) ([\d.]+)(?:,| TFLOP/s| and|$)", table.replace(" TFLOP/s", ""))) == \
        {name: f"{value:g}" for name, _, value in flops.PEAK_BF16_DENSE_TFLOPS}
    readme = " ".join(doc(README).split())
    assert (f"For the baseline that is {total:,} FLOPs per token, so the reference {gpu_check.REFERENCE_MS_PER_STEP} "
            f"ms/step on 8xH100 ({8 * per_gpu / 1e6:.1f}M tokens/s) is {tflops:.1f} TFLOP/s per GPU: an MFU of "
            f"{tflops / peak:.3f}") in readme


def test_newton_schulz_share_of_the_baselines_flops_is_as_quoted():
    """Muon's quintic iteration on an m x n matrix (m <= n) multiplies three times: A = X X^T (m^2 n multiply-adds),
    A A (m^3) and (b A + c A A) X (m^2 n); at 2 FLOPs a multiply-add, 4 m^2 n + 2 m^3 FLOPs an iteration."""
    baseline = train_gpt.Settings.for_preset("baseline")
    with torch.device("meta"):
        model = train_gpt.GPT(baseline)
    newton_schulz = 0
    for name, p in model.named_parameters():
        if name.startswith("blocks.") and p.ndim == 2:
            m, n = sorted(p.shape)
            newton_schulz += baseline.muon_backend_steps * (4 * m * m * n + 2 * m ** 3)
    share = newton_schulz / (flops.flops_per_token(baseline) * baseline.train_batch_tokens)
    quoted = found(r"Newton-Schulz is about ([\d.]+)% of the baseline's FLOPs per step", " ".join(doc(BENCH_README).split()),
                   "Newton-Schulz's share").group(1)
    assert f"{100 * share:.1f}" == quoted


def test_challenge_figures_are_the_specs_and_the_trainers():
    readme = " ".join(doc(README).split())
    assert f"**{train_gpt.ARTIFACT_CAP_BYTES:,} bytes**" in readme
    split = found(r"SPEC\.md: ([\d,]+) for sp1024, ([\d,]+) for sp8192", readme, "the published splits").groups()
    assert [number(n) for n in split] == [train_gpt.PUBLISHED_VAL_TOKENS[1024][0], train_gpt.PUBLISHED_VAL_TOKENS[8192][0]]
    for name in (README, BENCH_README):
        for tokens in re.findall(r"([\d,]+)-token split|sp8192: ([\d,]+) tokens", doc(name)):
            assert number("".join(tokens)) == train_gpt.PUBLISHED_VAL_TOKENS[8192][0]
    best = min(number(n) for n in re.findall(r"^\| 2026-\S+ \| [^|]+ \| [^|]*\(([\d.]+)\) \|", doc(RECORDS_README), re.M))
    assert f"the best 10-minute record so far, {best:.4f}" in readme
    if SPEC.is_file():
        baseline = found(r"round trip \*\*([\d.]+)\*\*", SPEC.read_text(), "SPEC's baseline").group(1)
        assert f"The naive baseline scores {baseline}" in readme


def test_significance_defaults_are_make_submissions():
    margin, alpha = make_submission.MIN_DELTA_NATS, make_submission.ALPHA
    assert f"({margin:g} nats, p < {alpha:g} by default)" in " ".join(doc(README).split())
    assert f"(default {margin:g} and {alpha:g};" in " ".join(doc(RECORDS_README).split())


# ----------------------------------------------------------------------------------------------
# The tools' defaults.

def test_downloader_and_retokenizer_option_tables_are_their_defaults():
    import cached_challenge_fineweb as downloader
    import download_hf_docs_and_tokenize as retokenizer
    text = doc(DATA_README)
    assert f"| `--variant` | `{downloader.DEFAULT_VARIANT}` |" in text
    assert f"| `--train-shards N`, or a bare `N` | {downloader.DEFAULT_TRAIN_SHARDS} |" in text
    for option, value in (("--num-val-docs", retokenizer.DEFAULT_NUM_VAL_DOCS),
                          ("--shard-tokens", retokenizer.DEFAULT_SHARD_TOKENS),
                          ("--tokenizer-train-docs", retokenizer.DEFAULT_TOKENIZER_TRAIN_DOCS),
                          ("--batch-docs", retokenizer.DEFAULT_BATCH_DOCS)):
        assert number(found(rf"\| `{option} N` \| ([\d,]+) \|", text, option).group(1)) == value
    header = found(r"header of (\d+) little-endian int32 \(magic (\d+), version (\d+)", text, "the shard header")
    import shard_io
    assert tuple(map(int, header.groups())) == (shard_io.HEADER_INTS, shard_io.SHARD_MAGIC, shard_io.SHARD_VERSION)
    assert f"exactly {shard_io.HEADER_BYTES} + 2 x tokens bytes" in text


def test_published_tokenizer_hashes_are_the_trainers_table():
    table = dict((name, sha) for name, sha in re.findall(r"^\| (sp\d+) `[^`]+` \| `([0-9a-f]{64})` \|",
                                                         doc(DATA_README), re.M))
    assert table == {name: sha for sha, name in train_gpt.PUBLISHED_TOKENIZERS.items() if name.startswith("sp")}
    caseops = found(r"`(fineweb_8192_bpe_lossless_caps_caseops_v1_reserved\.model)`,\s+sha256 `([0-9a-f]{64})`",
                    doc(DATA_README), "the CaseOps tokenizer")
    files = {f"fineweb_{name[2:]}_bpe.model": sha for name, sha in table.items()}
    files[caseops.group(1)] = caseops.group(2)
    if not SHARED_DATA.is_dir():
        pytest.skip("the files themselves are in ../shared/data")
    for file, sha in files.items():
        path = SHARED_DATA / "tokenizers" / file
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, file


def test_bench_variables_are_the_benchmarks_defaults():
    knobs, text = throughput.BenchKnobs(), doc(BENCH_README)
    assert number(found(r"\| `BENCH_STEPS` \| (\d+) \|", text, "BENCH_STEPS").group(1)) == knobs.steps
    assert number(found(r"\| `BENCH_WARMUP_STEPS` \| (\d+) \|", text, "BENCH_WARMUP_STEPS").group(1)) == \
        knobs.warmup_steps
    assert number(found(r"\| `BENCH_PROGRESS` \| ([\d.]+) ", text, "BENCH_PROGRESS").group(1)) == knobs.progress
    readme = " ".join(doc(README).split())
    assert f"`BENCH_STEPS` ({knobs.steps}) and `BENCH_WARMUP_STEPS` ({knobs.warmup_steps})" in readme
    varlen = (REPO / "bench" / "varlen_attention.py").read_text()
    for name in ("ROW_TOKENS", "DOC_TOKENS", "REPEATS"):
        default = found(rf'os\.environ\.get\("{name}", (\d+)\)', varlen, name).group(1)
        assert re.search(rf"`{name}` \({default}\b", text), name


def test_gpu_check_limits_and_trimmed_run_are_its_constants():
    text = " ".join(doc(BENCH_README).split())
    full = section(doc(BENCH_README), "bench/gpu_check.py: the whole kit on a GPU machine, one command")
    for step, limit in gpu_check.LIMITS_S.items():
        if step != "multi_rank":  # a step that runs nothing
            assert f"| `{step}` | {limit} s |" in full, step
    session = section(doc(BENCH_README), "`--session`: one command within a fixed time")
    for step, limit in gpu_check.SESSION_LIMITS_S.items():
        assert re.search(rf"\| `{step}` \| [^|]*\b{limit} s \|", session), step
    full_budget = gpu_check.parse_args(["--out", "report"]).budget_s
    session_budget = gpu_check.parse_args(["--out", "report", "--session"]).budget_s
    assert f"`--budget-s S` caps the whole check (default {full_budget:.0f} s" in text
    assert f"within `--budget-s` (default {session_budget:.0f} s)" in text
    for name in (README, BENCH_README):
        lines = " ".join(doc(name).split())
        assert f"# one GPU, within {session_budget:.0f} s (--budget-s)" in lines
        assert f"# every step, within {full_budget / 60:.0f} minutes" in lines
    assert f"`MAX_WALLCLOCK_SECONDS={gpu_check.SESSION_TIMED_RUN_CAP_S:g}`" in text
    assert f"`WARMUP_STEPS={gpu_check.SESSION_WARMUP_STEPS}`" in text
    variables = gpu_check.session_run_settings(train_gpt.Settings())
    assert f"`GPTQ_CALIBRATION_BATCHES={variables['GPTQ_CALIBRATION_BATCHES']}`" in text
    _, lengths, val_tokens = gpu_check.timed_run_split(train_gpt.Settings(), dry_run=False)
    batches = gpu_check.SPLIT_TTT_BATCHES[False]
    assert f"The timed run's split is {batches} of the modeled split's" in text
    assert f"({len(lengths):,} documents, {val_tokens:,} tokens)" in text
    full_ttt, _, full_tokens = gpu_check.timed_run_split(train_gpt.Settings.for_preset("1.0810"), dry_run=False)
    assert f"runs `TTT_CHUNK_TOKENS={full_ttt['TTT_CHUNK_TOKENS']}` instead" in text
    assert f"on {gpu_check.SPLIT_TTT_CHUNKS[False]} such chunks ({full_tokens:,} tokens)" in text
    settings = train_gpt.Settings()
    costs = lambda documents: train_gpt.ttt_batch_costs(  # noqa: E731
        train_gpt.ttt_batches(gpu_check.split_documents(documents), 64), settings.ttt_chunk_tokens, settings.train_seq_len)
    here, full = costs(lengths), costs(gpu_check.modeled_document_lengths(settings.vocab_size))
    assert f"the cost by which the ranks share the batches: {sum(here):,} here)" in text
    busiest = gpu_check.busiest_rank(full, 8)
    assert f"modeled full split's {len(full)} batches are shared by that cost ({busiest:,} of {sum(full):,})" in text
    rows_here, rows_8 = (gpu_check.scoring_batches(n, settings, 2048, ranks) for n, ranks in ((val_tokens, 1),
                                                                                            (40_540_160, 8)))
    assert f"{rows_here} rows here)" in text and f"40,540,160 tokens; {rows_8} rows)" in text


# ----------------------------------------------------------------------------------------------
# The record the default reproduces (the folder of ../shared/reference the README names): its logs.

DEFAULT, PRESET_1_0810 = "The default: the 1.0714 record, reproduced", "PRESET=1.0810: the 1.0810 record"


def default_section() -> str:
    return section(doc(README), DEFAULT)


def record_folder(heading: str) -> Path:
    """The folder of ../shared/reference that the section names first."""
    name = found(r"`\.\./shared/reference/(record_[^/`]+)/`", section(doc(README), heading), "the record's folder").group(1)
    folder = REPO.parent / "shared" / "reference" / name
    if not folder.is_dir():
        pytest.skip(f"needs ../shared/reference/{name} (the record's files)")
    return folder


def record_logs(heading: str) -> dict[int, str]:
    """The logs of the seeds of the section's per-seed table, by seed."""
    seeds = [int(seed) for seed in re.findall(r"^\| (\d+) \| [\d,]+ \|", section(doc(README), heading), re.M)]
    logs = {seed: record_folder(heading) / f"train_seed{seed}.log" for seed in seeds}
    if not seeds or not all(log.is_file() for log in logs.values()):
        pytest.skip("the record's folder has no train_seed<N>.log for each seed of the README's table")
    return {seed: log.read_text() for seed, log in logs.items()}


def log_value(log: str, pattern: str) -> float:
    return float(found(pattern, log, "a line of the record's log", re.M).group(1))


def score(name: str):
    return lambda log: round(log_value(log, rf"^{name} val_loss:\S+ val_bpb:(\S+)"), 5)


def eval_seconds(log: str, name: str) -> float:
    return log_value(log, rf"^{name} val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms") / 1000


MODEL_BYTES = r"^Serialized model (?:quantized\+brotli|int6\+brotli): (\d+) bytes"
# Each record's per-seed table, column by column from its logs; then the passes whose evaluation times it quotes.
SEED_TABLES = {
    DEFAULT: ([score("diagnostic pre-quantization post-ema"), score("diagnostic quantized"),
               score("quantized_ttt_lora"), lambda log: log_value(log, MODEL_BYTES),
               lambda log: log_value(log, r"^Code size \(compressed\): (\d+)")],
              r"Evaluation took ([\d.]+)-([\d.]+) s \(packed rows\) and ([\d.]+)-([\d.]+) s \(TTT\)",
              ("diagnostic quantized", "quantized_ttt_lora")),
    PRESET_1_0810: ([score(name) for name in ("pre-quantization post-ema", "quantized", "quantized_sliding_window",
                                              "quantized_ttt")] + [lambda log: log_value(log, MODEL_BYTES),
                                                                   lambda log: log_value(log, r"^Code size: (\d+)")],
                    r"Evaluation took ([\d.]+)-([\d.]+) s \(plain\), ([\d.]+)-([\d.]+) s \(sliding\) and "
                    r"([\d.]+)-([\d.]+) s \(TTT\)", ("quantized", "quantized_sliding_window", "quantized_ttt")),
}


@pytest.mark.parametrize("heading", SEED_TABLES)
def test_the_records_per_seed_table_is_its_logs(heading):
    logs, text = record_logs(heading), " ".join(section(doc(README), heading).split())
    columns, times, passes = SEED_TABLES[heading]
    for seed, log in logs.items():
        row = found(rf"^\| {seed} \| (.*) \|$", section(doc(README), heading), f"the record's seed {seed}", re.M).group(1)
        steps = log_value(log, r"^stopping_early: wallclock_cap train_time: \d+ms step: (\d+)/")
        train_ms = log_value(log, r"^stopping_early: wallclock_cap train_time: (\d+)ms")
        expected = [steps, round(train_ms / steps, 1)] + [column(log) for column in columns]
        assert [number(cell.strip("*")) for cell in row.split(" | ")] == expected, seed
    quoted = found(times, text, "the record's evaluation times").groups()
    for i, name in enumerate(passes):
        seconds = [eval_seconds(log, name) for log in logs.values()]
        low, high = quoted[2 * i:2 * i + 2]
        digits = len(low.partition(".")[2])
        assert (round(min(seconds), digits), round(max(seconds), digits)) == (float(low), float(high)), name


def test_the_default_records_totals_switch_and_room_for_code_are_its_logs():
    logs, text = record_logs(DEFAULT), " ".join(default_section().split())
    totals = sorted(log_value(log, r"^Total submission size quantized\+brotli: (\d+)") for log in logs.values())
    assert f"Totals with code: {', '.join(f'{t:,.0f}' for t in totals[:-1])} and {totals[-1]:,.0f} bytes" in text
    on = sorted(log_value(log, r"^layer_loop:enabled step:(\d+)") for log in logs.values())
    assert f"Recurrence switched on at step {on[0]:.0f}-{on[-1]:.0f}." in text
    models = sorted(log_value(log, MODEL_BYTES) for log in logs.values())
    assert (f"The record's trained models are {models[0]:,.0f} to {models[-1]:,.0f} bytes, which leaves "
            f"{train_gpt.ARTIFACT_CAP_BYTES - models[-1]:,.0f} to {train_gpt.ARTIFACT_CAP_BYTES - models[0]:,.0f} bytes "
            f"for code") in text
    from test_pack_code import RECORD_LARGEST_MODEL_BYTES
    assert models[-1] == RECORD_LARGEST_MODEL_BYTES
    warm_up = sorted(log_value(log, r"^ttt_lora:compile warmup done \(([\d.]+)s\)") for log in logs.values())
    assert f"compiled for {warm_up[0]:.0f}-{warm_up[-1]:.0f} s before its timer started" in text
    plain = (record_folder(DEFAULT) / "train_gpt.py").stat().st_size
    assert plain == log_value(logs[42], r"^Code size \(uncompressed\): (\d+)")
    assert f"The record ships its readable source ({plain:,} bytes)" in text


def test_the_1_0810_presets_room_for_code_is_its_logs():
    logs, text = record_logs(PRESET_1_0810), " ".join(section(doc(README), PRESET_1_0810).split())
    models = sorted(log_value(log, MODEL_BYTES) for log in logs.values())
    assert (f"the record's models leave {train_gpt.ARTIFACT_CAP_BYTES - models[-1]:,.0f} to "
            f"{train_gpt.ARTIFACT_CAP_BYTES - models[0]:,.0f} bytes for code") in text


def test_the_fit_adds_up():
    """The default's artifact: the record's largest trained model plus the packed code, and the two exports of the
    same Gaussian-row weights, within the rounding of the README's "about"s."""
    fit = " ".join(default_section().split())
    packed = len(train_gpt.pack_code((REPO / "train_gpt.py").read_bytes())[1])
    largest = number(found(r"The record's trained models are [\d,]+ to ([\d,]+) bytes", fit, "the largest").group(1))
    total, margin = (number(n) for n in found(r"beside the largest, the artifact is about ([\d,]+) bytes: about "
                                               r"([\d,]+) under the cap", fit, "the total").groups())
    assert abs(total - (largest + packed)) < 500 and abs(margin - (train_gpt.ARTIFACT_CAP_BYTES - total)) < 500
    kit, record, seconds_kit, seconds_record, smaller = found(
        r"machine: ([\d,]+) and ([\d,]+) bytes, in (\d+) s and (\d+) s, mostly brotli-11: the kit's is ([\d,]+) bytes "
        r"smaller", fit, "the two exports").groups()
    assert number(record) - number(kit) == number(smaller)
    worse = number(found(r"Gaussian rows compress ([\d.]+)% worse than the record's trained weights", fit,
                         "the ratio").group(1))
    models = [log_value(log, MODEL_BYTES) for log in record_logs(DEFAULT).values()]
    assert all(abs(100 * (number(record) / m - 1) - worse) < 0.05 for m in models)


def test_the_records_evaluation_times_are_the_log_it_names():
    text = default_section().split("**Evaluation time on 8xH100.**")[1]
    seed = int(found(r"\(`train_seed(\d+)\.log`", text, "the log of the evaluation times").group(1))
    log = record_logs(DEFAULT)[seed]
    seconds = [eval_seconds(log, name) for name in ("diagnostic quantized", "quantized_ttt_lora")]
    rows = [number(s) for s in re.findall(r"^\| [^|]+ \| ([\d.]+) \|$", text, re.M)]
    assert rows[:2] == [round(s, 1) for s in seconds] and rows[2] == round(sum(seconds))


@pytest.mark.parametrize("heading", SEED_TABLES)
def test_the_records_score_and_author_are_its_submission(heading):
    summary = json.loads((record_folder(heading) / "submission.json").read_text())
    text = " ".join(section(doc(README), heading).split())
    assert f"val_bpb **{summary['val_bpb']:.4f}**, mean of {len(summary['seeds'])} seeds on 8xH100" in text
    assert f"({summary['author']}, {summary['date']};" in text


# ----------------------------------------------------------------------------------------------
# Figures measured on a machine: the passage names the command, the machine and the date.

MEASURED = [  # (doc, text in the passage, the command that measures it, whether it names a machine, and a date)
    (README, "s of wall time for both commands", "python3 bench/smoke_time.py", True, False),  # measured before release
    (README, "**Does the default fit 16,000,000 bytes?**", "python3 bench/model_bytes.py --record", True, True),
    (README, "**End to end on CPU**", "tests/test_record_1_0714_end_to_end.py", True, True),
    (README, "**The cost of these proofs on a CPU.**", "python3 -m pytest -q -n 2", True, True),
    (README, "a split keeps >= 99.5% of its", "tests/test_tokenizer_match.py", True, True),
    (README, "`kernels` 0.19.1", "pip install kernels", True, True),
    (DATA_README, "SentencePiece encodes about", "SentencePieceProcessor.encode", True, True),
    (BENCH_README, "(`OMP_NUM_THREADS=1 python3 bench/varlen_attention.py`", "python3 bench/varlen_attention.py", True, True),
    (RECORDS_README, "### The official 10-minute track, audited", "python3 records/audit.py", False, True),  # from files
]
MACHINE = re.compile(r"\b(?:\d+|one|two)[- ]cores?\b|\bCPU\b|\bH100\b|\bGPU\b")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


@pytest.mark.parametrize("name, anchor, command, machine, dated", MEASURED, ids=[m[1][:40] for m in MEASURED])
def test_a_measured_figure_carries_its_command_machine_and_date(name, anchor, command, machine, dated):
    text = doc(name)
    passage = section(text, anchor.lstrip("# ")) if anchor.startswith("#") else paragraph_of(text, anchor)
    passage = " ".join(passage.split())
    assert command in passage, f"{name}: the passage of {anchor!r} does not name {command!r}"
    assert MACHINE.search(passage) or not machine, f"{name}: the passage of {anchor!r} does not name the machine"
    assert DATE.search(passage) or not dated, f"{name}: the passage of {anchor!r} gives no date (YYYY-MM-DD)"
