"""The artifact's compression: the records' byte shuffle + brotli-11 by default (1.0810's, which 1.0714 keeps), every
format told apart by its own header (old lzma and zlib artifacts still load), and the record's bytes for the same
weights (PRESET=1.0810's model)."""
from __future__ import annotations

import io
import lzma
import zlib

import pytest
import torch

import train_gpt
from reference_record import load_record
from train_gpt import Settings

needs_brotli = pytest.mark.skipif(train_gpt.brotli is None, reason="brotli is not installed")


def test_a_run_without_the_brotli_package_is_a_settings_error(monkeypatch):
    """brotli compresses the default artifact and packs the code (whatever the format): every run needs it."""
    monkeypatch.setattr(train_gpt, "brotli", None)
    for env in ({}, {"EXPORT_FORMAT": "int6+lzma"}, {"PRESET": "baseline"}):
        with pytest.raises(train_gpt.SettingsError, match=r"^the brotli package is missing: pip install"):
            Settings.from_env(env)


def packed_model(**settings) -> dict:
    """A perturbed model (PRESET=1.0810's) whose embedding (600 x 128) is rounded to int8, the rest kept in fp16."""
    torch.manual_seed(0)
    model = train_gpt.GPT(Settings.for_preset("1.0810", **{**dict(vocab_size=600, num_layers=1, model_dim=128, num_heads=4,
                                                              num_kv_heads=2), **settings}))
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return train_gpt.quantize_state_dict(model.state_dict(), set(), 6)


def assert_same_packed(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["dtypes"] == b["dtypes"]
    for part in ("int8", "scales", "float"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@needs_brotli
@pytest.mark.parametrize("export_format", train_gpt.EXPORT_FORMATS)
def test_every_format_loads_back_by_its_own_header(export_format):
    packed = packed_model()
    assert_same_packed(train_gpt.decompress_packed(train_gpt.compress_packed(packed, export_format)), packed)


def test_artifacts_written_before_brotli_still_load():
    """lzma (xz) and zlib blobs as earlier versions wrote them: torch.save of the packed dict, compressed."""
    packed, buffer = packed_model(), io.BytesIO()
    torch.save(packed, buffer)
    for blob in (lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ), zlib.compress(buffer.getvalue(), 9)):
        assert_same_packed(train_gpt.decompress_packed(blob), packed)


@needs_brotli
def test_default_format_is_the_records_shuffle_and_brotli(tmp_path):
    """The record's own _decompress reads the kit's default blob: the same byte shuffle, brotli stream."""
    assert Settings().export_format == "int6+brotli" and Settings.for_preset("baseline").export_format == "int8+zlib"
    record = load_record(tmp_path)
    packed = packed_model()
    raw = record._decompress(train_gpt.compress_packed(packed, "int6+brotli"), "brotli")
    assert_same_packed(torch.load(io.BytesIO(raw)), packed)


@needs_brotli
def test_model_bytes_are_no_more_than_the_records_for_the_same_codes(tmp_path):
    """The record saves {'w': codes, scales and fp16 tensors, 'm': a description per tensor}; the kit its packed
    dict. Same tensors, same compressor: the kit's container may not cost more (the cap counts every byte)."""
    record = load_record(tmp_path)
    packed = packed_model(vocab_size=1024, model_dim=256)  # int6 matrices too
    result = {**packed["float"], **{f"{k}.q": q for k, q in packed["int8"].items()},
              **{f"{k}.scale": s for k, s in packed["scales"].items()}}
    meta = {**{k: "passthrough (float16)" for k in packed["float"]}, **{k: "gptq (int6)" for k in packed["int8"]}}
    buffer = io.BytesIO()
    torch.save({"w": result, "m": meta}, buffer)
    record_bytes = len(record._compress(buffer.getvalue(), "brotli"))
    kit_bytes = len(train_gpt.compress_packed(packed, "int6+brotli"))
    print(f"model bytes: kit {kit_bytes}, record {record_bytes}")
    assert kit_bytes <= record_bytes, (kit_bytes, record_bytes)
