"""The docs' shell commands run: every command of README.md, data/README.md, records/README.md and
bench/README.md that can run offline on a CPU is run here as the docs write it, in a fresh clone of the
repository (its committed history, with the working tree's files copied over it), so that a doc example that goes
stale fails.

A command is a line of a fenced `bash` block (continuation lines joined, a trailing `# comment` dropped) or an
inline code span that starts with `python3 ` or `torchrun ` (after `NAME=value` assignments); a line of commands
joined by `&&` counts as one command per part. Each command is, by its exact text (whitespace collapsed):
- RUN by the test named beside it, with placeholders (`DIR`, `DATA`, `<a record>`, ...) replaced by real paths;
- GROUPED with a run command it repeats with other values (more processes, another preset, other paths);
- or LISTED with the reason it cannot run here: it needs a GPU or the network.
A command in none of them, or an entry whose command is no longer in the docs, fails
test_every_doc_command_is_run_grouped_or_listed.

Reduced sizes are environment variables the tests add: trainer runs take the smoke preset's sizes (read from
train_gpt.PRESETS at test time), 4 steps and 4,096 validation tokens (SHORT_RUN); the tools read the same
variables. Nothing here can reach the network: HF_ENDPOINT points at a closed port, except for the downloader's
commands, which read a hub served from this process under the published repos' names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

import train_gpt
from conftest import REPO, SHARED_DATA

DOCS = ("README.md", "data/README.md", "records/README.md", "bench/README.md")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
INLINE_COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:python3|torchrun)\s")
REFERENCE_RECORD = REPO.parent / "shared" / "reference" / "record_2026-04-09_sp8192_1.0810"

# ----------------------------------------------------------------------------------------------
# What happens to each command of the docs.

RUN = {  # command -> the test below that runs it
    "python3 data/build_smoke_dataset.py": "test_smoke_commands_run",
    "PRESET=smoke python3 train_gpt.py": "test_smoke_commands_run",
    "python3 bench/smoke_time.py": "test_smoke_commands_run",
    "python3 train_gpt.py": "test_smoke_commands_run",
    "python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 1": "test_first_run_commands_run",
    "torchrun --standalone --nproc_per_node=1 train_gpt.py": "test_first_run_commands_run",
    "python3 data/cached_challenge_fineweb.py": "test_first_run_commands_run",
    "python3 data/cached_challenge_fineweb.py --variant sp8192": "test_first_run_commands_run",
    "python3 data/cached_challenge_fineweb.py --variant sp1024 1": "test_first_run_commands_run",
    "python3 data/cached_challenge_fineweb.py --variant sp1024 1 --verify": "test_first_run_commands_run",
    "python3 data/download_hf_docs_and_tokenize.py --output-root /big/disk/export --docs-jsonl "
    "data/docs_selected.jsonl": "test_retokenizer_command_runs_offline",
    'python3 records/make_submission.py --track 10min_16mb --name "Int6 Weights" --author "Ada Lovelace" '
    '--github-id ada --blurb "int6 GPTQ export, 11 layers" --compare-to records/track_10min_16mb/<the current best> '
    "logs/seed1.txt logs/seed2.txt logs/seed3.txt": "test_records_commands_run",
    "python3 records/run_log.py logs/seed1.txt records/track_10min_16mb/<a record>/train_seed1337.log":
        "test_records_commands_run",
    "python3 records/run_log.py logs/": "test_records_commands_run",
    "python3 records/audit.py records/track_10min_16mb/<a record>/": "test_records_commands_run",
    "python3 records/audit.py records/track_10min_16mb/<your record>/ --compare-to "
    "records/track_10min_16mb/<the best>/": "test_records_commands_run",
    "python3 records/audit.py --table --claims records/published_claims.txt <folder>...": "test_records_commands_run",
    "python3 records/compare_runs.py --a logs/base_seed*.txt --b logs/idea_seed*.txt": "test_records_commands_run",
    "python3 records/compare_runs.py --a logs/base_seed*.txt --b logs/idea_seed*.txt --plot base_vs_idea.png":
        "test_records_commands_run",
    "python3 records/compare_runs.py --a 1.2243657 --b <the three logs> --min-delta-bpb 0.005":
        "test_records_commands_run",
    "python3 records/compare_runs.py --a <baseline logs or record folder> --b <new logs>": "test_records_commands_run",
    "PRESET=smoke DEVICE=cpu OMP_NUM_THREADS=1 BENCH_STEPS=3 BENCH_WARMUP_STEPS=1 python3 bench/throughput.py":
        "test_throughput_commands_run",
    "python3 bench/throughput.py >> bench_results.jsonl": "test_throughput_commands_run",
    "python3 bench/gpu_check.py --out DIR --dry-run [--session]": "test_gpu_check_dry_run_command_runs",
    "python3 bench/model_bytes.py": "test_model_bytes_commands_run",
    "python3 bench/model_bytes.py --record": "test_model_bytes_commands_run",
    "OMP_NUM_THREADS=1 python3 bench/varlen_attention.py": "test_varlen_attention_command_runs",
    "python3 -c \"import train_gpt; print(len(train_gpt.pack_code(open('train_gpt.py','rb').read())[1]))\"":
        "test_packed_size_command_runs",
}

GROUPED = {  # command -> (the run command it repeats with other values, which values)
    "SEED=1 RUN_ID=seed1 torchrun ...": ("torchrun --standalone --nproc_per_node=1 train_gpt.py", "a seed and a name"),
    "torchrun --standalone --nproc_per_node=8 train_gpt.py": (
        "torchrun --standalone --nproc_per_node=1 train_gpt.py", "8 processes, one per GPU of the challenge's 8"),
    "PRESET=baseline torchrun --standalone --nproc_per_node=8 train_gpt.py": (
        "torchrun --standalone --nproc_per_node=1 train_gpt.py", "the baseline preset, 8 processes"),
    "PRESET=1.0810 torchrun --standalone --nproc_per_node=8 train_gpt.py": (
        "torchrun --standalone --nproc_per_node=1 train_gpt.py", "the 1.0810 preset, 8 processes"),
    "TTT_EPOCHS=0 VAL_LOSS_EVERY=0 RUN_ID=try1 torchrun --standalone --nproc_per_node=1 train_gpt.py": (
        "torchrun --standalone --nproc_per_node=1 train_gpt.py", "no test-time training, validation only at the end, "
                                                                 "a name"),
    "DATA_PATH=/big/disk/export/datasets/fineweb10B_sp1024 TOKENIZER_PATH=/big/disk/export/tokenizers/"
    "fineweb_1024_bpe.model VOCAB_SIZE=1024 torchrun --standalone --nproc_per_node=8 train_gpt.py": (
        "torchrun --standalone --nproc_per_node=1 train_gpt.py", "another export's paths, 8 processes"),
    "python3 data/download_hf_docs_and_tokenize.py --output-root /big/disk/export": (
        "python3 data/download_hf_docs_and_tokenize.py --output-root /big/disk/export --docs-jsonl "
        "data/docs_selected.jsonl", "the documents fetched from the hub first (tests/test_data_download.py fetches "
                                    "them from a local hub)"),
    "python3 records/make_submission.py --track 10min_16mb --name NAME --author AUTHOR --github-id ID --compare-to "
    "records/track_10min_16mb/<current best> logs/seed1.txt logs/seed2.txt logs/seed3.txt": (
        'python3 records/make_submission.py --track 10min_16mb --name "Int6 Weights" --author "Ada Lovelace" '
        '--github-id ada --blurb "int6 GPTQ export, 11 layers" --compare-to records/track_10min_16mb/'
        "<the current best> logs/seed1.txt logs/seed2.txt logs/seed3.txt", "other names, no blurb"),
    "python3 records/audit.py --table --claims records/published_claims.txt "
    "/tmp/parameter-golf/records/track_10min_16mb/*/": (
        "python3 records/audit.py --table --claims records/published_claims.txt <folder>...",
        "the official repository's folders (cloned from the network)"),
    "python3 bench/throughput.py": (
        "python3 bench/throughput.py >> bench_results.jsonl", "printed rather than appended to a file"),
    "torchrun --standalone --nproc_per_node=8 bench/throughput.py": (
        "python3 bench/throughput.py >> bench_results.jsonl",
        "8 processes (tests/test_bench_throughput.py runs 2 under torchrun)"),
    "python3 bench/gpu_check.py --session --dry-run --out /tmp/session_dry --data DATA": (
        "python3 bench/gpu_check.py --out DIR --dry-run [--session]", "a data folder"),
    "python3 bench/varlen_attention.py": ("OMP_NUM_THREADS=1 python3 bench/varlen_attention.py",
                                          "PyTorch's own thread count"),
}

GPU = "needs a CUDA GPU (the --dry-run line runs the same steps on the CPU)"
LISTED = {  # command -> why it does not run here
    **dict.fromkeys(["python3 -m venv .venv", ". .venv/bin/activate", "pip install -r requirements.txt"],
                    "makes the Python environment the tests run in; pip needs the network (CI makes a fresh one "
                    "the same way: .ci/run)"),
    "python3 -m pytest -q -n 2 tests/test_record_1_0714_*.py tests/test_packed_*.py tests/test_eight_gpu_step.py "
    "tests/test_lora_ttt.py": "a part of the test suite, which CI runs whole",
    **dict.fromkeys(["pip install pytest pytest-xdist", "python3 -m pytest -q -n auto"],
                    "the test suite itself, which CI runs with this very line "
                    "(test_ci_runs_the_readmes_test_command); pip needs the network"),
    "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR --master_port=29500 "
    "train_gpt.py": "needs two machines",
    "python3 -m venv --system-site-packages .venv": "makes a Python environment that sees the system's packages (a "
                                                    "pod's torch); pip then needs the network",
    "python3 bench/gpu_check.py --session --out DIR --data DATA": GPU,
    "python3 bench/gpu_check.py --out DIR --data DATA": GPU,
    "python3 bench/gpu_check.py --session": GPU,
    "python3 -m pytest -m cuda tests": "needs a CUDA GPU: on a CPU every test it selects skips",
    **dict.fromkeys(["pip install kernels", "git clone https://github.com/Dao-AILab/flash-attention",
                     "cd flash-attention/hopper", "python setup.py install"],
                    "FlashAttention 3: the network, and a CUDA build for an H100"),
    **dict.fromkeys(["git clone https://github.com/openai/parameter-golf /tmp/parameter-golf",
                     "git -C /tmp/parameter-golf checkout 4908dc46f21e"], "the network (the official repository)"),
    "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 "
    "-d wheels brotli": "the network (PyPI)",
    "python3 -m pip install --no-index --no-deps wheels/*.whl": "installs into the Python environment the wheels "
                                                                 "that the network line fetched",
}


# ----------------------------------------------------------------------------------------------
# Reading the commands out of the docs.

@dataclasses.dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def one_line(text: str) -> str:
    return " ".join(text.split())


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, body) of each fenced block."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2))
            for m in re.finditer(r"^```(\S*)[^\n]*\n(.*?)^```", text, re.S | re.M)]


def shell_block_commands(body: str) -> list[tuple[int, str]]:
    """(line within the block, command) of each command line: continuations joined, comments dropped."""
    commands, pending, first = [], "", 0
    for i, line in enumerate(body.split("\n")):
        if not pending:
            first = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = re.sub(r"(^|\s)#(\s.*)?$", "", pending + line).strip()  # a comment: `#` then a space or the end
        pending = ""
        if command:
            commands.append((first, command))
    return commands


def doc_commands(doc: str) -> list[DocCommand]:
    text = (REPO / doc).read_text(encoding="utf-8")
    found = []
    for language, line, body in fenced_blocks(text):
        if language in SHELL_LANGUAGES:
            found += [(line + 1 + offset, command) for offset, command in shell_block_commands(body)]
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for m in re.finditer(r"`([^`]+)`", prose):
        if INLINE_COMMAND.match(one_line(m.group(1))):
            found.append((prose.count("\n", 0, m.start()) + 1, m.group(1)))
    return [DocCommand(doc, line, one_line(part)) for line, command in found
            for part in re.split(r"\s&&\s", one_line(command))]


def all_doc_commands() -> list[DocCommand]:
    return [command for doc in DOCS for command in doc_commands(doc)]


# ----------------------------------------------------------------------------------------------
# Running a command in a fresh clone.

def fresh_clone(destination: Path) -> Path:
    """The repository's history (HEAD, as data/build_smoke_dataset.py reads it) with the working tree's files
    copied over it: the docs' commands run on the code under test, and write only into the clone."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(REPO), str(destination)], check=True)
    subprocess.run(["git", "-C", str(destination), "checkout", "-q", "--detach", head], check=True)
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    if (REPO.parent / "shared").is_dir():  # what tests and tools read as ../shared
        (destination.parent / "shared").symlink_to(REPO.parent / "shared")
    for name in filter(None, listed):
        source, target = REPO / name, destination / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        elif target.exists():  # deleted in the working tree
            target.unlink()
    return destination


@pytest.fixture
def clone(tmp_path) -> Path:
    return fresh_clone(tmp_path / "clone")


def trainer_setting_names() -> set[str]:
    return {f.name.upper() for f in dataclasses.fields(train_gpt.Settings)}


def command_env(home: Path, **overrides) -> dict:
    """The caller's environment without any trainer setting or launcher variable, offline, one thread a process."""
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "HF_", "MATCHED_FINEWEB_", "BENCH_")
    env = {k: v for k, v in os.environ.items() if k not in trainer_setting_names() and not k.startswith(dropped)}
    env.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(home / "hf_home"),
               HF_HUB_DISABLE_TELEMETRY="1", MPLBACKEND="Agg")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


# A short run: 4 steps, 4,096 validation tokens in one batch (a batch is padded to its full size: with 8,192-token
# logits the smoke preset's 16,384-token batch takes seconds).
SHORT_RUN = {"ITERATIONS": "4", "MAX_VAL_TOKENS": "4096", "VAL_BATCH_SIZE": "4096"}


def reduced_recipe() -> dict:
    """The default recipe at the smoke preset's sizes (model, batch, evaluation; not its data), a short run."""
    sizes = {k: v for k, v in train_gpt.PRESETS["smoke"].items()
             if k not in ("data_path", "tokenizer_path", "vocab_size")}
    return {**{k.upper(): str(v) for k, v in sizes.items()}, **SHORT_RUN}


def substituted(text: str, placeholders: dict[str, str]) -> str:
    for placeholder, value in placeholders.items():
        pattern = rf"\b{re.escape(placeholder)}\b" if placeholder.isalnum() else re.escape(placeholder)
        text = re.sub(pattern, lambda _: value, text)
    return text


def run_doc_command(text: str, cwd: Path, env: dict, placeholders: dict | None = None, extra: str = "",
                    expect_exit: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """The doc's command, placeholders replaced, with `extra` appended, through bash in `cwd`."""
    assert text in RUN, f"not a command RUN lists: {text}"
    assert text in {c.text for c in all_doc_commands()}, f"no longer in the docs: {text}"
    command = substituted(text, placeholders or {}) + extra
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == expect_exit, (f"`{command}` exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                              f"{result.stderr[-3000:]}")
    return result


# ----------------------------------------------------------------------------------------------
# Every command is accounted for.

def test_every_doc_command_is_run_grouped_or_listed():
    commands = all_doc_commands()
    texts = {c.text for c in commands}
    unaccounted = [str(c) for c in commands if c.text not in RUN and c.text not in GROUPED and c.text not in LISTED]
    assert not unaccounted, "commands of the docs that no test runs, groups or lists (add each to RUN, GROUPED or " \
                            "LISTED in tests/test_doc_commands.py):\n" + "\n".join(unaccounted)
    gone = [text for text in (*RUN, *GROUPED, *LISTED) if text not in texts]
    assert not gone, "entries of tests/test_doc_commands.py whose command is no longer in the docs:\n" + "\n".join(gone)
    assert not set(RUN) & set(GROUPED) and not set(RUN) & set(LISTED) and not set(GROUPED) & set(LISTED)
    assert {run for run, _ in GROUPED.values()} <= set(RUN)
    assert all(callable(globals().get(test)) and test.startswith("test_") for test in RUN.values())


def test_every_fenced_block_names_its_language():
    """So that no command hides in a block this test does not read as shell."""
    unnamed = [f"{doc}:{line}" for doc in DOCS for language, line, _ in fenced_blocks((REPO / doc).read_text())
               if not language]
    assert not unnamed, f"fenced blocks without a language (```bash for commands, ```text otherwise): {unnamed}"


def test_commands_are_read_from_blocks_inline_spans_and_joined_lines():
    body = "# a comment\nA=1 python3 x.py --a \\\n  --b  # why\n\npython3 y.py && torchrun z.py\n"
    assert shell_block_commands(body) == [(1, "A=1 python3 x.py --a    --b"), (4, "python3 y.py && torchrun z.py")]
    assert INLINE_COMMAND.match("PRESET=smoke python3 train_gpt.py") and not INLINE_COMMAND.match("python3")
    assert not INLINE_COMMAND.match("git worktree")


def test_ci_runs_the_readmes_test_command():
    ci, readme = (REPO / ".ci" / "run").read_text(), " ".join((REPO / "README.md").read_text().split())
    assert "python3 -m pytest -q -n auto" in ci and "pip install -q pytest pytest-xdist" in ci
    assert "python3 -m pytest -q -n auto" in {c.text for c in doc_commands("README.md")}
    torch_pin = re.search(r"pip install -q (torch==\S+)", ci).group(1)
    assert f"(CI installs the CPU build first, `pip install {torch_pin}`" in readme


# ----------------------------------------------------------------------------------------------
# The commands, run.

def first_line_names_the_log(stdout: str, cwd: Path) -> str:
    """The run's RUN_ID, from its first printed line, which names its log; the log exists."""
    first = stdout.splitlines()[0]
    run_id, log = re.match(r"run_id:(\S+) started:\S+ log:(\S+)$", first).groups()
    assert log == f"logs/{run_id}.txt" and (cwd / log).is_file(), first
    return run_id


def test_smoke_commands_run(clone, tmp_path):
    """README's smoke line (and data/README.md's), the timing tool behind its figure, and `python3 train_gpt.py`
    (the default recipe on a CPU) on the smoke data at reduced size."""
    env = command_env(tmp_path)
    built = run_doc_command("python3 data/build_smoke_dataset.py", clone, env)
    data = dict(re.findall(r"(DATA_PATH|TOKENIZER_PATH|VOCAB_SIZE)=(\S+)", built.stdout))
    assert set(data) == {"DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE"} and (clone / data["DATA_PATH"]).is_dir()
    smoke = run_doc_command("PRESET=smoke python3 train_gpt.py", clone, command_env(tmp_path, **SHORT_RUN))
    run_id = first_line_names_the_log(smoke.stdout, clone)
    assert smoke.stdout.splitlines()[-1].startswith("summary:") and f"log logs/{run_id}.txt" in smoke.stdout
    timed = run_doc_command("python3 bench/smoke_time.py", clone, command_env(tmp_path, **SHORT_RUN))
    assert re.search(r"^run 1: total \S+ s wall", timed.stdout, re.M), timed.stdout
    default = run_doc_command("python3 train_gpt.py", clone, command_env(tmp_path, **reduced_recipe(), **data))
    first_line_names_the_log(default.stdout, clone)
    assert re.search(r"^settings:.*\"PRESET\": \"strong\"", default.stdout, re.M)


# A hub served from this process: the downloader's commands read it as they read huggingface.co.

@pytest.fixture(scope="module")
def hub_exports(tmp_path_factory) -> dict:
    """The two repos the downloader reads by default, each an export of the FineWeb sample (a document a line) with a
    published tokenizer, sp8192 and sp1024, of more training shards than the downloader's default 80 (sp8192: 91).
    Shards of 3,000 tokens: the first holds a step of the reduced recipe's packed documents, LOADER_STREAMS x
    (TRAIN_BATCH_TOKENS / LOADER_STREAMS + 1) = 8 x (2,048 / 8 + 1) = 2,056 tokens from its first BOS."""
    if not SHARED_DATA.is_dir():
        pytest.skip("needs ../shared/data (FineWeb text and the published tokenizers)")
    from download_hf_docs_and_tokenize import TokenizerSpec, build_export
    root = tmp_path_factory.mktemp("hub")
    text = (SHARED_DATA / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt").read_text(encoding="utf-8")
    docs = root / "docs_selected.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()), encoding="utf-8")
    repos = {}
    for repo_id, vocab in (("kevclark/parameter-golf", 8192), ("willdepueoai/parameter-golf", 1024)):
        spec = TokenizerSpec(f"sp_bpe_{vocab}", f"sp{vocab}", vocab,
                             reuse_model_path=SHARED_DATA / "tokenizers" / f"fineweb_{vocab}_bpe.model")
        build_export(docs, root / repo_id / "datasets", [spec], num_val_docs=20, shard_tokens=3_000)
        repos[repo_id] = root / repo_id
    return repos


@pytest.fixture
def hub(hub_exports):
    from test_data_download import HubHandler
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.repos, server.requests = hub_exports, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def shard_downloads(hub) -> list[str]:
    return [path for method, path in hub.requests if method == "GET" and path.endswith(".bin")]


def test_first_run_commands_run(clone, tmp_path, hub):
    """README's first run (the download, then torchrun on the downloaded sp8192 data at reduced size) and
    data/README.md's downloader lines, against a hub with the published repos' names."""
    env = command_env(tmp_path, HF_ENDPOINT=hub.url)
    first = run_doc_command("python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 1", clone, env)
    assert first.stdout.startswith("reading sp8192 from dataset repo kevclark/parameter-golf"), first.stdout[:300]
    trained = run_doc_command("torchrun --standalone --nproc_per_node=1 train_gpt.py", clone,
                              command_env(tmp_path, **reduced_recipe()))
    run_id = first_line_names_the_log(trained.stdout, clone)
    assert "tokenizer: published sp8192" in (clone / "logs" / f"{run_id}.txt").read_text()
    run_doc_command("python3 data/cached_challenge_fineweb.py", clone, env)  # the default: sp8192, 80 shards
    assert len(list((clone / "data/datasets/fineweb10B_sp8192").glob("fineweb_train_*.bin"))) == 80
    hub.requests.clear()
    run_doc_command("python3 data/cached_challenge_fineweb.py --variant sp8192", clone, env)
    assert not shard_downloads(hub)  # re-running skips complete files
    run_doc_command("python3 data/cached_challenge_fineweb.py --variant sp1024 1", clone, env)
    assert len(list((clone / "data/datasets/fineweb10B_sp1024").glob("fineweb_train_*.bin"))) == 1
    verified = run_doc_command("python3 data/cached_challenge_fineweb.py --variant sp1024 1 --verify", clone,
                               command_env(tmp_path))  # offline: the hub's address refuses connections
    assert "BAD" not in verified.stdout


def test_retokenizer_command_runs_offline(clone, tmp_path):
    """data/README.md's offline re-tokenization with every default (50,000 validation documents, the sp1024 and
    byte260 tokenizers of data/tokenizer_specs.json): 50,000 one-line documents, then the repository's own
    paragraphs (as committed) for training."""
    from build_smoke_dataset import repository_documents
    docs = [f"Validation document {i}." for i in range(50_000)] + repository_documents(REPO)
    (clone / "data" / "docs_selected.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    export = tmp_path / "export"
    run_doc_command("python3 data/download_hf_docs_and_tokenize.py --output-root /big/disk/export --docs-jsonl "
                    "data/docs_selected.jsonl", clone, command_env(tmp_path), {"/big/disk/export": str(export)})
    manifest = json.loads((export / "manifest.json").read_text())
    assert sorted(d["name"] for d in manifest["datasets"]) == ["fineweb10B_byte260", "fineweb10B_sp1024"]
    assert all(d["stats"]["docs_val"] == 50_000 for d in manifest["datasets"])


def test_records_commands_run(clone, tmp_path):
    """records/README.md's commands on logs in the trainer's format of 8xH100 runs (the 10-minute track takes no
    other), an official record's log, and the two published significance tests' scores."""
    from test_records import render_log
    from test_records_published import (ONE_SAMPLE_SEEDS, RECORD_BEFORE, WELCH_BASELINE, WELCH_NEW, official_log)
    logs, track = clone / "logs", clone / "records" / "track_10min_16mb"
    logs.mkdir()
    for seed, loss in zip((1, 2, 3), (2.0542, 2.0560, 2.0551)):
        (logs / f"seed{seed}.txt").write_text(render_log(seed, loss))
    for group, losses in (("base", (2.0642, 2.0650)), ("idea", (2.0542, 2.0560))):
        for seed, loss in enumerate(losses, start=1):
            (logs / f"{group}_seed{seed}.txt").write_text(render_log(seed, loss, run_id=f"{group}_seed{seed}",
                                                                     settings={"IDEA": group}))
    best, official = track / "2026-03-17_Baseline", track / "2026-03-18_Official"
    best.mkdir(parents=True)
    (best / "submission.json").write_text(json.dumps({"name": "Baseline", "val_bpb": 1.2243657}))
    official.mkdir()
    (official / "train_seed1337.log").write_text(official_log(seed=1337))
    (official / "submission.json").write_text(json.dumps({"name": "Official", "val_bpb": 1.2243657}))
    env = command_env(tmp_path)

    def run(text: str, placeholders: dict | None = None) -> str:
        return run_doc_command(text, clone, env, placeholders).stdout

    run('python3 records/make_submission.py --track 10min_16mb --name "Int6 Weights" --author "Ada Lovelace" '
        '--github-id ada --blurb "int6 GPTQ export, 11 layers" --compare-to records/track_10min_16mb/'
        "<the current best> logs/seed1.txt logs/seed2.txt logs/seed3.txt", {"<the current best>": best.name})
    (ours,) = track.glob("*_Int6_Weights")
    assert (ours / "submission.json").is_file() and (ours / "README.md").is_file()
    listed = run("python3 records/run_log.py logs/seed1.txt records/track_10min_16mb/<a record>/train_seed1337.log",
                 {"<a record>": official.name})
    assert "(kit layout)" in listed and "(official layout)" in listed
    assert run("python3 records/run_log.py logs/").count(" layout)") == 7
    run("python3 records/audit.py records/track_10min_16mb/<a record>/", {"<a record>": official.name})
    run("python3 records/audit.py records/track_10min_16mb/<your record>/ --compare-to "
        "records/track_10min_16mb/<the best>/", {"<your record>": ours.name, "<the best>": official.name})
    table = run("python3 records/audit.py --table --claims records/published_claims.txt <folder>...",
                {"<folder>...": f"records/track_10min_16mb/{ours.name}/ records/track_10min_16mb/{official.name}/"})
    assert ours.name in table and official.name in table
    run("python3 records/compare_runs.py --a logs/base_seed*.txt --b logs/idea_seed*.txt")
    run("python3 records/compare_runs.py --a logs/base_seed*.txt --b logs/idea_seed*.txt --plot base_vs_idea.png")
    assert (clone / "base_vs_idea.png").read_bytes().startswith(b"\x89PNG")
    published = {"one": ONE_SAMPLE_SEEDS, "baseline": WELCH_BASELINE, "new": WELCH_NEW}
    for name, bpbs in published.items():
        (logs / name).mkdir()
        for seed, bpb in zip((1337, 42, 7), bpbs):
            (logs / name / f"train_seed{seed}.log").write_text(official_log(bpb, seed=None))
    three = " ".join(f"logs/one/train_seed{seed}.log" for seed in (1337, 42, 7))
    one_sample = run(f"python3 records/compare_runs.py --a {RECORD_BEFORE} --b <the three logs> --min-delta-bpb 0.005",
                     {"<the three logs>": three})
    quoted = re.search(r"prints `(one-sided, H0 improvement <= 0\.005 bpb: [^`]+)`",
                       (REPO / "records" / "README.md").read_text()).group(1)
    assert quoted in one_sample
    welch = run("python3 records/compare_runs.py --a <baseline logs or record folder> --b <new logs>",
                {"<baseline logs or record folder>": "logs/baseline/*.log", "<new logs>": "logs/new/*.log"})
    assert re.search(r"bits per byte.*t = 11\.83, df = 3\.31", welch), welch


def test_throughput_commands_run(clone, tmp_path):
    """bench/README.md's CPU example as written, and a history line of the default recipe at reduced size."""
    example = run_doc_command("PRESET=smoke DEVICE=cpu OMP_NUM_THREADS=1 BENCH_STEPS=3 BENCH_WARMUP_STEPS=1 "
                              "python3 bench/throughput.py", clone, command_env(tmp_path))
    assert json.loads(example.stdout)["bench_steps"] == 3
    env = command_env(tmp_path, **reduced_recipe(), DEVICE="cpu", BENCH_STEPS="1", BENCH_WARMUP_STEPS="0")
    run_doc_command("python3 bench/throughput.py >> bench_results.jsonl", clone, env)
    (line,) = (clone / "bench_results.jsonl").read_text().splitlines()
    assert json.loads(line)["settings"]["num_layers"] == train_gpt.PRESETS["smoke"]["num_layers"]


def test_gpu_check_dry_run_command_runs(clone, tmp_path):
    """Both forms of the dry run, each cut to its first step (`--only environment`): the steps themselves at toy
    size are tests/test_gpu_check.py's."""
    text = "python3 bench/gpu_check.py --out DIR --dry-run [--session]"
    for session, option in (("", ""), ("session", "--session")):
        out = tmp_path / f"out{session}"
        run_doc_command(text, clone, command_env(tmp_path), {"DIR": str(out), "[--session]": option},
                        extra=" --only environment")
        report = json.loads((out / "report.json").read_text())
        assert report["dry_run"] is True and report["steps"]["environment"]["status"] == "ok"


def test_model_bytes_commands_run(clone, tmp_path):
    """README's two model-byte measurements at the toy size of tests/test_bench_model_bytes.py."""
    from test_bench_model_bytes import TOY
    env = command_env(tmp_path, **TOY)
    kit = run_doc_command("python3 bench/model_bytes.py", clone, env)
    assert re.match(r"model_bytes:\d+ kit ", kit.stdout)
    if not REFERENCE_RECORD.is_dir():
        pytest.skip("--record needs ../shared/reference")
    record = run_doc_command("python3 bench/model_bytes.py --record", clone, env)
    assert re.match(r"model_bytes:\d+ record ", record.stdout)


def test_varlen_attention_command_runs(clone, tmp_path):
    """bench/README.md's timing of attention within documents, on a row of 256 tokens, one repeat."""
    env = command_env(tmp_path, ROW_TOKENS="256", DOC_TOKENS="64", REPEATS="1")
    timed = run_doc_command("OMP_NUM_THREADS=1 python3 bench/varlen_attention.py", clone, env)
    assert re.search(r"^FlexAttention compiled .* max \|difference\|", timed.stdout, re.M), timed.stdout


def test_packed_size_command_runs(clone, tmp_path):
    text = "python3 -c \"import train_gpt; print(len(train_gpt.pack_code(open('train_gpt.py','rb').read())[1]))\""
    printed = run_doc_command(text, clone, command_env(tmp_path)).stdout
    assert int(printed) == len(train_gpt.pack_code((REPO / "train_gpt.py").read_bytes())[1])
