"""data/cached_challenge_fineweb.py: the real huggingface_hub client against a local HTTP server that
serves, as a hub dataset repo, a small export made by the re-tokenizer from real FineWeb text."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest

from conftest import REPO, SHARED_DATA, read_log, run_trainer, trainer_env
from download_hf_docs_and_tokenize import TokenizerSpec, build_export

DOWNLOADER = REPO / "data" / "cached_challenge_fineweb.py"
RETOKENIZER = REPO / "data" / "download_hf_docs_and_tokenize.py"
REPO_ID = "golf/test-export"
OFFICIAL_REPO_ID, RECORDS_REPO_ID = "willdepueoai/parameter-golf", "kevclark/parameter-golf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
NUM_VAL_SHARDS, NUM_TRAIN_SHARDS = 2, 4

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (real FineWeb text)")


# ----------------------------------------------------------------------------------------------
# A hub that serves folders as repos (hub.repos: repo id -> folder): HEAD and GET on
# /datasets/<repo>/resolve/<revision>/<path>, with the headers huggingface_hub needs (X-Repo-Commit, ETag,
# Content-Length) and its error codes.

class HubHandler(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.respond(send_body=False)

    def do_GET(self):
        self.respond(send_body=True)

    def respond(self, send_body: bool) -> None:
        hub = self.server
        hub.requests.append((self.command, unquote(self.path)))
        served = [(repo_root, self.path[len(prefix):]) for repo_id, repo_root in hub.repos.items()
                  if self.path.startswith(prefix := f"/datasets/{repo_id}/resolve/")]
        if not served:
            return self.send_error_code(404, "RepoNotFound")
        repo_root, rest = served[0]
        _revision, _, filename = unquote(rest).partition("/")
        path = repo_root / filename
        if not path.is_file():
            return self.send_error_code(404, "EntryNotFound")
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def send_error_code(self, status: int, error_code: str) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", error_code)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The re-tokenizer's export of 400 FineWeb lines (sp1024 reused, byte260) with its documents file and
    sidecar: the hub's repo folder."""
    root = tmp_path_factory.mktemp("hub_repo")
    text = (SHARED_DATA / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt").read_text(encoding="utf-8")
    (root / "datasets").mkdir()
    docs = root / "datasets" / "docs_selected.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()[:400]), encoding="utf-8")
    (root / "datasets" / "docs_selected.source_manifest.json").write_text(json.dumps(
        {"docs_sha256": hashlib.sha256(docs.read_bytes()).hexdigest(), "num_docs": 400}))
    specs = [TokenizerSpec("sp_bpe_1024", "sp1024", 1024,
                           reuse_model_path=SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"),
             TokenizerSpec("pure_byte_260", "byte260", 260, kind="byte")]
    build_export(docs, root / "datasets", specs, num_val_docs=100, shard_tokens=8000)
    stats = json.loads((root / "datasets" / "manifest.json").read_text())["datasets"][0]["stats"]
    assert (stats["files_val"], stats["files_train"]) == (NUM_VAL_SHARDS, NUM_TRAIN_SHARDS)  # what the tests assume
    return root / "datasets"


@pytest.fixture(scope="module")
def records_export(tmp_path_factory) -> Path:
    """A second export, as the repo of the sp8192 records serves it: sp8192 with the published tokenizer, and an
    sp1024 of its own (120 validation documents, not 100), so that its manifest disagrees with the first's."""
    root = tmp_path_factory.mktemp("records_repo")
    text = (SHARED_DATA / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt").read_text(encoding="utf-8")
    docs = root / "docs_selected.jsonl"
    docs.write_text("".join(json.dumps({"text": line}) + "\n" for line in text.splitlines()[:400]), encoding="utf-8")
    specs = [TokenizerSpec(f"sp_bpe_{vocab}", f"sp{vocab}", vocab,
                           reuse_model_path=SHARED_DATA / "tokenizers" / f"fineweb_{vocab}_bpe.model")
             for vocab in (1024, 8192)]
    build_export(docs, root / "datasets", specs, num_val_docs=120, shard_tokens=8000)
    return root / "datasets"


@pytest.fixture
def hub(export, tmp_path):
    """A running hub over a private copy of the export (tests may break files in it), as repo REPO_ID."""
    repo_root = tmp_path / "served"
    shutil.copytree(export, repo_root / "datasets")
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.repo_root, server.requests, server.repos = repo_root, [], {REPO_ID: repo_root}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.export = repo_root / "datasets"
    yield server
    server.shutdown()
    server.server_close()


def run_downloader(endpoint: str, output_root: Path, *args: str, **env_overrides: str) -> subprocess.CompletedProcess:
    return run_tool(DOWNLOADER, endpoint, output_root, *args, **env_overrides)


def run_tool(script: Path, endpoint: str, output_root: Path, *args: str, **env_overrides: str):
    """As a user runs it; HF_ENDPOINT goes through the environment because the client reads it at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MATCHED_FINEWEB_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(output_root.parent / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               MATCHED_FINEWEB_REPO_ID=REPO_ID)
    env.update(env_overrides)
    env = {k: v for k, v in env.items() if v is not None}  # None: the variable is not set
    return subprocess.run([sys.executable, str(script), *args, "--output-root", str(output_root)],
                          env=env, capture_output=True, text=True, timeout=120)


def shard_names(split: str, count: int) -> list[str]:
    return [f"fineweb_{split}_{i:06d}.bin" for i in range(count)]


def downloaded_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def shard_gets(hub) -> list[str]:
    return [path for method, path in hub.requests if method == "GET" and path.endswith(".bin")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------

def test_full_download_is_byte_identical_to_the_export(hub, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "--train-shards", str(NUM_TRAIN_SHARDS))
    assert result.returncode == 0, result.stderr
    folder = "datasets/fineweb10B_sp1024"
    expected = sorted(["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
                      + [f"{folder}/{n}" for n in shard_names("train", NUM_TRAIN_SHARDS) + shard_names("val", 2)])
    manifest = "manifests/golf--test-export--datasets.json"  # the manifest, cached under the repo and folder
    assert downloaded_files(out) == sorted(expected + [manifest])  # no staging folder, no temporary files left
    for relpath in expected:
        assert (out / relpath).read_bytes() == (hub.export / relpath).read_bytes(), relpath
    assert (out / manifest).read_bytes() == (hub.export / "manifest.json").read_bytes()


def test_remote_folder_override_is_honoured(hub, tmp_path):
    hub.export.rename(hub.repo_root / "exports")
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "1").returncode == 1  # not under datasets/ any more
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1", MATCHED_FINEWEB_REMOTE_ROOT_PREFIX="exports")
    assert result.returncode == 0, result.stderr
    assert (out / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()


def test_summary_reports_files_bytes_and_tokens(hub, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "--train-shards", "1")
    stats = json.loads((hub.export / "manifest.json").read_text())["datasets"][0]["stats"]
    shards = [out / "datasets/fineweb10B_sp1024" / n for n in shard_names("val", 2) + shard_names("train", 1)]
    tokens = sum((p.stat().st_size - 1024) // 2 for p in shards)
    assert tokens > stats["tokens_val"]
    num_bytes = sum(p.stat().st_size for p in shards) + sum(p.stat().st_size for p in (out / "tokenizers").iterdir())
    assert f"5 files, {num_bytes:,} bytes, {tokens:,} tokens" in result.stdout


def test_train_shards_takes_a_prefix(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "--train-shards", "2").returncode == 0
    folder = out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in folder.iterdir()) == shard_names("train", 2) + shard_names("val", NUM_VAL_SHARDS)


def test_bare_number_is_the_train_shard_count(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "1").returncode == 0
    assert sorted((out / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_*.bin"))[-1].name == \
        "fineweb_train_000000.bin"


def test_byte260_variant_brings_its_json_tokenizer(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "byte260", "--train-shards", "1").returncode == 0
    assert json.loads((out / "tokenizers" / "fineweb_pure_byte_260.json").read_text()) == {
        "kind": "byte", "vocab_size": 260, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "byte_offset": 4}


def test_rerun_downloads_no_complete_file(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "2").returncode == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.bin")}
    hub.requests.clear()
    result = run_downloader(hub.url, out, "--variant", "sp1024", "2")
    assert result.returncode == 0, result.stderr
    assert [path for method, path in hub.requests if method == "GET"] == \
        [f"/datasets/{REPO_ID}/resolve/main/datasets/manifest.json"]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.bin")} == before


def test_truncated_shard_is_fetched_again(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "2").returncode == 0
    shard = out / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])  # as an interrupted copy would leave it
    hub.requests.clear()
    assert run_downloader(hub.url, out, "--variant", "sp1024", "2").returncode == 0
    assert shard_gets(hub) == [f"/datasets/{REPO_ID}/resolve/main/datasets/datasets/fineweb10B_sp1024/{shard.name}"]
    assert shard.read_bytes() == (hub.export / "datasets/fineweb10B_sp1024" / shard.name).read_bytes()


def test_corrupt_shard_on_the_hub_is_never_installed(hub, tmp_path):
    served = hub.export / "datasets/fineweb10B_sp1024/fineweb_val_000001.bin"
    served.write_bytes(served.read_bytes()[:-2])  # the header now promises one token more than the file holds
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1")
    assert result.returncode == 1
    assert "fineweb_val_000001.bin arrived corrupt" in result.stderr
    assert not (out / "datasets/fineweb10B_sp1024/fineweb_val_000001.bin").exists()
    assert not list(out.rglob("*.incomplete")) and not (out / ".hub_download").exists()


def test_too_many_train_shards_fails_before_any_shard_download(hub, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "--train-shards", "99")
    assert result.returncode == 1
    assert f"has only {NUM_TRAIN_SHARDS} training shards" in result.stderr
    assert shard_gets(hub) == [] and not (out / "datasets").exists()


def test_default_of_80_train_shards_is_checked_against_the_manifest(hub, tmp_path):
    result = run_downloader(hub.url, tmp_path / "data", "--variant", "sp1024")
    assert result.returncode == 1 and "--train-shards 80" in result.stderr


def test_unknown_variant_lists_the_existing_ones(hub, tmp_path):
    result = run_downloader(hub.url, tmp_path / "data", "--variant", "sp4096", "1")
    assert result.returncode == 1
    assert "no dataset fineweb10B_sp4096" in result.stderr and "byte260, sp1024" in result.stderr


def test_manifest_without_the_variants_tokenizer_is_reported(hub, tmp_path):
    manifest_path = hub.export / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tokenizers"] = [t for t in manifest["tokenizers"] if t["name"] != "sp_bpe_1024"]
    manifest_path.write_text(json.dumps(manifest))
    result = run_downloader(hub.url, tmp_path / "data", "--variant", "sp1024", "1")
    assert result.returncode == 1
    assert "names tokenizer 'sp_bpe_1024', which the manifest's 'tokenizers' list lacks" in result.stderr


def test_unknown_repo_names_the_repo_override(hub, tmp_path):
    result = run_downloader(hub.url, tmp_path / "data", "--variant", "sp1024", "1",
                            MATCHED_FINEWEB_REPO_ID="someone/elsewhere")
    assert result.returncode == 1
    assert "someone/elsewhere is not a dataset repo" in result.stderr and "MATCHED_FINEWEB_REPO_ID" in result.stderr


def test_file_missing_on_the_hub_is_named(hub, tmp_path):
    (hub.export / "tokenizers" / "fineweb_1024_bpe.vocab").unlink()
    result = run_downloader(hub.url, tmp_path / "data", "--variant", "sp1024", "1")
    assert result.returncode == 1
    assert "datasets/tokenizers/fineweb_1024_bpe.vocab is missing on the hub" in result.stderr


def test_server_down_names_the_endpoint_and_the_override(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_downloader(endpoint, tmp_path / "data", "--variant", "sp1024", "1")
    assert result.returncode == 1
    assert f"cannot reach the Hugging Face hub at {endpoint}" in result.stderr and "HF_ENDPOINT" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_reports_a_corrupt_shard_without_network(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "2").returncode == 0
    dead_endpoint = f"http://127.0.0.1:{free_port()}"
    assert run_downloader(dead_endpoint, out, "--variant", "sp1024", "2", "--verify").returncode == 0
    shard = out / "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:2000])
    result = run_downloader(dead_endpoint, out, "--variant", "sp1024", "2", "--verify")
    assert result.returncode == 1
    assert f"BAD {shard}: size 2000 bytes does not match" in result.stderr
    assert shard.stat().st_size == 2000  # --verify changes nothing


def test_with_docs_fetches_the_documents_and_checks_their_sha256(hub, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "byte260", "0", "--with-docs")
    assert result.returncode == 0, result.stderr
    assert (out / "docs_selected.jsonl").read_bytes() == (hub.export / "docs_selected.jsonl").read_bytes()
    with open(out / "docs_selected.jsonl", "ab") as f:
        f.write(b'{"text": "one more"}\n')
    result = run_downloader(hub.url, out, "--variant", "byte260", "0", "--with-docs", "--verify")
    assert result.returncode == 1 and "docs_selected.jsonl has sha256" in result.stderr


# ----------------------------------------------------------------------------------------------
# Each variant's default repo, the manifest cached per repo, and the published tokenizers.

@pytest.fixture
def two_repos(hub, records_export, tmp_path):
    """The hub serves the official repo (the first export: sp1024, byte260) and the records' repo (sp1024 of
    its own, sp8192) under their real names."""
    records_root = tmp_path / "records_served"
    shutil.copytree(records_export, records_root / "datasets")
    hub.repos.update({OFFICIAL_REPO_ID: hub.repo_root, RECORDS_REPO_ID: records_root})
    hub.records_export = records_root / "datasets"
    return hub


def val_split(root: Path, variant: str) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((root / f"datasets/fineweb10B_{variant}").glob("fineweb_val_*")))


def repos_asked(hub) -> set[str]:
    return {path.split("/resolve/")[0].removeprefix("/datasets/") for _, path in hub.requests}


def test_sp8192_comes_from_the_records_repo_by_default(two_repos, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(two_repos.url, out, "--variant", "sp8192", "1", MATCHED_FINEWEB_REPO_ID=None)
    assert result.returncode == 0, result.stderr
    assert val_split(out, "sp8192") == val_split(two_repos.records_export, "sp8192")
    assert repos_asked(two_repos) == {RECORDS_REPO_ID}
    assert f"reading sp8192 from dataset repo {RECORDS_REPO_ID} (the repo the sp8192 records downloaded from; " \
           f"MATCHED_FINEWEB_REPO_ID overrides)" in result.stdout


def test_sp1024_comes_from_the_official_repo_by_default(two_repos, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(two_repos.url, out, "--variant", "sp1024", "1", MATCHED_FINEWEB_REPO_ID=None)
    assert result.returncode == 0, result.stderr
    assert val_split(out, "sp1024") == val_split(two_repos.export, "sp1024") != \
        val_split(two_repos.records_export, "sp1024")
    assert repos_asked(two_repos) == {OFFICIAL_REPO_ID}
    assert f"reading sp1024 from dataset repo {OFFICIAL_REPO_ID} (the official export;" in result.stdout


def test_repo_override_wins_over_the_variants_default(two_repos, tmp_path):
    out = tmp_path / "data"
    result = run_downloader(two_repos.url, out, "--variant", "sp1024", "1", MATCHED_FINEWEB_REPO_ID=RECORDS_REPO_ID)
    assert result.returncode == 0, result.stderr
    assert val_split(out, "sp1024") == val_split(two_repos.records_export, "sp1024")
    assert repos_asked(two_repos) == {RECORDS_REPO_ID}
    assert f"reading sp1024 from dataset repo {RECORDS_REPO_ID} (set by MATCHED_FINEWEB_REPO_ID)" in result.stdout


def test_a_manifest_of_one_repo_is_never_used_for_another(two_repos, tmp_path):
    out = tmp_path / "data"
    official, records = dict(MATCHED_FINEWEB_REPO_ID=OFFICIAL_REPO_ID), dict(MATCHED_FINEWEB_REPO_ID=RECORDS_REPO_ID)
    assert run_downloader(two_repos.url, out, "--variant", "sp1024", "1", **official).returncode == 0
    assert run_downloader(two_repos.url, out, "--variant", "sp8192", "1", **records).returncode == 0
    # sp1024 is still checked against the official manifest, not the records' one fetched last
    result = run_downloader(two_repos.url, out, "--variant", "sp1024", "1", "--verify", **official)
    assert result.returncode == 0, result.stderr
    result = run_downloader(two_repos.url, out, "--variant", "sp1024", "1", "--verify",
                            MATCHED_FINEWEB_REPO_ID="someone/elsewhere")
    assert result.returncode == 1
    assert "no manifest of someone/elsewhere" in result.stderr


def test_download_names_the_published_tokenizer(hub, tmp_path):
    result = run_downloader(hub.url, tmp_path / "data", "--variant", "sp1024", "1")
    assert result.returncode == 0, result.stderr
    sha = hashlib.sha256((SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()).hexdigest()
    assert f"tokenizer: published sp1024 (tokenizers/fineweb_1024_bpe.model, sha256 {sha})" in result.stdout
    assert "WARNING" not in result.stderr


def test_trainer_logs_the_downloaded_tokenizer_as_published(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "1").returncode == 0
    dataset = SimpleNamespace(data_path=str(out / "datasets/fineweb10B_sp1024"), vocab_size=1024,
                              tokenizer_path=str(out / "tokenizers/fineweb_1024_bpe.model"))
    result = run_trainer(trainer_env(dataset, RUN_ID="published", ITERATIONS=1, VAL_LOSS_EVERY=0), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sha = hashlib.sha256((SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model").read_bytes()).hexdigest()
    assert re.search(rf"^tokenizer: published sp1024 sha256:{sha}$", read_log(tmp_path, "published"), re.M)


def test_download_warns_when_the_tokenizer_is_not_the_published_one(hub, tmp_path):
    model = hub.export / "tokenizers" / "fineweb_1024_bpe.model"
    model.write_bytes(model.read_bytes() + b"\0")
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1")
    assert result.returncode == 0, result.stderr  # a tokenizer of one's own is allowed, and named
    assert f"tokenizer: custom (sha256 {hashlib.sha256(model.read_bytes()).hexdigest()})" in result.stdout
    assert f"WARNING: {out / 'tokenizers/fineweb_1024_bpe.model'} is not the published sp1024 tokenizer" \
        in result.stderr


def test_retokenizer_fetches_the_published_documents_through_the_hub(hub, tmp_path):
    config = tmp_path / "specs.json"
    config.write_text(json.dumps({"tokenizers": [{"name": "bytes", "dataset_suffix": "byte260", "vocab_size": 260,
                                                  "kind": "byte"}]}))
    out = tmp_path / "export"
    result = run_tool(RETOKENIZER, hub.url, out, "--tokenizer-config", str(config), "--num-val-docs", "100")
    assert result.returncode == 0, result.stderr
    assert (out / "docs_selected.jsonl").read_bytes() == (hub.export / "docs_selected.jsonl").read_bytes()
    built, served = (json.loads((root / "manifest.json").read_text()) for root in (out, hub.export))
    assert built["docs_sha256"] == served["docs_sha256"]
    assert built["datasets"][0]["stats"]["tokens_val"] == served["datasets"][1]["stats"]["tokens_val"]


# ----------------------------------------------------------------------------------------------
# A manifest is data from the network: its paths stay inside the output root, and a malformed field is one
# error line that names the manifest and the field, before any file is written.

def edit_manifest(hub, edit) -> None:
    """Apply `edit` to the served manifest's JSON (a dict), in place."""
    path = hub.export / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def served_entry(manifest: dict, kind: str, name: str) -> dict:
    return next(entry for entry in manifest[kind] if entry["name"] == name)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_manifest_paths_that_leave_the_output_root_write_nothing(hub, tmp_path, escape):
    outside = tmp_path / "outside"  # a sibling of the output root
    out = tmp_path / "data"
    target = str(outside / "evil.model") if escape == "absolute" else "../outside/evil.model"
    edit_manifest(hub, lambda m: served_entry(m, "tokenizers", "sp_bpe_1024").update(model_path=target))
    served = hub.export / target.lstrip("/") if escape == "absolute" else hub.repo_root / "outside/evil.model"
    served.parent.mkdir(parents=True)  # the hub has the file, so only the downloader can refuse it
    shutil.copy(hub.export / "tokenizers/fineweb_1024_bpe.model", served)
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1")
    assert result.returncode == 1
    assert not outside.exists() and files_under(out) == []  # not even the manifest is cached
    assert shard_gets(hub) == []
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), result.stderr
    assert "tokenizer sp_bpe_1024" in error_lines[0] and "'model_path'" in error_lines[0]
    assert "outside the output root" in error_lines[0]


def test_dataset_folder_that_leaves_the_output_root_is_refused(hub, tmp_path):
    edit_manifest(hub, lambda m: served_entry(m, "datasets", "fineweb10B_sp1024").update(path="../x"))
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "dataset fineweb10B_sp1024" in result.stderr and "'path'" in result.stderr
    assert not (tmp_path / "x").exists() and files_under(out) == []


MALFORMED_FIELDS = {  # what the served manifest gets -> the field the error must name and what it says
    "files_val as a string": (lambda m: served_entry(m, "datasets", "fineweb10B_sp1024")["stats"].update(
        files_val="2"), "'stats.files_val'", "a whole number"),
    "files_train missing": (lambda m: served_entry(m, "datasets", "fineweb10B_sp1024")["stats"].pop("files_train"),
                            "'stats.files_train'", "missing"),
    "negative tokens_val": (lambda m: served_entry(m, "datasets", "fineweb10B_sp1024")["stats"].update(
        tokens_val=-5), "'stats.tokens_val'", "a whole number"),
    "stats as a list": (lambda m: served_entry(m, "datasets", "fineweb10B_sp1024").update(stats=[1, 2]),
                        "'stats'", "an object"),
    "tokenizer_name missing": (lambda m: served_entry(m, "datasets", "fineweb10B_sp1024").pop("tokenizer_name"),
                               "'tokenizer_name'", "missing"),
    "path as a number": (lambda m: served_entry(m, "datasets", "fineweb10B_sp1024").update(path=7),
                         "'path'", "a relative path"),
    "model_path as a list": (lambda m: served_entry(m, "tokenizers", "sp_bpe_1024").update(model_path=["a"]),
                             "'model_path'", "a relative path"),
    "a dataset that is a string": (lambda m: m["datasets"].insert(0, "fineweb10B_sp1024"), "'datasets[0]'",
                                   "an object"),
    "tokenizers as an object": (lambda m: m.update(tokenizers={"sp_bpe_1024": {}}), "'tokenizers'", "a list"),
    "datasets missing": (lambda m: m.pop("datasets"), "'datasets'", "missing"),
}


@pytest.mark.parametrize("case", MALFORMED_FIELDS)
def test_malformed_manifest_field_is_one_error_line_naming_it(hub, tmp_path, case):
    edit, field, problem = MALFORMED_FIELDS[case]
    edit_manifest(hub, edit)
    out = tmp_path / "data"
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert f"datasets/manifest.json of {REPO_ID}" in result.stderr  # the manifest
    assert field in result.stderr and problem in result.stderr
    assert "MATCHED_FINEWEB_REPO_ID" in result.stderr  # the fix: another export
    assert files_under(out) == []


def test_malformed_cached_manifest_is_named_by_verify(hub, tmp_path):
    out = tmp_path / "data"
    assert run_downloader(hub.url, out, "--variant", "sp1024", "1").returncode == 0
    cached = out / "manifests/golf--test-export--datasets.json"
    manifest = json.loads(cached.read_text())
    served_entry(manifest, "datasets", "fineweb10B_sp1024")["stats"]["files_val"] = None
    cached.write_text(json.dumps(manifest))
    result = run_downloader(hub.url, out, "--variant", "sp1024", "1", "--verify")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {cached}: "), result.stderr
    assert "'stats.files_val'" in result.stderr and "re-run without --verify" in result.stderr


# ----------------------------------------------------------------------------------------------
# The default variant is the trainer's.

def test_default_variant_is_where_the_trainers_defaults_look(two_repos, tmp_path):
    import train_gpt
    out = tmp_path / "data"
    result = run_downloader(two_repos.url, out, "1", MATCHED_FINEWEB_REPO_ID=None)  # no --variant
    assert result.returncode == 0, result.stderr
    defaults = train_gpt.Settings.from_env({})  # the paths the trainer reads without DATA_PATH / TOKENIZER_PATH
    served = sorted(p.name for p in (two_repos.records_export / f"datasets/fineweb10B_sp{defaults.vocab_size}").glob(
        "fineweb_val_*.bin"))
    assert sorted(p.name for p in (tmp_path / defaults.data_path).glob("fineweb_*.bin")) == \
        shard_names("train", 1) + served
    assert (tmp_path / defaults.tokenizer_path).read_bytes() == \
        (SHARED_DATA / "tokenizers" / f"fineweb_{defaults.vocab_size}_bpe.model").read_bytes()
