"""data/download_hf_docs_and_tokenize.py on real FineWeb text, with the published sp1024 model reused.
Expected token streams come from sentencepiece and Python's UTF-8 encoder directly."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, read_log, run_trainer, trainer_env
from download_hf_docs_and_tokenize import (DEFAULT_TOKENIZER_CONFIG, ExportError, TokenizerSpec, build_export,
                                           load_tokenizer_specs)

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (real FineWeb text)")

FINEWEB_TEXT = SHARED_DATA / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt"
SP1024_MODEL = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"
NUM_VAL_DOCS, SHARD_TOKENS = 500, 50_000


def fineweb_documents(limit: int | None = None) -> list[str]:
    """The sample has no document separators; each line serves as one document."""
    return [line for line in FINEWEB_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]


def write_docs_jsonl(docs: list[str], path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def sp1024_spec() -> TokenizerSpec:
    return TokenizerSpec("sp_bpe_1024", "sp1024", 1024, reuse_model_path=SP1024_MODEL)


def read_split(folder: Path, split: str) -> np.ndarray:
    """Tokens of a split, read with numpy from the format in SPEC.md (not with the code under test)."""
    parts = []
    for path in sorted(folder.glob(f"fineweb_{split}_*.bin")):
        header = np.fromfile(path, dtype="<i4", count=256)
        assert (header[0], header[1]) == (20240520, 1) and path.stat().st_size == 1024 + 2 * header[2]
        parts.append(np.fromfile(path, dtype="<u2", offset=1024))
    return np.concatenate(parts)


def bos_stream(token_lists) -> np.ndarray:
    return np.concatenate([np.concatenate(([1], t)) for t in token_lists]).astype(np.uint16)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("export")
    docs = fineweb_documents()
    docs_path = write_docs_jsonl(docs, root / "docs.jsonl")
    specs = [sp1024_spec(), TokenizerSpec("pure_byte_260", "byte260", 260, kind="byte")]
    manifest = build_export(docs_path, root / "out", specs, num_val_docs=NUM_VAL_DOCS, shard_tokens=SHARD_TOKENS)
    return SimpleNamespace(root=root / "out", docs=docs, manifest=manifest,
                           sp1024=root / "out/datasets/fineweb10B_sp1024",
                           byte260=root / "out/datasets/fineweb10B_byte260")


def test_sp1024_tokens_equal_a_direct_sentencepiece_encode_with_bos_per_document(export):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(SP1024_MODEL))
    expected = bos_stream(np.array(sp.encode(d), dtype=np.int64) for d in export.docs)
    found = np.concatenate([read_split(export.sp1024, "val"), read_split(export.sp1024, "train")])
    np.testing.assert_array_equal(found, expected)


def test_byte260_tokens_are_the_utf8_bytes_plus_four(export):
    expected = bos_stream(np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int64) + 4 for d in export.docs)
    found = np.concatenate([read_split(export.byte260, "val"), read_split(export.byte260, "train")])
    np.testing.assert_array_equal(found, expected)


def test_validation_split_is_the_first_num_val_docs_documents(export):
    val = read_split(export.byte260, "val")
    assert np.count_nonzero(val == 1) == NUM_VAL_DOCS
    assert val.size == NUM_VAL_DOCS + sum(len(d.encode("utf-8")) for d in export.docs[:NUM_VAL_DOCS])


def test_every_shard_but_the_last_of_a_split_holds_shard_tokens(export):
    for split in ("val", "train"):
        sizes = [(p.stat().st_size - 1024) // 2 for p in sorted(export.sp1024.glob(f"fineweb_{split}_*.bin"))]
        assert len(sizes) >= 2 and set(sizes[:-1]) == {SHARD_TOKENS} and 0 < sizes[-1] <= SHARD_TOKENS


def test_manifest_stats_describe_the_shards_on_disk(export):
    dataset = next(d for d in export.manifest["datasets"] if d["name"] == "fineweb10B_sp1024")
    folder = export.root / dataset["path"]
    assert json.loads((export.root / "manifest.json").read_text()) == export.manifest
    assert dataset["stats"] == {
        "files_train": len(list(folder.glob("fineweb_train_*.bin"))),
        "files_val": len(list(folder.glob("fineweb_val_*.bin"))),
        "tokens_train": read_split(folder, "train").size, "tokens_val": read_split(folder, "val").size,
        "docs_train": len(export.docs) - NUM_VAL_DOCS, "docs_val": NUM_VAL_DOCS}
    assert (dataset["vocab_size"], dataset["bos_id"], dataset["tokenizer_name"]) == (1024, 1, "sp_bpe_1024")


def test_reused_model_and_vocab_are_copied_unchanged(export):
    tokenizer = next(t for t in export.manifest["tokenizers"] if t["name"] == "sp_bpe_1024")
    assert (export.root / tokenizer["model_path"]).read_bytes() == SP1024_MODEL.read_bytes()
    assert (export.root / tokenizer["vocab_path"]).read_bytes() == SP1024_MODEL.with_suffix(".vocab").read_bytes()


def test_byte260_tokenizer_file_is_the_fixed_json(export):
    tokenizer = next(t for t in export.manifest["tokenizers"] if t["kind"] == "byte")
    assert json.loads((export.root / tokenizer["path"]).read_text()) == {
        "kind": "byte", "vocab_size": 260, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "byte_offset": 4}


def test_new_sentencepiece_tokenizer_has_the_spec_settings(tmp_path):
    import sentencepiece as spm
    docs_path = write_docs_jsonl(fineweb_documents(1500), tmp_path / "docs.jsonl")
    build_export(docs_path, tmp_path / "out", [TokenizerSpec("sp_bpe_400", "sp400", 400)], num_val_docs=100,
                 shard_tokens=SHARD_TOKENS)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out/tokenizers/fineweb_400_bpe.model"))
    assert sp.vocab_size() == 400 and [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]  # byte fallback
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split digits
    assert not sp.encode("the", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.encode("\ufb01le") == sp.encode("file")  # NFKC: the "fi" ligature is two letters


def test_tokenizer_is_trained_on_training_documents_only(tmp_path):
    """A word that occurs only in validation documents must not become a piece of its own."""
    import sentencepiece as spm
    docs = ["zyxwzyxw " * 200] * 100 + fineweb_documents(1000)
    build_export(write_docs_jsonl(docs, tmp_path / "docs.jsonl"), tmp_path / "out",
                 [TokenizerSpec("sp_bpe_400", "sp400", 400)], num_val_docs=100, shard_tokens=SHARD_TOKENS)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out/tokenizers/fineweb_400_bpe.model"))
    assert len(sp.encode("zyxwzyxw")) >= 4


def test_sidecar_sha256_mismatch_stops_before_any_output(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(300), tmp_path / "docs_selected.jsonl")
    (tmp_path / "docs_selected.source_manifest.json").write_text(json.dumps({"docs_sha256": "0" * 64}))
    with pytest.raises(ExportError, match="sha256"):
        build_export(docs_path, tmp_path / "out", [sp1024_spec()], num_val_docs=100, shard_tokens=SHARD_TOKENS)
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").rglob("*.bin"))


def test_sidecar_num_docs_mismatch_is_reported(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(300), tmp_path / "docs_selected.jsonl")
    (tmp_path / "docs_selected.source_manifest.json").write_text(json.dumps({"num_docs": 301}))
    with pytest.raises(ExportError, match="has 300 documents but .* says 301"):
        build_export(docs_path, tmp_path / "out", [sp1024_spec()], num_val_docs=100, shard_tokens=SHARD_TOKENS)


def test_reused_model_with_another_vocab_size_is_rejected(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(300), tmp_path / "docs.jsonl")
    spec = TokenizerSpec("sp_bpe_2048", "sp2048", 2048, reuse_model_path=SP1024_MODEL)
    with pytest.raises(ExportError, match="vocabulary of 1024.*vocab_size 2048"):
        build_export(docs_path, tmp_path / "out", [spec], num_val_docs=100, shard_tokens=SHARD_TOKENS)
    assert not (tmp_path / "out/tokenizers/fineweb_2048_bpe.model").exists()


def test_two_tokenizers_with_the_same_files_are_rejected(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(300), tmp_path / "docs.jsonl")
    specs = [sp1024_spec(), TokenizerSpec("sp_bpe_1024_new", "sp1024_new", 1024)]
    with pytest.raises(ExportError, match="share the file_stem 'fineweb_1024_bpe'"):
        build_export(docs_path, tmp_path / "out", specs, num_val_docs=100, shard_tokens=SHARD_TOKENS)


def test_bad_document_line_is_named_and_leaves_no_shards(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(300), tmp_path / "docs.jsonl")
    with open(docs_path, "a", encoding="utf-8") as f:
        f.write('{"txt": "no text key"}\n')
    with pytest.raises(ExportError, match=r"docs.jsonl:301: expected a JSON object with a 'text' string"):
        build_export(docs_path, tmp_path / "out", [sp1024_spec()], num_val_docs=100, shard_tokens=1000)
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").rglob("*.bin"))


def test_rebuild_removes_shards_of_the_earlier_export(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(1000), tmp_path / "docs.jsonl")
    build_export(docs_path, tmp_path / "out", [sp1024_spec()], num_val_docs=100, shard_tokens=10_000)
    build_export(docs_path, tmp_path / "out", [sp1024_spec()], num_val_docs=100, shard_tokens=1_000_000)
    assert sorted(p.name for p in (tmp_path / "out/datasets/fineweb10B_sp1024").iterdir()) == \
        ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_command_line_builds_an_export_offline_from_a_tokenizer_config(tmp_path):
    docs_path = write_docs_jsonl(fineweb_documents(600), tmp_path / "docs.jsonl")
    config = tmp_path / "specs.json"
    config.write_text(json.dumps({"tokenizers": [{"name": "sp_bpe_1024", "dataset_suffix": "sp1024",
                                                  "vocab_size": 1024, "reuse_model_path": str(SP1024_MODEL)}]}))
    result = subprocess.run([sys.executable, str(REPO / "data" / "download_hf_docs_and_tokenize.py"),
                             "--output-root", str(tmp_path / "out"), "--docs-jsonl", str(docs_path),
                             "--tokenizer-config", str(config), "--num-val-docs", "100", "--shard-tokens", "20000"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "manifest.json").read_text())["datasets"][0]["stats"]
    assert (stats["docs_val"], stats["docs_train"]) == (100, 500)


def test_tokenizer_config_without_vocab_size_is_rejected(tmp_path):
    config = tmp_path / "specs.json"
    config.write_text(json.dumps({"tokenizers": [{"name": "sp_bpe_1024", "dataset_suffix": "sp1024"}]}))
    with pytest.raises(ExportError, match=r"specs.json.*missing vocab_size"):
        load_tokenizer_specs(config)


def test_default_tokenizer_config_has_sp1024_and_byte260():
    specs = {s.dataset_suffix: s for s in load_tokenizer_specs(DEFAULT_TOKENIZER_CONFIG)}
    assert (specs["sp1024"].vocab_size, specs["sp1024"].kind) == (1024, "sentencepiece_bpe")
    assert (specs["byte260"].vocab_size, specs["byte260"].kind) == (260, "byte")


@pytest.mark.parametrize("variant, tokenizer_file, vocab_size",
                         [("sp1024", "fineweb_1024_bpe.model", 1024), ("byte260", "fineweb_pure_byte_260.json", 260)])
def test_train_gpt_trains_on_the_export(export, tmp_path, variant, tokenizer_file, vocab_size):
    folder = export.root / "datasets" / f"fineweb10B_{variant}"
    dataset = SimpleNamespace(data_path=str(folder), vocab_size=vocab_size,
                              tokenizer_path=str(export.root / "tokenizers" / tokenizer_file))
    env = trainer_env(dataset, RUN_ID=variant, SEED=1, ITERATIONS=4, TRAIN_BATCH_TOKENS=2048, TRAIN_SEQ_LEN=64,
                      VAL_BATCH_SIZE=4096, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2,
                      WARMUP_STEPS=1, VAL_LOSS_EVERY=0, MAX_WALLCLOCK_SECONDS=0)
    result = run_trainer(env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, variant)
    assert f"train_shards:{len(list(folder.glob('fineweb_train_*.bin')))}" in log
    final = re.findall(r"^final_int8_zlib_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", log, re.M)
    assert len(final) == 1 and 0 < float(final[0][0]) < 10
