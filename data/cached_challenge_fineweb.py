#!/usr/bin/env python3
"""Download the challenge's FineWeb export from the Hugging Face hub, verified and resumable.

    python3 data/cached_challenge_fineweb.py [--variant sp8192] [--train-shards N | N] [--with-docs] [--verify]

Each variant has a default repo (VARIANT_REPO_IDS: sp1024 and byte260 from the official export, sp4096
and sp8192 from the repo their records used); MATCHED_FINEWEB_REPO_ID overrides it. That repo's
manifest.json decides what exists: the variant (default sp8192, the one train_gpt.py reads by default)
must be one of its datasets and --train-shards a count it has. Every path the manifest gives must stay
inside the output root, and every field it needs must be there with the right type, or the tool stops
with one error line before it caches the manifest or writes anything else. Files land in
data/datasets/fineweb10B_<variant>/, data/tokenizers/ and the manifest in
data/manifests/<owner>--<repo>--<folder>.json, one per repo and folder, so no manifest serves another
repo (--output-root moves them). A re-run skips complete files (a shard is complete when its header and
size agree) and fetches missing, partial or corrupt ones again; every file arrives under a temporary
name and is renamed, so no interrupted run leaves a file that looks complete. The tokenizer is checked
against the published ones' sha256 (train_gpt.py's PUBLISHED_TOKENIZERS). See data/README.md for the
environment overrides (HF_ENDPOINT, MATCHED_FINEWEB_REPO_ID, MATCHED_FINEWEB_REMOTE_ROOT_PREFIX).
"""
from __future__ import annotations

import argparse
import ast
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shard_io, also when run as `python3 data/...`
from shard_io import read_shard_header, shard_bytes  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parent
TRAINER = DATA_ROOT.parent / "train_gpt.py"  # holds the published tokenizers' sha256 (PUBLISHED_TOKENIZERS)
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"  # the official export
RECORDS_REPO_ID = "kevclark/parameter-golf"
# Where each variant is published. The official export has sp1024 and byte260; the records that introduced
# sp4096 and sp8192 downloaded them with MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf (their READMEs).
VARIANT_REPO_IDS = {"sp1024": DEFAULT_REPO_ID, "byte260": DEFAULT_REPO_ID,
                    "sp4096": RECORDS_REPO_ID, "sp8192": RECORDS_REPO_ID}
DEFAULT_REMOTE_PREFIX = "datasets"
DEFAULT_TRAIN_SHARDS = 80
MANIFEST_NAME = "manifest.json"
MANIFESTS_DIR = "manifests"  # in the output root: one cached manifest per repo and folder
DOCS_FILE = "docs_selected.jsonl"
DOCS_SIDECAR_FILE = "docs_selected.source_manifest.json"
STAGING_DIR_NAME = ".hub_download"  # inside the output root, so the final rename stays on one disk
DEFAULT_VARIANT = "sp8192"  # the trainer's default (VOCAB_SIZE=8192 reads fineweb10B_sp8192)
T = TypeVar("T")


class DownloadError(RuntimeError):
    """A failure the user can act on; the message says what went wrong and what to do."""


# ----------------------------------------------------------------------------------------------
# The hub: where the export lives and how the client's errors read to a user.

@dataclass(frozen=True)
class HubSource:
    repo_id: str
    prefix: str  # the repo folder that mirrors the local output root
    reason: str = ""  # why this repo: the override, or the variant's default

    @classmethod
    def from_env(cls) -> HubSource:
        """The repo MATCHED_FINEWEB_REPO_ID names, else the official export."""
        return cls.for_variant(None)

    @classmethod
    def for_variant(cls, variant: str | None) -> HubSource:
        """The repo MATCHED_FINEWEB_REPO_ID names, else the variant's default (VARIANT_REPO_IDS)."""
        prefix = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_PREFIX).strip("/")
        if override := os.environ.get("MATCHED_FINEWEB_REPO_ID", "").strip():
            return cls(override, prefix, "set by MATCHED_FINEWEB_REPO_ID")
        repo_id = VARIANT_REPO_IDS.get(variant, DEFAULT_REPO_ID)
        if repo_id != DEFAULT_REPO_ID:
            why = f"the repo the {variant} records downloaded from"
        elif variant is None or variant in VARIANT_REPO_IDS:
            why = "the official export"
        else:
            why = f"the official export, as the kit knows no other source for {variant}"
        return cls(repo_id, prefix, f"{why}; MATCHED_FINEWEB_REPO_ID overrides")

    def remote_path(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def describe(self) -> str:
        return f"dataset repo {self.repo_id}, folder '{self.prefix}/', at {hub_endpoint()}"

    def manifest_path(self, root: Path) -> Path:
        """Where this repo's manifest is cached: a manifest of one repo never answers for another."""
        return root / MANIFESTS_DIR / (f"{self.repo_id}/{self.prefix}".strip("/").replace("/", "--") + ".json")


def hub_endpoint() -> str:
    from huggingface_hub import constants  # the client reads HF_ENDPOINT when it is imported
    return constants.ENDPOINT


@contextmanager
def explained_hub_errors(source: HubSource, relpath: str):
    """Turn the client's exceptions into messages that name the endpoint, the file and the fix."""
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    remote = source.remote_path(relpath)
    try:
        yield
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise DownloadError(f"{source.repo_id} is not a dataset repo on {hub_endpoint()} (or it is private): "
                            f"set MATCHED_FINEWEB_REPO_ID to the repo that holds the export") from e
    except LocalEntryNotFoundError as e:  # how hf_hub_download reports a hub it could not reach
        raise DownloadError(unreachable_message(e)) from e
    except EntryNotFoundError as e:
        raise DownloadError(f"{remote} is missing on the hub ({source.describe()}); if the export sits in another "
                            f"folder or repo, set MATCHED_FINEWEB_REMOTE_ROOT_PREFIX / MATCHED_FINEWEB_REPO_ID") from e
    except HfHubHTTPError as e:
        raise DownloadError(f"the hub at {hub_endpoint()} refused {remote}: {e}") from e
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DownloadError(f"disk full while downloading {remote}: free some space or pass --output-root "
                                f"on a bigger disk, then re-run (complete files are kept)") from e
        if is_network_error(e):
            raise DownloadError(unreachable_message(e)) from e
        raise


def is_network_error(error: BaseException) -> bool:
    """A connection or timeout error, of Python or of the HTTP library under the client (httpx2, httpx or
    requests, depending on its version), as opposed to a local failure that should keep its traceback."""
    return any(isinstance(e, (ConnectionError, TimeoutError, socket.gaierror))
               or type(e).__module__.split(".")[0] in ("httpx2", "httpx", "requests", "urllib3")
               for e in (error, error.__cause__) if e is not None)


def unreachable_message(error: BaseException) -> str:
    cause = error.__cause__ or error
    return (f"cannot reach the Hugging Face hub at {hub_endpoint()} ({type(cause).__name__}: {cause}); check the "
            f"network, or point HF_ENDPOINT at a reachable mirror (e.g. HF_ENDPOINT=https://hf-mirror.com)")


def probe_hub(source: HubSource) -> None:
    """One metadata request without retries, so an unreachable hub fails at once rather than after
    the client's back-off."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    with explained_hub_errors(source, MANIFEST_NAME):
        get_hf_file_metadata(hf_hub_url(source.repo_id, source.remote_path(MANIFEST_NAME), repo_type="dataset"))


class _ByteFeed:
    """Stands in for the client's per-file progress bar and feeds its byte counts into our overall bar
    (the hook huggingface_hub's own snapshot_download uses)."""

    def __init__(self, overall, **_):
        self.overall = overall

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.overall.update(n)

    def close(self):
        pass


def fetch_file(source: HubSource, relpath: str, root: Path, byte_bar, destination: Path | None = None,
               accept: Callable[[Path], T] | None = None) -> T | None:
    """Download `relpath` of the export to `destination` (default root/relpath): into a staging folder
    first, checked, then renamed. `accept` reads the staged file before the rename (its result is returned):
    what it refuses leaves the destination as it was."""
    staging = root / STAGING_DIR_NAME
    try:
        for attempt in (1, 2):
            staged = download_to_staging(source, relpath, staging, byte_bar)
            problem = file_problem(staged, relpath)
            if problem is None:
                break
            if attempt == 2:
                raise DownloadError(f"{source.remote_path(relpath)} arrived corrupt twice ({problem}); "
                                    f"the copy on the hub may be broken ({source.describe()})")
        accepted = accept(staged) if accept else None
        destination = destination or root / relpath
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, destination)
        return accepted
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_to_staging(source: HubSource, relpath: str, staging: Path, byte_bar) -> Path:
    from huggingface_hub import hf_hub_download
    shutil.rmtree(staging, ignore_errors=True)  # an empty staging folder makes the client fetch afresh
    with explained_hub_errors(source, relpath):
        return Path(hf_hub_download(repo_id=source.repo_id, filename=source.remote_path(relpath),
                                    repo_type="dataset", local_dir=staging,
                                    tqdm_class=partial(_ByteFeed, byte_bar)))


# ----------------------------------------------------------------------------------------------
# The manifest: which files make up a variant.

class MalformedManifest(DownloadError):
    """A manifest field the downloader cannot use: the message names the manifest and the field, and the caller
    adds the fix (another export, or fetching the manifest again)."""


def is_relative_path_inside(value) -> bool:
    """Whether <output root>/<value> stays inside the output root, whatever the root (no absolute path, no '..',
    which the hub's client refuses as well)."""
    return (isinstance(value, str) and value != "" and "\0" not in value and not value.startswith("/")
            and ".." not in value.split("/"))


FIELD_KINDS = {  # what a field of each kind must hold, and how the error says it
    "count": (lambda v: type(v) is int and v >= 0, "a whole number, 0 or more"),  # not a bool, float or string
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "path": (is_relative_path_inside, "a relative path without '..' (no path may lead outside the output root)"),
}


@dataclass(frozen=True)
class ManifestEntry:
    """An object of the manifest (the manifest itself, a dataset, a tokenizer, stats) whose fields are read
    checked: a missing or malformed field is a MalformedManifest, never a traceback or a file outside the root."""
    values: dict
    manifest_name: str  # the manifest as the user can find it: its cache file, or its place on the hub
    where: str = ""  # "dataset fineweb10B_sp1024, " or "" for the manifest's own fields
    prefix: str = ""  # "stats." for the fields of a dataset's stats

    def field(self, key: str, kind: str, required: bool = True):
        """The value of `key`, of the given kind (FIELD_KINDS); None when an optional field is absent, null or
        empty (as the official downloader reads them)."""
        value = self.values.get(key)
        if value in (None, "") and not required:
            return None
        if key not in self.values:
            raise self.malformed(f"{self.where}field '{self.prefix}{key}' is missing")
        holds, expected = FIELD_KINDS[kind]
        if not holds(value):
            raise self.malformed(f"{self.where}field '{self.prefix}{key}' is {brief(value)}, not {expected}")
        return value

    def entries(self, key: str, what: str) -> list[ManifestEntry]:
        """The objects of the list `key`, each named `what` in errors (by its "name" field once it is read)."""
        items = self.field(key, "list")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise self.malformed(f"field '{key}[{i}]' is {brief(item)}, not {FIELD_KINDS['object'][1]}")
        return [ManifestEntry(item, self.manifest_name, f"{what} {readable(item.get('name'))}, ") for item in items]

    def nested(self, key: str) -> ManifestEntry:
        return ManifestEntry(self.field(key, "object"), self.manifest_name, self.where, f"{self.prefix}{key}.")

    def malformed(self, problem: str) -> MalformedManifest:
        return MalformedManifest(f"{self.manifest_name}: {problem}")


def readable(name) -> str:
    """An entry's name as it is when it is a plain one, else as the manifest writes it."""
    return name if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 60 else brief(name)


def brief(value) -> str:
    """A field's value as the manifest writes it, on one short line."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_manifest(path: Path, manifest_name: str) -> ManifestEntry:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MalformedManifest(f"{manifest_name}: cannot read it as JSON ({e})") from e
    if not isinstance(values, dict):
        raise MalformedManifest(f"{manifest_name}: is {brief(values)}, not an object with a 'datasets' list")
    return ManifestEntry(values, manifest_name)


def find_dataset(manifest: ManifestEntry, variant: str) -> ManifestEntry:
    name = f"fineweb10B_{variant}"
    datasets = manifest.entries("datasets", "dataset")
    for dataset in datasets:
        if dataset.values.get("name") == name:
            return dataset
    known = sorted(n.removeprefix("fineweb10B_") for d in datasets if isinstance(n := d.values.get("name"), str))
    raise DownloadError(f"--variant {variant}: {manifest.manifest_name} has no dataset {name}; "
                        f"variants that exist: {', '.join(known) or 'none'}")


def find_tokenizer(manifest: ManifestEntry, dataset: ManifestEntry) -> ManifestEntry:
    name = dataset.field("tokenizer_name", "name")
    for tokenizer in manifest.entries("tokenizers", "tokenizer"):
        if tokenizer.values.get("name") == name:
            return tokenizer
    raise DownloadError(f"{manifest.manifest_name}: dataset {dataset.values['name']} names tokenizer {name!r}, "
                        f"which the manifest's 'tokenizers' list lacks")


TOKENIZER_FILE_FIELDS = ("model_path", "vocab_path", "path")  # SentencePiece model and vocabulary, or a JSON file
STATS_COUNTS = {"files_train": True, "files_val": True, "tokens_train": False, "tokens_val": False}  # required?


@dataclass
class VariantFiles:
    name: str  # the dataset's name in the manifest, fineweb10B_<variant>
    stats: dict[str, int]  # the manifest's STATS_COUNTS that it gives
    val_shards: list[str]  # paths relative to the output root, as on the hub under the prefix
    train_shards: list[str]
    other_files: list[str]  # tokenizer files, and the documents when asked for
    tokenizer_model: str | None  # the SentencePiece model among them (None for the byte tokenizer)

    @property
    def all(self) -> list[str]:
        return self.val_shards + self.train_shards + self.other_files


def variant_files(manifest: ManifestEntry, variant: str, train_shards: int, with_docs: bool) -> VariantFiles:
    """The files of the variant, every one of them a path inside the output root, from the manifest's checked
    fields."""
    dataset = find_dataset(manifest, variant)
    name = dataset.values["name"]
    stats_entry = dataset.nested("stats")
    stats = {key: value for key, required in STATS_COUNTS.items()
             if (value := stats_entry.field(key, "count", required)) is not None}
    if train_shards > stats["files_train"]:
        raise DownloadError(f"--train-shards {train_shards}: {name} has only {stats['files_train']} training "
                            f"shards; ask for at most {stats['files_train']}")
    folder = dataset.field("path", "path", required=False) or f"datasets/{dataset.field('name', 'path')}"
    tokenizer = find_tokenizer(manifest, dataset)
    tokenizer_files = {key: path for key in TOKENIZER_FILE_FIELDS
                       if (path := tokenizer.field(key, "path", required=False))}
    if not tokenizer_files:
        raise tokenizer.malformed(f"{tokenizer.where}no field names a file ({', '.join(TOKENIZER_FILE_FIELDS)})")
    return VariantFiles(name, stats,
                        [f"{folder}/fineweb_val_{i:06d}.bin" for i in range(stats["files_val"])],
                        [f"{folder}/fineweb_train_{i:06d}.bin" for i in range(train_shards)],
                        list(tokenizer_files.values()) + ([DOCS_FILE, DOCS_SIDECAR_FILE] if with_docs else []),
                        tokenizer_files.get("model_path"))


def is_shard(relpath: str) -> bool:
    return Path(relpath).name.startswith("fineweb_") and relpath.endswith(".bin")


def file_problem(path: Path, relpath: str) -> str | None:
    """Why the file at `path` is not a complete copy of `relpath` (naming the file), or None. Files other
    than shards only ever appear by rename, so being there means being complete."""
    if not path.is_file():
        return f"{path}: missing"
    if is_shard(relpath):
        try:
            read_shard_header(path)
        except ValueError as e:
            return str(e)
    return None


def estimated_shard_bytes(files: VariantFiles, relpaths: list[str]) -> int:
    """Bytes of the given shards from the manifest's averages (exact for full shards)."""
    total = 0
    wanted = set(relpaths)
    for split, shards in (("val", files.val_shards), ("train", files.train_shards)):
        count = len(wanted.intersection(shards))
        if count:
            total += count * shard_bytes(files.stats.get(f"tokens_{split}", 0) // files.stats[f"files_{split}"])
    return total


def check_free_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise DownloadError(f"the shards to download need about {data_size(needed)} but {root} has "
                            f"{data_size(free)} free: free some space, ask for fewer --train-shards, "
                            f"or pass --output-root on a bigger disk")


def data_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:,} bytes"


def check_writable(root: Path) -> None:
    """Fail at once, naming the folder, rather than with a traceback from deep in the client."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise DownloadError(f"cannot write to {root} ({e}): pass --output-root a folder you can write") from e


# ----------------------------------------------------------------------------------------------
# The documents file and its sidecar (shared with the re-tokenizer).

def docs_digest(path: Path) -> tuple[str, int]:
    """sha256 and line count of a documents file, read in chunks (the published one is tens of GB)."""
    sha, lines, last = hashlib.sha256(), 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return sha.hexdigest(), lines + (last != b"\n")


def docs_mismatch(docs_path: Path, sidecar_path: Path, digest: tuple[str, int]) -> str | None:
    """Where the documents disagree with the `docs_sha256` / `num_docs` their sidecar gives, or None."""
    if not sidecar_path.is_file():
        return None
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    sha, num_docs = digest
    if sidecar.get("docs_sha256") not in (None, sha):
        return f"{docs_path} has sha256 {sha} but {sidecar_path} says {sidecar['docs_sha256']}"
    if sidecar.get("num_docs") not in (None, num_docs):
        return f"{docs_path} has {num_docs} documents but {sidecar_path} says {sidecar['num_docs']}"
    return None


# ----------------------------------------------------------------------------------------------
# The two modes: download what is missing, or only check what is on disk.

def incomplete_files(root: Path, relpaths: list[str]) -> list[str]:
    return [p for p in relpaths if file_problem(root / p, p) is not None]


def fetch_all(source: HubSource, root: Path, relpaths: list[str]) -> None:
    """Fetch the files one after the other under one progress bar over files and bytes."""
    with tqdm(unit="B", unit_scale=True, bar_format="{desc}{n_fmt}B [{elapsed}, {rate_fmt}]",
              disable=not relpaths or not sys.stderr.isatty()) as bar:
        for i, relpath in enumerate(relpaths):
            bar.set_description(f"files {i}/{len(relpaths)}")
            fetch_file(source, relpath, root, bar)
        bar.set_description(f"files {len(relpaths)}/{len(relpaths)}")


def download(source: HubSource, root: Path, variant: str, train_shards: int, with_docs: bool) -> None:
    check_writable(root)
    probe_hub(source)
    hub_manifest = f"{source.remote_path(MANIFEST_NAME)} of {source.repo_id} at {hub_endpoint()}"
    fix = ("nothing was downloaded; set MATCHED_FINEWEB_REPO_ID (or MATCHED_FINEWEB_REMOTE_ROOT_PREFIX) to an "
           "export whose manifest is well formed")
    # Fetched afresh (it decides everything else) and cached only once its fields are checked.
    files = fetch_file(source, MANIFEST_NAME, root, tqdm(disable=True), destination=source.manifest_path(root),
                       accept=lambda staged: read_variant(staged, hub_manifest, fix, variant, train_shards, with_docs))
    missing = incomplete_files(root, files.all)
    check_free_space(root, estimated_shard_bytes(files, missing))
    fetch_all(source, root, missing)
    print(f"downloaded {len(missing)} files ({sum((root / p).stat().st_size for p in missing):,} bytes) from "
          f"{source.describe()}; {len(files.all) - len(missing)} were already complete")


def read_variant(manifest_path: Path, manifest_name: str, fix: str, variant: str, train_shards: int,
                 with_docs: bool) -> VariantFiles:
    """The variant's files by the manifest at `manifest_path`, which errors name `manifest_name` (and, for a
    malformed one, `fix`)."""
    try:
        return variant_files(load_manifest(manifest_path, manifest_name), variant, train_shards, with_docs)
    except MalformedManifest as e:
        raise DownloadError(f"{e}; {fix}") from e


def check_on_disk(source: HubSource, root: Path, variant: str, train_shards: int,
                  with_docs: bool) -> tuple[VariantFiles, list[str]]:
    """The variant's files under `root` and every problem with them, by the source's cached manifest, without
    touching the network."""
    manifest_path = source.manifest_path(root)
    if not manifest_path.is_file():
        raise DownloadError(f"no manifest of {source.repo_id} at {manifest_path}: download first (without "
                            f"--verify), or set MATCHED_FINEWEB_REPO_ID to the repo the files came from")
    files = read_variant(manifest_path, str(manifest_path), "re-run without --verify to fetch it again", variant,
                         train_shards, with_docs)
    problems = [problem for p in files.all if (problem := file_problem(root / p, p))]
    if not problems:
        problems += split_total_problems(root, files)
    if with_docs and not problems:
        mismatch = docs_mismatch(root / DOCS_FILE, root / DOCS_SIDECAR_FILE, docs_digest(root / DOCS_FILE))
        problems += [mismatch] if mismatch else []
    return files, problems


def split_total_problems(root: Path, files: VariantFiles) -> list[str]:
    """A split downloaded whole must hold the manifest's token count (catches shards of another export)."""
    problems = []
    for split, shards in (("val", files.val_shards), ("train", files.train_shards)):
        expected = files.stats.get(f"tokens_{split}")
        if expected is None or len(shards) != files.stats[f"files_{split}"]:
            continue
        found = sum(read_shard_header(root / p) for p in shards)
        if found != expected:
            problems.append(f"{split} shards of {files.name} hold {found:,} tokens but the manifest "
                            f"says {expected:,}: they come from another export; delete them and re-run")
    return problems


def published_tokenizers(trainer: Path = TRAINER) -> dict[str, str] | None:
    """sha256 -> name of the published tokenizers, read from train_gpt.py's table without importing it (torch);
    None without that file (the data tools may run on their own, before the kit is on a pod)."""
    if not trainer.is_file():
        return None
    for node in ast.parse(trainer.read_bytes()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PUBLISHED_TOKENIZERS" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def tokenizer_check(root: Path, files: VariantFiles, variant: str) -> tuple[str, str | None]:
    """A line naming the variant's SentencePiece model as published or custom, and a warning when the variant
    has a published tokenizer but this file is not it (scores made with it are not comparable with records)."""
    sha = hashlib.sha256((root / files.tokenizer_model).read_bytes()).hexdigest()
    published = published_tokenizers()
    if published is None:
        return f"tokenizer: sha256 {sha}, not checked: no train_gpt.py with PUBLISHED_TOKENIZERS at {TRAINER}", None
    if sha in published:
        return f"tokenizer: published {published[sha]} ({files.tokenizer_model}, sha256 {sha})", None
    line = f"tokenizer: custom (sha256 {sha}): {files.tokenizer_model}"
    if variant not in published.values():
        return line, None
    return line, (f"WARNING: {root / files.tokenizer_model} is not the published {variant} tokenizer: scores made "
                  f"with it are not comparable with the records'; unless you meant to use your own, delete it and "
                  f"download again from {VARIANT_REPO_IDS.get(variant, DEFAULT_REPO_ID)} (MATCHED_FINEWEB_REPO_ID "
                  f"unset)")


def summary(root: Path, files: VariantFiles) -> str:
    val_tokens = sum(read_shard_header(root / p) for p in files.val_shards)
    train_tokens = sum(read_shard_header(root / p) for p in files.train_shards)
    num_bytes = sum((root / p).stat().st_size for p in files.all)
    return (f"{files.name}: {len(files.all)} files, {num_bytes:,} bytes, {val_tokens + train_tokens:,} "
            f"tokens ({len(files.val_shards)} val shards {val_tokens:,}, {len(files.train_shards)} train shards "
            f"{train_tokens:,}) in {root}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_shards_positional", nargs="?", type=non_negative_int, metavar="N",
                        help="same as --train-shards N (the official script's form)")
    parser.add_argument("--variant", default=DEFAULT_VARIANT,
                        help=f"sp<VOCAB> or byte260, as the manifest lists them (default {DEFAULT_VARIANT}: the "
                             f"trainer's)")
    parser.add_argument("--train-shards", type=non_negative_int, default=None,
                        help=f"how many training shards, a prefix (default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl and its sidecar")
    parser.add_argument("--verify", action="store_true", help="check the files on disk; download nothing")
    parser.add_argument("--output-root", type=Path, default=DATA_ROOT, help="where files land (default: data/)")
    args = parser.parse_args(argv)
    if args.train_shards is not None and args.train_shards_positional is not None:
        parser.error("give the number of training shards once, either as N or as --train-shards N")
    args.train_shards = next((n for n in (args.train_shards, args.train_shards_positional) if n is not None),
                             DEFAULT_TRAIN_SHARDS)
    return args


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of shards (0 or more), got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = HubSource.for_variant(args.variant)
    print(f"{'verifying' if args.verify else 'reading'} {args.variant} "
          f"{'against the manifest of' if args.verify else 'from'} dataset repo {source.repo_id} ({source.reason})")
    try:
        if not args.verify:
            download(source, args.output_root, args.variant, args.train_shards, args.with_docs)
        files, problems = check_on_disk(source, args.output_root, args.variant, args.train_shards, args.with_docs)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s); run without --verify to fetch those files again", file=sys.stderr)
        return 1
    print(("verified " if args.verify else "") + summary(args.output_root, files))
    if files.tokenizer_model:  # the byte tokenizer has nothing to check
        line, warning = tokenizer_check(args.output_root, files, args.variant)
        print(line)
        if warning:
            print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
