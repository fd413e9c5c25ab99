#!/usr/bin/env python3
"""Re-tokenize the challenge's documents into a complete export: tokenizers, shards and manifest.

    python3 data/download_hf_docs_and_tokenize.py --output-root DIR [--docs-jsonl PATH]
        [--tokenizer-config data/tokenizer_specs.json] [--num-val-docs 50000] [--shard-tokens 100000000]

DIR gets tokenizers/, datasets/fineweb10B_<suffix>/ and manifest.json: the same layout as the hub's
`datasets/` folder, so the downloader and train_gpt.py accept it. The documents come from the hub
(docs_selected.jsonl and its sidecar, fetched into DIR) or from a local --docs-jsonl file (offline).
Each document becomes BOS + its tokens; the first --num-val-docs documents form the validation
split, the rest the training split, each cut into shards of --shard-tokens tokens. The export is
checked before the manifest is written, so a directory without manifest.json is an unfinished one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when run as `python3 data/...`
from cached_challenge_fineweb import (DOCS_FILE, DOCS_SIDECAR_FILE, MANIFEST_NAME, DownloadError,  # noqa: E402
                                      HubSource, docs_digest, docs_mismatch, fetch_all, incomplete_files,
                                      probe_hub)
from shard_io import MAX_TOKEN_ID, read_shard, write_shard  # noqa: E402

DEFAULT_TOKENIZER_CONFIG = Path(__file__).resolve().parent / "tokenizer_specs.json"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BYTE260_TOKENIZER = {"kind": "byte", "vocab_size": 260, "pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
                     "unk_id": UNK_ID, "byte_offset": 4}
SPEC_SENTENCEPIECE = dict(  # the training settings of the challenge's published tokenizers
    model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, character_coverage=0.999,
)
DEFAULT_NUM_VAL_DOCS = 50_000  # the challenge's validation split: the first 50,000 documents
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 200_000  # about 1 GB of text: plenty for BPE merges, within a pod's memory
DEFAULT_BATCH_DOCS = 1024
SENTENCEPIECE_MAX_DOC_BYTES = 1 << 16  # the trainer skips longer documents (its default, 4192, skips many)


class ExportError(RuntimeError):
    """Bad input or a failed self-check; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------
# Tokenizer specs (data/tokenizer_specs.json): what to build.

@dataclass(frozen=True)
class TokenizerSpec:
    name: str  # the manifest's tokenizer name
    dataset_suffix: str  # the dataset is fineweb10B_<suffix>
    vocab_size: int
    kind: str = "sentencepiece_bpe"  # or "byte"
    reuse_model_path: Path | None = None  # an existing SentencePiece model, used as is

    def __post_init__(self):
        if self.kind not in ("sentencepiece_bpe", "byte"):
            raise ExportError(f"tokenizer {self.name}: kind must be 'sentencepiece_bpe' or 'byte', not {self.kind!r}")
        if self.kind == "byte" and self.vocab_size != BYTE260_TOKENIZER["vocab_size"]:
            raise ExportError(f"tokenizer {self.name}: the byte tokenizer has vocab_size 260")
        if not isinstance(self.vocab_size, int) or not 260 <= self.vocab_size <= MAX_TOKEN_ID + 1:
            raise ExportError(f"tokenizer {self.name}: vocab_size must be an integer from 260 (byte fallback needs "
                              f"256 byte ids and 4 specials) to {MAX_TOKEN_ID + 1} (shards hold uint16 ids)")
        if self.reuse_model_path is not None and not Path(self.reuse_model_path).is_file():
            raise ExportError(f"tokenizer {self.name}: reuse_model_path {self.reuse_model_path} does not exist")

    @property
    def dataset_name(self) -> str:
        return f"fineweb10B_{self.dataset_suffix}"

    @property
    def file_stem(self) -> str:  # its files in tokenizers/: <stem>.json, or <stem>.model and <stem>.vocab
        return "fineweb_pure_byte_260" if self.kind == "byte" else f"fineweb_{self.vocab_size}_bpe"


def load_tokenizer_specs(path: Path) -> list[TokenizerSpec]:
    """Read and check the config: {"tokenizers": [{"name", "dataset_suffix", "vocab_size", ...}, ...]}.
    A relative `reuse_model_path` is relative to the config file's folder."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))["tokenizers"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"--tokenizer-config {path}: expected a JSON object with a 'tokenizers' list ({e})") from e
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ExportError(f"--tokenizer-config {path}: 'tokenizers' must be a list of objects")
    return [tokenizer_spec_from_entry(entry, path) for entry in entries]


def check_specs_are_distinct(specs: list[TokenizerSpec]) -> None:
    """Two specs with the same name, dataset or tokenizer files would overwrite each other's output."""
    for key in ("name", "dataset_name", "file_stem"):
        values = [getattr(s, key) for s in specs]
        if len(set(values)) != len(values):
            raise ExportError(f"two tokenizers share the {key} {max(values, key=values.count)!r}; "
                              f"each tokenizer needs its own (for SentencePiece, one per vocab_size)")


def tokenizer_spec_from_entry(entry: dict, config_path: Path) -> TokenizerSpec:
    where = f"--tokenizer-config {config_path}, entry {entry!r}"
    missing = [k for k in ("name", "dataset_suffix", "vocab_size") if k not in entry]
    if missing:
        raise ExportError(f"{where}: missing {', '.join(missing)}")
    reuse = entry.get("reuse_model_path")
    try:
        return TokenizerSpec(entry["name"], entry["dataset_suffix"], entry["vocab_size"],
                             entry.get("kind", "sentencepiece_bpe"),
                             None if reuse is None else (Path(config_path).parent / reuse).resolve())
    except ExportError as e:
        raise ExportError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Documents: one JSON object with a "text" a line.

def read_documents(docs_path: Path) -> Iterator[str]:
    with open(docs_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ExportError(f"{docs_path}:{line_number}: expected a JSON object with a 'text' string "
                                  f"({type(e).__name__}: {e})") from e
            if not isinstance(text, str):
                raise ExportError(f"{docs_path}:{line_number}: 'text' is {type(text).__name__}, not a string")
            yield text


def sidecar_path_for(docs_path: Path) -> Path:
    """docs_selected.jsonl -> docs_selected.source_manifest.json, next to it."""
    return docs_path.with_name(docs_path.name.removesuffix(".jsonl") + ".source_manifest.json")


def check_documents(docs_path: Path, num_val_docs: int) -> tuple[str, int]:
    """The documents' sha256 and count, checked against the sidecar when there is one."""
    if not docs_path.is_file():
        raise ExportError(f"--docs-jsonl {docs_path} does not exist")
    digest = docs_digest(docs_path)
    mismatch = docs_mismatch(docs_path, sidecar_path_for(docs_path), digest)
    if mismatch:
        raise ExportError(f"{mismatch}: the documents file is incomplete or not the one the sidecar describes")
    if digest[1] <= num_val_docs:
        raise ExportError(f"{docs_path} has {digest[1]} documents, so --num-val-docs {num_val_docs} leaves none "
                          f"for training: lower --num-val-docs")
    return digest


# ----------------------------------------------------------------------------------------------
# Tokenizers: build or copy the files, and encode batches of documents into BOS-separated streams.

class ByteEncoder:
    """byte260: token id = UTF-8 byte + 4, over the raw text of the document."""

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        offset, bos = BYTE260_TOKENIZER["byte_offset"], np.array([BOS_ID], dtype=np.uint16)
        parts = chain.from_iterable((bos, np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16) + offset)
                                    for t in texts)
        return np.concatenate(list(parts))


class SentencePieceEncoder:
    def __init__(self, model_path: Path, num_threads: int):
        import sentencepiece as spm
        self.sp, self.num_threads = spm.SentencePieceProcessor(model_file=str(model_path)), num_threads

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        ids = self.sp.encode(texts, num_threads=self.num_threads)  # batched, in C++ threads
        total = sum(len(x) for x in ids) + len(ids)
        return np.fromiter(chain.from_iterable(chain((BOS_ID,), x) for x in ids), dtype=np.uint16, count=total)


@dataclass
class BuiltTokenizer:
    spec: TokenizerSpec
    manifest_entry: dict
    encoder: ByteEncoder | SentencePieceEncoder


def build_tokenizer(spec: TokenizerSpec, output_root: Path, training_texts, num_threads: int) -> BuiltTokenizer:
    """Write the tokenizer's files under output_root/tokenizers/ and return its encoder.
    `training_texts()` yields the documents a new SentencePiece model learns from."""
    folder = output_root / "tokenizers"
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"name": spec.name, "kind": spec.kind, "vocab_size": spec.vocab_size, "bos_id": BOS_ID, "eos_id": EOS_ID}
    if spec.kind == "byte":
        write_text_atomically(folder / f"{spec.file_stem}.json", json.dumps(BYTE260_TOKENIZER) + "\n")
        return BuiltTokenizer(spec, {**entry, "path": f"tokenizers/{spec.file_stem}.json"}, ByteEncoder())
    prefix = folder / spec.file_stem
    if spec.reuse_model_path:
        copy_sentencepiece_model(spec, prefix)
    else:
        train_sentencepiece(spec, training_texts(), prefix, num_threads)
    return BuiltTokenizer(spec, {**entry, "model_path": f"tokenizers/{prefix.name}.model",
                                 "vocab_path": f"tokenizers/{prefix.name}.vocab"},
                          SentencePieceEncoder(prefix.with_suffix(".model"), num_threads))


def train_sentencepiece(spec: TokenizerSpec, texts: Iterable[str], prefix: Path, num_threads: int) -> None:
    """Train into a temporary prefix, then rename: an interrupted training leaves no model behind."""
    import sentencepiece as spm
    tmp_prefix = prefix.with_name(prefix.name + ".training")
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_prefix),
                                       vocab_size=spec.vocab_size, num_threads=num_threads,
                                       max_sentence_length=SENTENCEPIECE_MAX_DOC_BYTES, minloglevel=2,
                                       **SPEC_SENTENCEPIECE)
    except RuntimeError as e:
        raise ExportError(f"training the {spec.name} tokenizer (vocab_size {spec.vocab_size}) failed: {e}; pick "
                          f"a vocab_size the text supports (more text, via --tokenizer-train-docs, allows more)") from e
    for suffix in (".model", ".vocab"):
        os.replace(f"{tmp_prefix}{suffix}", f"{prefix}{suffix}")


def copy_sentencepiece_model(spec: TokenizerSpec, prefix: Path) -> None:
    """Copy the reused model (and its .vocab, written from the model when it has none) under our name."""
    import sentencepiece as spm
    source = spec.reuse_model_path
    sp = spm.SentencePieceProcessor(model_file=str(source))
    ids = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    if sp.vocab_size() != spec.vocab_size or ids != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
        raise ExportError(f"reuse_model_path {source} has a vocabulary of {sp.vocab_size()} and pad/bos/eos/unk ids "
                          f"{ids}, but the {spec.name} entry needs vocab_size {spec.vocab_size} and ids (0, 1, 2, 3)")
    copy_atomically(source, prefix.with_suffix(".model"))
    if source.with_suffix(".vocab").is_file():
        copy_atomically(source.with_suffix(".vocab"), prefix.with_suffix(".vocab"))
    else:  # the format spm_train writes: piece, tab, score
        write_text_atomically(prefix.with_suffix(".vocab"), "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                                                                    for i in range(sp.vocab_size())))


def copy_atomically(source: Path, destination: Path) -> None:
    if destination.exists() and source.samefile(destination):
        return  # reusing the model already in place
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, destination)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Shards: one token stream per split, cut into files of exactly shard_tokens tokens.

class ShardWriter:
    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split = folder, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = self.num_shards = self.num_tokens = self.num_docs = 0

    def add(self, stream: np.ndarray, num_docs: int) -> None:
        self.num_docs += num_docs
        self.num_tokens += stream.size
        while stream.size:
            take = min(stream.size, self.buffer.size - self.fill)
            self.buffer[self.fill:self.fill + take] = stream[:take]
            self.fill, stream = self.fill + take, stream[take:]
            if self.fill == self.buffer.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            write_shard(self.folder / f"fineweb_{self.split}_{self.num_shards:06d}.bin", self.buffer[:self.fill])
            self.num_shards, self.fill = self.num_shards + 1, 0


def split_batches(texts: Iterable[str], num_val_docs: int, batch_docs: int) -> Iterator[tuple[str, list[str]]]:
    """(split, documents) batches in document order; no batch straddles the val/train boundary."""
    texts = iter(texts)
    for split, limit in (("val", num_val_docs), ("train", None)):
        part = islice(texts, limit)
        while batch := list(islice(part, batch_docs)):
            yield split, batch


def write_datasets(docs_path: Path, tokenizers: list[BuiltTokenizer], output_root: Path, num_val_docs: int,
                   shard_tokens: int, batch_docs: int, num_docs: int) -> dict[str, dict[str, ShardWriter]]:
    """One pass over the documents, encoding each batch with every tokenizer. On any failure, the
    shards written so far are removed: a dataset folder never holds part of an export."""
    folders = [output_root / "datasets" / tok.spec.dataset_name for tok in tokenizers]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        remove_shards(folder)  # shards of an earlier export would otherwise join this one
    writers = {tok.spec.name: {split: ShardWriter(folder, split, shard_tokens) for split in ("val", "train")}
               for tok, folder in zip(tokenizers, folders)}
    try:
        with tqdm(total=num_docs, unit="docs", desc="tokenizing", disable=not sys.stderr.isatty()) as bar:
            for split, texts in split_batches(read_documents(docs_path), num_val_docs, batch_docs):
                for tok in tokenizers:
                    stream = tok.encoder.encode_documents(texts)
                    if stream.size and int(stream.max()) >= tok.spec.vocab_size:
                        raise ExportError(f"tokenizer {tok.spec.name} produced id {int(stream.max())} >= its "
                                          f"vocab_size {tok.spec.vocab_size}")
                    writers[tok.spec.name][split].add(stream, len(texts))
                bar.update(len(texts))
        for by_split in writers.values():
            for writer in by_split.values():
                writer.flush()
    except BaseException:  # also Ctrl-C
        for folder in folders:
            remove_shards(folder)
        raise
    return writers


def remove_shards(folder: Path) -> None:
    for path in chain(folder.glob("fineweb_*.bin"), folder.glob("fineweb_*.bin.tmp")):
        path.unlink()


# ----------------------------------------------------------------------------------------------
# Self-check: read every shard back and compare with what was written.

def check_dataset(folder: Path, tok: BuiltTokenizer, writers: dict[str, ShardWriter], shard_tokens: int) -> None:
    for split, writer in writers.items():
        paths = sorted(folder.glob(f"fineweb_{split}_*.bin"))
        expected_names = [f"fineweb_{split}_{i:06d}.bin" for i in range(writer.num_shards)]
        if [p.name for p in paths] != expected_names:
            raise ExportError(f"{folder}: {split} shards are {[p.name for p in paths]}, expected {expected_names}")
        num_tokens = num_bos = 0
        for i, path in enumerate(paths):
            tokens = read_shard(path)  # checks the header against the file size
            if i < len(paths) - 1 and tokens.size != shard_tokens:
                raise ExportError(f"{path}: {tokens.size} tokens, but every shard but the last holds {shard_tokens}")
            if tokens.size and int(tokens.max()) >= tok.spec.vocab_size:
                raise ExportError(f"{path}: token id {int(tokens.max())} >= vocab_size {tok.spec.vocab_size}")
            num_tokens += tokens.size
            num_bos += int(np.count_nonzero(tokens == BOS_ID))
        if (num_tokens, num_bos) != (writer.num_tokens, writer.num_docs):
            raise ExportError(f"{folder}: {split} shards hold {num_tokens} tokens and {num_bos} documents, but "
                              f"{writer.num_tokens} tokens and {writer.num_docs} documents were written")


def dataset_entry(tok: BuiltTokenizer, writers: dict[str, ShardWriter], shard_tokens: int) -> dict:
    val, train = writers["val"], writers["train"]
    return {"name": tok.spec.dataset_name, "tokenizer_name": tok.spec.name, "vocab_size": tok.spec.vocab_size,
            "bos_id": BOS_ID, "eos_id": EOS_ID, "path": f"datasets/{tok.spec.dataset_name}",
            "shard_tokens": shard_tokens,
            "stats": {"files_train": train.num_shards, "files_val": val.num_shards, "tokens_train": train.num_tokens,
                      "tokens_val": val.num_tokens, "docs_train": train.num_docs, "docs_val": val.num_docs}}


# ----------------------------------------------------------------------------------------------
# The whole export.

def build_export(docs_path: Path, output_root: Path, specs: list[TokenizerSpec],
                 num_val_docs: int = DEFAULT_NUM_VAL_DOCS, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 tokenizer_train_docs: int = DEFAULT_TOKENIZER_TRAIN_DOCS, batch_docs: int = DEFAULT_BATCH_DOCS,
                 num_threads: int | None = None) -> dict:
    """Tokenizers, shards and manifest under output_root; returns the manifest."""
    if num_val_docs < 1 or shard_tokens < 1 or batch_docs < 1 or tokenizer_train_docs < 1:
        raise ExportError("--num-val-docs, --shard-tokens, --batch-docs and --tokenizer-train-docs must be >= 1")
    check_specs_are_distinct(specs)
    num_threads = num_threads or os.cpu_count() or 1
    output_root.mkdir(parents=True, exist_ok=True)
    (output_root / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest until the new export has passed its checks
    docs_sha256, num_docs = check_documents(docs_path, num_val_docs)

    def training_texts() -> Iterator[str]:  # training documents only: validation text must not shape the tokenizer
        return islice(read_documents(docs_path), num_val_docs, num_val_docs + tokenizer_train_docs)

    tokenizers = [build_tokenizer(spec, output_root, training_texts, num_threads) for spec in specs]
    writers = write_datasets(docs_path, tokenizers, output_root, num_val_docs, shard_tokens, batch_docs, num_docs)
    for tok in tokenizers:
        check_dataset(output_root / "datasets" / tok.spec.dataset_name, tok, writers[tok.spec.name], shard_tokens)
    manifest = {"version": 1, "docs_sha256": docs_sha256, "num_docs": num_docs, "num_val_docs": num_val_docs,
                "shard_tokens": shard_tokens, "tokenizers": [tok.manifest_entry for tok in tokenizers],
                "datasets": [dataset_entry(tok, writers[tok.spec.name], shard_tokens) for tok in tokenizers]}
    write_text_atomically(output_root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def fetch_published_documents(output_root: Path) -> Path:
    """docs_selected.jsonl and its sidecar from the hub into output_root, where the hub keeps them too."""
    source = HubSource.from_env()
    output_root.mkdir(parents=True, exist_ok=True)
    probe_hub(source)
    fetch_all(source, output_root, incomplete_files(output_root, [DOCS_FILE, DOCS_SIDECAR_FILE]))
    return output_root / DOCS_FILE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", type=Path, required=True,
                        help="the export's folder: tokenizers/, datasets/, manifest.json")
    parser.add_argument("--docs-jsonl", type=Path, help="a local documents file (offline); default: fetch "
                        f"{DOCS_FILE} from the hub into --output-root")
    parser.add_argument("--tokenizer-config", type=Path, default=DEFAULT_TOKENIZER_CONFIG,
                        help="JSON list of tokenizers to build (default: data/tokenizer_specs.json)")
    parser.add_argument("--num-val-docs", type=int, default=DEFAULT_NUM_VAL_DOCS,
                        help="the first documents, which form the validation split")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (the last of a split is shorter)")
    parser.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS,
                        help="training documents a new SentencePiece model learns from")
    parser.add_argument("--batch-docs", type=int, default=DEFAULT_BATCH_DOCS, help="documents encoded per batch")
    parser.add_argument("--threads", type=int, default=None, help="encoding/training threads (default: all cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        specs = load_tokenizer_specs(args.tokenizer_config)
        docs_path = args.docs_jsonl or fetch_published_documents(args.output_root)
        manifest = build_export(docs_path, args.output_root, specs, args.num_val_docs, args.shard_tokens,
                                args.tokenizer_train_docs, args.batch_docs, args.threads)
    except (ExportError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for dataset in manifest["datasets"]:
        stats = dataset["stats"]
        print(f"{args.output_root / dataset['path']}: {stats['files_val']} val shards ({stats['tokens_val']:,} tokens, "
              f"{stats['docs_val']:,} docs), {stats['files_train']} train shards ({stats['tokens_train']:,} tokens, "
              f"{stats['docs_train']:,} docs)")
    print(f"manifest: {args.output_root / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
