"""Shard files of the challenge format (see ../shared/SPEC.md, "Data on disk").

A shard is a header of 256 little-endian int32 (magic, version, token count, then zeros)
followed by the token ids as little-endian uint16. train_gpt.py has its own reader; the
data tools, which run before train_gpt.py is on a pod, use this module, and a test checks
that the two agree.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_ID = np.iinfo(np.uint16).max


def shard_bytes(num_tokens: int) -> int:
    """The exact size of a complete shard holding `num_tokens` tokens."""
    return HEADER_BYTES + 2 * num_tokens


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write a shard atomically: a temporary name first, then a rename."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
        raise ValueError(f"{path}: token ids must fit in uint16 (0..{MAX_TOKEN_ID})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_shard_header(path: str | os.PathLike) -> int:
    """Return the token count of a complete shard; raise ValueError naming the file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: bad shard header (magic {header[0]}, version {header[1]}; "
                         f"expected {SHARD_MAGIC}, {SHARD_VERSION})")
    num_tokens = int(header[2])
    if size != shard_bytes(num_tokens):
        raise ValueError(f"{path}: size {size} bytes does not match the header's {num_tokens} tokens "
                         f"(expected {shard_bytes(num_tokens)}); the file is truncated or corrupt")
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    num_tokens = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_BYTES)
