"""ROPE_ROUNDING: under PRECISION=bf16 (the CUDA configuration) the rotary tables round as each record's do on CUDA,
where its model cast (`.bfloat16()`, which restore_fp32_params leaves alone for buffers) turns its Rotary frequencies
to bf16: the 1.0810 record (and the official script) then computes positions and angles in bf16 too (positions past
256 round), the 1.0714 record its angles in fp32 from the bf16 frequencies. Each is checked bit for bit against the
record's own Rotary and apply_rotary_emb, run on the CPU. In fp32 nothing rounds: both settings compute one table."""
from __future__ import annotations

import pytest
import torch

import train_gpt
from reference_record import load_record

HEAD_DIM, TRAIN_SEQ_LEN = 64, 2048  # the records' heads (512 / 8)
ROWS = {"1.0810": 2048, "1.0714": 4096}  # the 1.0714 record's packed rows are longer than TRAIN_SEQ_LEN (no YaRN)


@pytest.fixture(scope="module", params=list(ROWS))
def record(request, tmp_path_factory):
    return request.param, load_record(tmp_path_factory.mktemp(f"rotary_{request.param}"), record=request.param)


def record_rotation(module, x: torch.Tensor, dims: int) -> torch.Tensor:
    """x (batch, seq, heads, head_dim) rotated by the record's own code, its Rotary cast with its model to x's dtype."""
    rotary = module.Rotary(HEAD_DIM, 1e4, TRAIN_SEQ_LEN, dims).to(x.dtype)
    if hasattr(rotary, "yarn"):
        rotary.yarn = False  # the 1.0714 record's ROPE_YARN=0 (its logs)
    cos, sin = rotary(x.size(1), x.device, x.dtype)
    return module.apply_rotary_emb(x, cos, sin, dims)


def queries(version: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(1, ROWS[version], 2, HEAD_DIM, generator=torch.Generator().manual_seed(0)).to(dtype)


def kit_rotation(x: torch.Tensor, rounding: str, dims: int = 16) -> torch.Tensor:
    return train_gpt.Rotary(HEAD_DIM, 1e4, dims, rounding)(x)


def test_bf16_rotation_is_the_records_bit_for_bit(record):
    """The records' 16 rotated dims over a whole row, and every other even number of them over 300 positions."""
    version, module = record
    x = queries(version, torch.bfloat16)
    assert torch.equal(kit_rotation(x, version, 16), record_rotation(module, x, 16))
    for dims in range(2, HEAD_DIM + 1, 2):
        assert torch.equal(kit_rotation(x[:, :300], version, dims), record_rotation(module, x[:, :300], dims)), dims


def test_bf16_rotation_with_the_other_records_rounding_differs(record):
    """The test above can fail: past position 256 the two roundings give other rotations at nearly every position
    (by more than 0.1, where bf16's last bit is at most 0.03 at these values), by 2 on average."""
    version, module = record
    x = queries(version, torch.bfloat16)
    other = kit_rotation(x, "1.0714" if version == "1.0810" else "1.0810")
    difference = (other - record_rotation(module, x, 16)).float().abs().amax(dim=(0, 2, 3))[256:]
    assert (difference > 0.1).float().mean() > 0.9 and difference.mean() > 1


def test_fp32_rotation_is_one_table_the_records_to_float_rounding(record):
    """Frequencies as base^-x, the records' as 1 / base^x: the last bit of some differs (their bf16 roundings never
    do, at any even number of dims up to 64: the test above), so that position p's angle may differ by p x 2^-24 (one ulp of a
    frequency up to 1): at most 4096 x 6e-8 x |x| (5) = 1.2e-3 in the rotation here."""
    version, module = record
    x = queries(version, torch.float32)
    ours = [kit_rotation(x, rounding) for rounding in ROWS]
    assert torch.equal(ours[0], ours[1])
    torch.testing.assert_close(ours[0], record_rotation(module, x, 16), rtol=0, atol=1.2e-3)
