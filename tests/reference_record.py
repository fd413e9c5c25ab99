"""Published records' own code (../shared/reference), run on the CPU for the kit's equivalence tests.

The records assume CUDA, FlashAttention 3, bf16 and torch.compile. `record_copy` writes a copy of one (RECORDS) into
a temporary folder with its edits, made here and never committed, each checked to match the source exactly as often
as expected (a changed reference fails loudly instead of silently testing other code), and stand-in modules beside it.

1.0810 (SP8192 + 3-layer recurrence + parallel residuals + QK-gain 5.25 + legal TTT, 2026-04-09):
- two f-strings that nest their own quotes, rewritten for Python 3.11;
- a stand-in `flash_attn_interface` whose flash_attn_func is SDPA on (batch, seq, heads, dim) tensors;
- torch.compile is the identity (same math; compiling on CPU only costs time);
- the device is the CPU: no CUDA calls, no autocast (fp32 throughout), gloo instead of NCCL, DDP without device ids;
- fp32 instead of bf16 where the record hard-codes bf16 (the model cast and Muon's Newton-Schulz and update
  buffer), and unfused AdamW: on CUDA the kit runs these in bf16 too; on CPU both run fp32, so the tests can
  compare to float rounding instead of to bf16 noise.

1.0714 (SmearGate + attention output gate + legal TTT, 2026-04-16; ../shared/reference/SOURCES.md):
- the stand-in `flash_attn_interface` also has flash_attn_varlen_func: causal SDPA on each segment of a packed row;
- stub `triton` modules (its fused MLP kernel is defined at import, never run: MLP.use_fused is False, whose other
  branch is the same plain MLP); torch.compile the identity; the model in fp32 (`.float()`, not `.bfloat16()`);
- the device is the CPU: no CUDA synchronisation, no pinned memory, gloo instead of NCCL, no nvidia-smi.
  Muon and the autocast blocks are left as written (bf16 Newton-Schulz runs on a CPU; autocast there does nothing).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

FLASH_STANDIN = '''"""Stand-in for FlashAttention 3 in tests: SDPA, with FA3's (batch, seq, heads, dim) layout."""
import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, causal=True):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           window_size=(-1, -1)):
    """One packed row (tokens, heads, dim): each segment of cu_seqlens attends causally within itself."""
    assert causal and tuple(window_size) == (-1, -1) and torch.equal(cu_seqlens_q, cu_seqlens_k)
    bounds, out = cu_seqlens_q.tolist(), torch.zeros_like(q)
    for a, b in zip(bounds, bounds[1:]):
        if b > a:  # the padding repeats the total: empty segments
            out[a:b] = flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=True)[0]
    return out
'''

TRITON_STUBS = {  # the names the 1.0714 record uses at import
    "triton/__init__.py": '''"""Stub triton for CPU tests: kernels are defined, never launched."""
def jit(fn=None, **kwargs):
    return fn if fn is not None else (lambda f: f)


def cdiv(a, b):
    return -(-a // b)
''',
    "triton/language.py": "class constexpr:\n    pass\n\n\nbfloat16 = None\n",
    "triton/tools/__init__.py": "",
    "triton/tools/tensor_descriptor.py": "class TensorDescriptor:\n    pass\n",
}

NO_COMPILE = "(lambda fn, **kwargs: fn)("
# (text in the record's source, replacement, how many times it occurs)
CPU_EDITS_1_0810 = (
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
CPU_EDITS_1_0714 = (
    ("@torch.compile\ndef zeropower_via_newtonschulz5", "def zeropower_via_newtonschulz5", 1),
    ("torch.compile(", NO_COMPILE, 7),
    ("torch.cuda.synchronize()", "None", 7),
    ("use_fused = True", "use_fused = False", 2),  # the Triton kernel needs a GPU; the other branch: the same MLP
    ("GPT(h).to(device).bfloat16()", "GPT(h).to(device).float()", 3),
    (".pin_memory()", "", 3),
    ('device = torch.device("cuda", h.local_rank)', 'device = torch.device("cpu")', 1),
    ('raise RuntimeError("CUDA is required")', "pass", 1),
    ('torch.device("cuda", local_rank)\n    torch.cuda.set_device(device)', 'torch.device("cpu")', 1),
    ('backend="nccl", device_id=device', 'backend="gloo"', 1),
    ('["nvidia-smi"]', '["echo", "no nvidia-smi: CPU test copy"]', 1),
)


@dataclass(frozen=True)
class Record:
    source: Path
    edits: tuple
    stand_ins: dict  # path in the copy's folder -> text


RECORDS = {
    "1.0810": Record(REFERENCE / "record_2026-04-09_sp8192_1.0810" / "train_gpt_decompressed.py", CPU_EDITS_1_0810,
                     {"flash_attn_interface.py": FLASH_STANDIN}),
    "1.0714": Record(REFERENCE / "record_2026-04-16_sp8192_1.0714" / "train_gpt.py", CPU_EDITS_1_0714,
                     {"flash_attn_interface.py": FLASH_STANDIN, **TRITON_STUBS}),
}


def require_reference(record: str = "1.0810") -> None:
    if not RECORDS[record].source.exists():
        pytest.skip(f"{RECORDS[record].source} is absent (../shared is not beside the repository)")


def cpu_source(record: str = "1.0810", edits: tuple = ()) -> str:
    """The record's source with its CPU edits (and a test's own `edits`, the same form) applied; fails if an edit does
    not match as often as expected."""
    require_reference(record)
    source = RECORDS[record].source.read_text(encoding="utf-8")
    for old, new, count in RECORDS[record].edits + tuple(edits):
        found = source.count(old)
        assert found == count, f"reference source changed: {old!r} occurs {found} times, expected {count}"
        source = source.replace(old, new)
    return source


def record_copy(folder: Path, record: str = "1.0810", edits: tuple = ()) -> Path:
    """Writes the CPU copy as folder/train_gpt.py with its stand-in modules beside it, so that `python3 train_gpt.py`
    (or torchrun) runs the record in that folder. Returns the script's path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in RECORDS[record].stand_ins.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    script = folder / "train_gpt.py"
    script.write_text(cpu_source(record, edits), encoding="utf-8")
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


def load_record(folder: Path, env: dict | None = None, record: str = "1.0810", edits: tuple = ()):
    """The record's CPU copy imported as a module. Its Hyperparameters class reads the environment when the module
    is executed, so `env` (e.g. {"NUM_LAYERS": "4", "MLP_MULT": "4"}) is set while it loads; RANK and WORLD_SIZE
    are unset unless `env` gives them (one process). The stand-in modules are dropped from sys.modules afterwards
    (the record keeps what it imported): later imports of triton or FlashAttention never find them."""
    import torch._dynamo  # noqa: F401  (it looks for triton when first imported: before the stub is findable)
    script = record_copy(folder, record, edits)
    name = f"record_{record.replace('.', '_')}_{abs(hash(str(folder)))}"
    cleared = {k: None for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ and k not in (env or {})}
    sys.path.insert(0, str(folder))
    saved = {k: os.environ.pop(k) for k in cleared}
    stand_ins = {Path(p).with_suffix("").as_posix().removesuffix("/__init__").replace("/", ".")
                 for p in RECORDS[record].stand_ins}
    try:
        with environment(env or {}):
            spec = importlib.util.spec_from_file_location(name, script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        os.environ.update(saved)
        for stand_in in stand_ins:
            sys.modules.pop(stand_in, None)
    return module


KIT_NAMES_1_0714 = {"smear_gate.weight": "smear_gate"}  # after un-banking, the only name the kit spells otherwise


def kit_state_dict_1_0714(record, state_dict: dict) -> dict:
    """A 1.0714 record model's state dict under the kit's names: its banks un-banked by its own _unbank_state_dict
    (the names its export writes: blocks.{i}.attn.c_q.weight ...), its smear gate's weight as the kit's smear_gate."""
    flat = record._unbank_state_dict(state_dict, record.Hyperparameters.num_layers)
    return {KIT_NAMES_1_0714.get(name, name): t for name, t in flat.items()}


def record_state_dict_1_0714(record, kit_state: dict) -> dict:
    """The inverse: the kit's weights as the record's model loads them (its own _rebank_state_dict)."""
    h, names = record.Hyperparameters, {kit: theirs for theirs, kit in KIT_NAMES_1_0714.items()}
    head_dim = h.model_dim // h.num_heads
    return record._rebank_state_dict({names.get(n, n): t for n, t in kit_state.items()}, h.num_layers, h.model_dim,
                                     h.num_kv_heads * head_dim, int(h.mlp_mult * h.model_dim))
