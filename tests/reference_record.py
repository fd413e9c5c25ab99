"""The 1.0810 record's own code (../shared/reference), run on the CPU for the kit's equivalence tests.

The record (SP8192 + 3-layer recurrence + parallel residuals + QK-gain 5.25 + legal TTT, 2026-04-09) assumes
CUDA, FlashAttention 3, bf16 and torch.compile. `record_copy` writes a copy into a temporary folder with the
edits below, made here and never committed, each checked to match the source exactly as often as expected
(a changed reference fails loudly instead of silently testing other code):
- two f-strings that nest their own quotes, rewritten for Python 3.11;
- a stand-in `flash_attn_interface` whose flash_attn_func is SDPA on (batch, seq, heads, dim) tensors;
- torch.compile is the identity (same math; compiling on CPU only costs time);
- the device is the CPU: no CUDA calls, no autocast (fp32 throughout), gloo instead of NCCL, DDP without device ids;
- fp32 instead of bf16 where the record hard-codes bf16 (the model cast and Muon's Newton-Schulz and update
  buffer), and unfused AdamW: on CUDA the kit runs these in bf16 too; on CPU both run fp32, so the tests can
  compare to float rounding instead of to bf16 noise.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECORD_DIR = REPO.parent / "shared" / "reference" / "record_2026-04-09_sp8192_1.0810"
RECORD_SOURCE = RECORD_DIR / "train_gpt_decompressed.py"

FLASH_STANDIN = '''"""Stand-in for FlashAttention 3 in tests: SDPA, with FA3's (batch, seq, heads, dim) layout."""
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=True):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)
'''

NO_COMPILE = "(lambda fn, **kwargs: fn)("
# (text in the record's source, replacement, how many times it occurs)
CPU_EDITS = (
    # Python 3.11 cannot parse f-strings that nest their own quotes (PEP 701 came in 3.12).
    ('{", ".join(sorted(categories[cat]))}', "{', '.join(sorted(categories[cat]))}", 1),
    ('glob("fineweb_train_*.bin")', "glob('fineweb_train_*.bin')", 1),
    ("@torch.compile\ndef zeropower_via_newtonschulz5", "def zeropower_via_newtonschulz5", 1),
    ("torch.compile(", NO_COMPILE, 4),
    ("torch.cuda.synchronize()", "None", 5),
    ("with torch.autocast(device_type='cuda',dtype=torch.bfloat16,enabled=True):",
     "with torch.autocast(device_type='cpu',enabled=False):", 2),
    ("with torch.autocast(device_type='cuda',dtype=torch.bfloat16):",
     "with torch.autocast(device_type='cpu',enabled=False):", 3),
    ("GPT(h).to(device).bfloat16()", "GPT(h).to(device)", 2),
    ("X=G.bfloat16()", "X=G.float()", 1),
    ("dtype=torch.bfloat16);curr=0", "dtype=torch.float32);curr=0", 1),
    ("fused=True", "fused=False", 3),
    ("torch.cuda.max_memory_allocated()", "0", 1),
    ("torch.cuda.max_memory_reserved()", "0", 1),
    ("device=torch.device('cuda',h.local_rank)", "device=torch.device('cpu')", 1),
    ("if not torch.cuda.is_available():raise RuntimeError('CUDA is required')", "pass", 1),
    ("device=torch.device('cuda',local_rank);torch.cuda.set_device(device)", "device=torch.device('cpu')", 1),
    ("backend='nccl',device_id=device", "backend='gloo'", 1),
    ("device_ids=[h.local_rank]", "device_ids=None", 1),  # DDP of a CPU module takes no device ids
    ("['nvidia-smi']", "['echo','no nvidia-smi: CPU test copy']", 1),
    ("torch.cuda.manual_seed_all(h.seed)", "None", 1),
)


def require_reference() -> None:
    if not RECORD_SOURCE.exists():
        pytest.skip(f"{RECORD_SOURCE} is absent (../shared is not beside the repository)")


def cpu_source() -> str:
    """The record's source with CPU_EDITS applied; fails if an edit does not match as often as expected."""
    require_reference()
    source = RECORD_SOURCE.read_text(encoding="utf-8")
    for old, new, count in CPU_EDITS:
        found = source.count(old)
        assert found == count, f"reference source changed: {old!r} occurs {found} times, expected {count}"
        source = source.replace(old, new)
    return source


def record_copy(folder: Path) -> Path:
    """Writes the CPU copy as folder/train_gpt.py with the stand-in flash_attn_interface.py beside it, so that
    `python3 train_gpt.py` (or torchrun) runs the record in that folder. Returns the script's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "flash_attn_interface.py").write_text(FLASH_STANDIN, encoding="utf-8")
    script = folder / "train_gpt.py"
    script.write_text(cpu_source(), encoding="utf-8")
    return script


@contextmanager
def environment(env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_record(folder: Path, env: dict | None = None):
    """The record's CPU copy imported as a module. Its Hyperparameters class reads the environment when the module
    is executed, so `env` (e.g. {"NUM_LAYERS": "4", "MLP_MULT": "4"}) is set while it loads; RANK and WORLD_SIZE
    are unset unless `env` gives them (one process)."""
    script = record_copy(folder)
    name = f"record_1_0810_{abs(hash(str(folder)))}"
    cleared = {k: None for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ and k not in (env or {})}
    sys.path.insert(0, str(folder))
    saved = {k: os.environ.pop(k) for k in cleared}
    try:
        with environment(env or {}):
            spec = importlib.util.spec_from_file_location(name, script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        os.environ.update(saved)
    return module
