"""Parameter Golf trainer, from shards to a scored, compressed artifact: `torchrun --standalone --nproc_per_node=8
train_gpt.py` on 8xH100, `python3 train_gpt.py` on one GPU, a CPU or Apple MPS. Every setting is an environment
variable (Settings); the default is the 1.0714 record's recipe, PRESET=baseline the naive baseline. A run writes
logs/<RUN_ID>.txt (this source, the settings, every log line) and logs/<RUN_ID>.<int6|int8>.ptz, the model whose bytes
plus this file's (packed: pack_code) form the artifact. Sections: settings, runtime, optimizer, data, evaluation,
export, model, training."""
from __future__ import annotations

import ast
import contextlib
import copy
import fcntl
import gc
import glob
import hashlib
import importlib.util
import io
import json
import lzma
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch.nn.parallel import DistributedDataParallel as DDP

brotli = importlib.import_module("brotli") if importlib.util.find_spec("brotli") else None  # None: validate refuses
tqdm = importlib.import_module("tqdm").tqdm if importlib.util.find_spec("tqdm") else None  # None: no progress bar
ARTIFACT_CAP_BYTES = 16_000_000
# The published exports (SPEC.md): validation tokens, to catch another split; tokenizer sha256s, named in the log.
PUBLISHED_VAL_TOKENS = {1024: (62_021_632, 63_779_840), 4096: (45_508_608,), 8192: (40_540_160, 47_851_520)}
PUBLISHED_TOKENIZERS = {"849ea920119b5135ace5016137e82ab397738fc29d723d5f9a6b74c4e31af191": "sp1024",
                        "ba9892fc3502b8c5f649e838bbf825cd1b929a092c010854c8784351151d2745": "sp2048",
                        "d76de35070ed9feb76afe3a7efc3a1a0e91e9aa4978360ecdc7fbc22a9725512": "sp4096",
                        "4e979c92754cc9d7bdebd9dfe5edf3fc0b41b38714b394e4297fa851e3afd516": "sp8192"}

# ----------------------------------------------------------------------------------------------
# Settings: one place, read from the environment, validated before anything else happens.


class SettingsError(ValueError):
    pass


class RunError(RuntimeError):
    """A failure the user can act on: main prints it as one `error:` line, also into the run's log."""


@dataclass(frozen=True)
class Settings:
    """Defaults: the 1.0714 record's recipe, the settings its runs logged (tests/test_record_1_0714_*.py); PRESET=1.0810
    the 1.0810 record's. Fractions are of training (training_progress)."""
    preset: str = "strong"  # strong (the default) | 1.0810 | baseline | smoke (PRESETS): applied before the others
    # Data and run bookkeeping.
    data_path: str = ""  # empty: ./data/datasets/fineweb10B_sp<VOCAB_SIZE>
    tokenizer_path: str = ""  # empty: ./data/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model
    run_id: str = ""  # empty: a fresh uuid
    overwrite: int = 0  # 1: a RUN_ID used before is allowed; its files are renamed aside, never deleted
    seed: int = 1337
    device: str = "auto"  # auto | cuda | cpu | mps
    compile: str = "auto"  # auto (on for CUDA) | 0 | 1
    attention: str = "auto"  # auto (fa3 where installed on CUDA, else sdpa) | fa3 (FlashAttention 3) | sdpa
    precision: str = "auto"  # auto (bf16 on CUDA, else fp32) | bf16: CUDA's dtypes and fused AdamW on any device | fp32
    optimize_ddp: int = 0  # 1: dynamo splits the compiled DDP graph at the gradient buckets; 0: one graph (the record)
    # Evaluation and logging.
    val_batch_size: int = 524_288
    val_loss_every: int = 4000
    train_log_every: int = 500
    max_val_tokens: int = 0  # 0: the full validation split; N: only a prefix (quick local runs)
    eval_stride: int = 64  # final score by sliding windows advancing this many tokens; 0: plain windows
    ttt_epochs: int = 1  # score-first test-time training: steps (full: epochs) on each chunk once it is scored; 0: off
    ttt_method: str = "lora"  # lora: adapters per document (the 1.0714 record) | full: SGD on all weights (1.0810)
    ttt_lr: float = 0.005  # full: SGD (momentum 0.9) learning rate, cosine-decayed over the chunks
    ttt_chunk_tokens: int = 48  # tokens of each document scored, then trained on, per chunk (full: of the split)
    ttt_lora_rank: int = 96  # lora: the rank of each document's adapters (BatchedTTTLoRA)
    ttt_lora_lr: float = 1e-4  # lora: their AdamW's learning rate (eps 1e-10)
    ttt_beta1: float = 0.0  # lora: ... its betas
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = 0.5  # lora: ... its decoupled weight decay
    ttt_batch_size: int = 64  # lora: documents trained side by side, each with its own adapters
    eval_sliding: int = 0  # with TTT on, 1: also the separate sliding pass (TTT's own scoring already slides)
    # Schedule and batch.
    iterations: int = 20_000
    warmdown_iters: int = 1200  # used when WARMDOWN_FRAC=0
    warmdown_frac: float = 0.75  # linear LR decay to 0 over this last fraction of training
    warmup_steps: int = 20
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    loader_streams: int = 8  # the sequences of the record's loader on this many GPUs (its 8); 0: shards in order
    pack_documents: int = 1  # 1: each of those GPUs trains on one row of whole documents (the 1.0714 record's loader)
    grad_accum_steps: int = 0  # 0: 8 // world size, at least 1
    max_wallclock_seconds: float = 600.0
    # Model.
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 4
    mlp_leaky_slope: float = 0.5  # MLP activation leaky_relu(x, slope)^2; 0 is relu^2
    tie_embeddings: int = 1
    rope_base: float = 10000.0
    rope_dims: int = 16  # rotate only the first this-many dims of each head; 0: all
    rope_rounding: str = "1.0714"  # whose rotary tables in bf16: 1.0714 (fp32 angles) | 1.0810 (bf16 positions, angles)
    ln_scale: int = 1  # 1: block i scales its normalised inputs by 1/sqrt(i+1)
    xsa_last_n: int = 11  # exclusive self-attention in the last this-many blocks
    parallel_last_n: int = 0  # attention and MLP read the same input in the last this-many blocks (1.0810: 4)
    parallel_start_layer: int = 8  # decoder passes of blocks from this one on: two residual lanes (GPT.logits); 0: off
    recur_layers: str = "3,4,5"  # contiguous block indices run again (shared weights); "": none
    num_loops: int = 2  # ... this many extra times
    recur_start_frac: float = 0.35  # ... from this fraction of training on
    skip_gates: int = 1  # 1: each U-Net skip is mixed in by a learned sigmoid gate; 0: added
    logit_softcap: float = 30.0
    qk_gain_init: float = 5.25
    tied_embed_init_std: float = 0.005
    ortho_init: int = 2  # 2: orthogonal block matrices, drawn as 1.0714's banks; 1: as 1.0810; 0: PyTorch's default
    smear_gate: int = 1  # 1: each position adds a gated share of the previous token's embedding
    smear_bos_mask: int = 0  # 1: ... never across a BOS (the later records' fix); 0: also across (the 1.0714 record)
    smear_frozen: int = 1  # 1: no optimizer trains it: it stays the identity, its gradient still clipped (1.0714's)
    gate_attn_out: int = 1  # 1: each head's attention output x 2 sigmoid(a zero-initialised gate of its input)
    # Optimizers.
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_lr: float = 0.03
    matrix_lr: float = 0.026
    scalar_lr: float = 0.02
    muon_momentum: float = 0.97
    muon_backend_steps: int = 5
    muon_ns_coeffs: str = "fixed"  # fixed: one quintic | polar: per-iteration Polar Express coefficients
    muon_row_norm: int = 1  # 1: normalise each row of the update before Newton-Schulz
    muon_weight_decay: float = 0.095  # decoupled: W <- W (1 - lr wd) - lr update
    embed_weight_decay: float = 0.085  # the same for the token embedding (AdamW)
    scalar_weight_decay: float = 0.02  # ... and for the control tensors (AdamW)
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    grad_clip_per_rank: int = 1  # 1: each GPU of LOADER_STREAMS (a micro-batch) clips its own gradient, no DDP (1.0714)
    muon_rounding: str = "1.0714"  # whose Muon arithmetic: 1.0714 (bf16 momentum on CUDA) | 1.0810 (fp32; same math)
    warmup_keep_momentum: int = 1  # 1: Muon's momentum outlives the warm-up, as the 1.0714 record's on 8 GPUs
    ema_decay: float = 0.9965  # export an EMA of the weights, updated every step; 0: the raw weights
    # Export.
    export_format: str = "int6+brotli"  # <int6|int8>+<brotli|lzma|zlib>
    export_fit_cap: int = 0  # 1: while over the cap, zero a few +-1 codes (prune_to_fit), or fewer bits (FIT_CAP_STEPS)
    export_packed_code: int = 1  # 1: the fit and the Total line count this file packed (pack_code), as shipped
    export_quant: str = "gptq"  # gptq: rounding that minds the layer outputs (gptq_quantize) | rtn: plain rounding
    export_embed_bits: int = 7  # the embedding's (the tied head's) bits; 8 without a hessian: a quantile clip
    gptq_clip_sigmas: float = 12.85  # GPTQ row scale: clip = this x the row's std; larger: fewer bytes
    gptq_mlp_clip_sigmas: float = 12.0  # ... for the MLP matrices; 0: GPTQ_CLIP_SIGMAS
    gptq_attn_clip_sigmas: float = 13.0  # ... for the attention matrices; 0: GPTQ_CLIP_SIGMAS
    gptq_embed_clip_sigmas: float = 15.0  # ... for the embedding
    gptq_reserve_seconds: float = 13.0  # training stops this much before MAX_WALLCLOCK_SECONDS, for GPTQ
    gptq_calibration_batches: int = 64  # micro-batches of training sequences whose layer inputs make the hessians

    @classmethod
    def from_env(cls, env=os.environ) -> Settings:
        """Defaults, then the PRESET's overrides, then every variable that is set."""
        preset = env.get("PRESET", "").strip() or "strong"
        require(preset in PRESETS, "PRESET", preset, f"one of {', '.join(PRESETS)}")
        values = {**cls.defaults(), **PRESETS[preset]}
        for f in fields(cls):
            raw = env.get(f.name.upper(), "").strip()
            if raw or (f.name.upper() in env and isinstance(f.default, str)):  # empty text is a value: RECUR_LAYERS=
                values[f.name] = parse_setting(f.name.upper(), raw, type(f.default))
        settings = cls(**{**values, "preset": preset})
        settings.validate()
        return settings

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> Settings:
        return cls(**{**cls.defaults(), **PRESETS[preset], "preset": preset, **overrides})

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls)}

    def __post_init__(self):  # paths left empty follow VOCAB_SIZE (the published variant sp<VOCAB_SIZE>)
        v = self.vocab_size
        object.__setattr__(self, "data_path", self.data_path or f"./data/datasets/fineweb10B_sp{v}")
        object.__setattr__(self, "tokenizer_path", self.tokenizer_path or f"./data/tokenizers/fineweb_{v}_bpe.model")

    @property
    def recur_layer_ids(self) -> list[int]:
        return [int(i) for i in self.recur_layers.split(",") if i.strip()]

    @property
    def training_seconds(self) -> float:  # GPTQ reads training tokens: its time counts inside the cap
        gptq = self.export_quant == "gptq" and self.max_wallclock_seconds > 0
        return self.max_wallclock_seconds - self.gptq_reserve_seconds * gptq

    @property
    def export_bits(self) -> int:
        return int(self.export_format.split("+")[0].removeprefix("int"))

    @property
    def gptq_clips(self) -> dict[str, float]:  # by kind of matrix: the first key found in its name (clip_sigmas_of)
        c = self.gptq_clip_sigmas
        return {".mlp.": self.gptq_mlp_clip_sigmas or c, ".attn.": self.gptq_attn_clip_sigmas or c, "": c}

    def validate(self) -> None:
        s = self
        require(0 <= s.seed < 2**32, "SEED", s.seed, "a whole number in [0, 2**32 - 1] (numpy's range; torch "
                "wraps others onto other seeds)")
        for name, value in asdict(s).items():  # inf and NaN pass comparisons like >= 0, and poison the run
            require(not isinstance(value, float) or math.isfinite(value), name.upper(), value, "a finite number")
            require(not isinstance(value, int) or abs(value) < 2**63, name.upper(), value, "below 2**63 in size")
        require(s.device in ("auto", "cuda", "cpu", "mps"), "DEVICE", s.device, "one of auto, cuda, cpu, mps")
        require(s.compile in ("auto", "0", "1"), "COMPILE", s.compile, "one of auto, 0, 1")
        for name, allowed in (("export_format", EXPORT_FORMATS), ("muon_ns_coeffs", tuple(NS_COEFFS)),
                              ("export_quant", ("gptq", "rtn")), ("muon_rounding", ("1.0810", "1.0714")),
                              ("rope_rounding", ("1.0810", "1.0714")),
                              ("attention", ("auto", "fa3", "sdpa")), ("precision", ("auto", "bf16", "fp32")),
                              ("ttt_method", ("full", "lora"))):
            require(getattr(s, name) in allowed, name.upper(), getattr(s, name), f"one of {', '.join(allowed)}")
        for name in ("iterations", "train_batch_tokens", "train_seq_len", "val_batch_size", "vocab_size",
                     "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "muon_backend_steps",
                     "ttt_chunk_tokens", "gptq_calibration_batches", "ttt_lora_rank", "ttt_batch_size"):
            require(getattr(s, name) >= 1, name.upper(), getattr(s, name), "a whole number >= 1")
        for name in ("warmdown_iters", "warmup_steps", "val_loss_every", "train_log_every", "max_val_tokens",
                     "grad_accum_steps", "max_wallclock_seconds", "muon_momentum_warmup_steps", "grad_clip_norm",
                     "embed_lr", "head_lr", "tied_embed_lr", "matrix_lr", "scalar_lr", "tied_embed_init_std",
                     "eval_stride", "mlp_leaky_slope", "rope_dims", "xsa_last_n", "parallel_last_n",
                     "muon_weight_decay", "embed_weight_decay", "scalar_weight_decay", "gptq_reserve_seconds",
                     "ttt_epochs", "ttt_lr", "num_loops", "loader_streams", "gptq_mlp_clip_sigmas",
                     "gptq_attn_clip_sigmas", "parallel_start_layer", "ttt_lora_lr", "ttt_weight_decay"):
            require(getattr(s, name) >= 0, name.upper(), getattr(s, name), "a number >= 0")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2", "ema_decay", "ttt_beta1",
                     "ttt_beta2"):
            require(0 <= getattr(s, name) < 1, name.upper(), getattr(s, name), "a number in [0, 1)")
        for name in ("warmdown_frac", "recur_start_frac"):
            require(0 <= getattr(s, name) <= 1, name.upper(), getattr(s, name), "a fraction in [0, 1]")
        for name in ("muon_row_norm", "ln_scale", "export_fit_cap", "export_packed_code", "overwrite", "smear_gate",
                     "tie_embeddings", "eval_sliding", "optimize_ddp", "skip_gates", "pack_documents",
                     "grad_clip_per_rank", "warmup_keep_momentum", "smear_bos_mask", "gate_attn_out", "smear_frozen"):
            require(getattr(s, name) in (0, 1), name.upper(), getattr(s, name), "0 or 1")
        require(s.ortho_init in (0, 1, 2), "ORTHO_INIT", s.ortho_init, "0, 1 or 2")
        require(s.ttt_method != "lora" or s.ttt_chunk_tokens <= s.train_seq_len, "TTT_CHUNK_TOKENS", s.ttt_chunk_tokens,
                f"at most TRAIN_SEQ_LEN={s.train_seq_len} with TTT_METHOD=lora (a chunk is scored in one window)")
        require(re.fullmatch(r"(\d+(,\d+)*)?", s.recur_layers.replace(" ", "")) is not None, "RECUR_LAYERS",
                s.recur_layers, "comma-separated block indices, e.g. 4,5, or empty")
        ids = s.recur_layer_ids
        require(ids == list(range(ids[0], ids[0] + len(ids))) and ids[-1] < s.num_layers if ids else True,
                "RECUR_LAYERS", s.recur_layers, f"contiguous ascending block indices below NUM_LAYERS={s.num_layers}")
        lanes = s.parallel_start_layer  # once two lanes start, every later decoder pass must be two-lane
        require(not lanes or lanes < s.num_layers and not s.parallel_last_n and not (ids and ids[0] < lanes <= ids[-1]),
                "PARALLEL_START_LAYER", lanes, f"0, or below NUM_LAYERS={s.num_layers}, not inside the RECUR_LAYERS "
                f"range, with PARALLEL_LAST_N=0 (the two kinds of parallel residual exclude each other)")
        for name in ("rope_base", "logit_softcap", "adam_eps", "gptq_clip_sigmas", "gptq_embed_clip_sigmas"):
            require(getattr(s, name) > 0, name.upper(), getattr(s, name), "a number > 0")
        require(2 <= s.export_embed_bits <= 8, "EXPORT_EMBED_BITS", s.export_embed_bits,
                "a whole number from 2 to 8 (codes are stored as int8)")
        require(s.training_seconds > 0 or s.max_wallclock_seconds == 0, "GPTQ_RESERVE_SECONDS",
                s.gptq_reserve_seconds, f"below MAX_WALLCLOCK_SECONDS={s.max_wallclock_seconds} (or EXPORT_QUANT=rtn)")
        require(re.fullmatch(r"(?a)(\w[\w.-]{0,199})?", s.run_id) is not None, "RUN_ID", s.run_id,
                "1 to 200 letters, digits, '.', '_' or '-', not starting with '.' or '-'")
        if brotli is None:  # it compresses the default artifact and packs this file (pack_code)
            raise SettingsError("the brotli package is missing: pip install -r requirements.txt")
        require(s.vocab_size <= 65536, "VOCAB_SIZE", s.vocab_size, "at most 65536 (shards store uint16 ids)")
        require(s.model_dim % s.num_heads == 0, "MODEL_DIM", s.model_dim, f"a multiple of NUM_HEADS={s.num_heads}")
        require((s.model_dim // s.num_heads) % 8 == 0 and s.model_dim // s.num_heads <= 256, "MODEL_DIM", s.model_dim,
                "such that MODEL_DIM / NUM_HEADS is a multiple of 8 up to 256 (the head sizes FlashAttention takes)")
        require(s.num_heads % s.num_kv_heads == 0, "NUM_KV_HEADS", s.num_kv_heads,
                f"a divisor of NUM_HEADS={s.num_heads}")
        require(s.rope_dims % 2 == 0 and s.rope_dims <= s.model_dim // s.num_heads, "ROPE_DIMS", s.rope_dims,
                f"even (rotary embeddings rotate pairs) and at most the head dim {s.model_dim // s.num_heads}")

    def divergence_suspects(self) -> str:
        """After a NaN: the numeric settings changed from the preset (the likely cause, whichever it is)."""
        preset = asdict(Settings.for_preset(self.preset))
        changed = [f"{k.upper()}={v}" for k, v in asdict(self).items()
                   if isinstance(v, float) and v != preset[k] and k != "max_wallclock_seconds"]
        return (f"settings changed from PRESET={self.preset}: {', '.join(changed)}: undo or reduce them" if changed
                else "lower the learning rates (MATRIX_LR, SCALAR_LR, TIED_EMBED_LR) or set GRAD_CLIP_NORM")

    def check_batch_layout(self, world_size: int, grad_accum_steps: int) -> None:
        """The global batch must split evenly into sequences per rank and per accumulation step."""
        unit = self.train_seq_len * world_size * grad_accum_steps
        require(self.train_batch_tokens % unit == 0, "TRAIN_BATCH_TOKENS", self.train_batch_tokens,
                f"a multiple of TRAIN_SEQ_LEN x world size x GRAD_ACCUM_STEPS = "
                f"{self.train_seq_len} x {world_size} x {grad_accum_steps} = {unit}")
        require(self.val_batch_size >= unit, "VAL_BATCH_SIZE", self.val_batch_size,
                f"at least TRAIN_SEQ_LEN x world size x GRAD_ACCUM_STEPS = {unit}")
        require(world_size * grad_accum_steps == self.loader_streams or not (self.pack_documents or
                self.grad_clip_per_rank), "GRAD_ACCUM_STEPS", grad_accum_steps, f"LOADER_STREAMS / world size = "
                f"{self.loader_streams} / {world_size} with PACK_DOCUMENTS=1 or GRAD_CLIP_PER_RANK=1 (each micro-batch "
                f"is one of the record's GPUs): set it so, on a divisor of LOADER_STREAMS processes")
        require(self.gptq_calibration_batches >= world_size or self.export_quant != "gptq", "GPTQ_CALIBRATION_BATCHES",
                self.gptq_calibration_batches, f"at least the world size {world_size} (each rank calibrates on some)")


# PRESET=1.0810: the 1.0810 record's recipe, the kit's default before the 1.0714 record's (tests/test_record_*.py).
RECIPE_1_0810 = dict(smear_gate=0, smear_bos_mask=1, smear_frozen=0, gate_attn_out=0, parallel_start_layer=0,
                     parallel_last_n=4, ortho_init=1, rope_rounding="1.0810", pack_documents=0, grad_clip_per_rank=0,
                     muon_rounding="1.0810", warmup_keep_momentum=0, matrix_lr=0.022, muon_momentum=0.99,
                     warmdown_frac=0.72, gptq_reserve_seconds=12.0, ttt_method="full", ttt_epochs=3,
                     ttt_chunk_tokens=32_768, export_embed_bits=8, gptq_mlp_clip_sigmas=0.0, gptq_attn_clip_sigmas=0.0,
                     gptq_embed_clip_sigmas=20.0)
# PRESET=baseline: the naive baseline of SPEC.md, every technique off. PRESET=smoke: every stage in seconds on a CPU.
PRESETS = {"strong": {}, "1.0810": RECIPE_1_0810, "baseline": dict(
    RECIPE_1_0810, vocab_size=1024, eval_stride=0, ttt_epochs=0, val_loss_every=1000, train_log_every=200,
    warmdown_frac=0.0, train_batch_tokens=524_288, train_seq_len=1024, num_layers=9, mlp_mult=2, mlp_leaky_slope=0.0,
    rope_dims=0, ln_scale=0, xsa_last_n=0, parallel_last_n=0, recur_layers="", skip_gates=0, ortho_init=0,
    qk_gain_init=1.5, tied_embed_lr=0.05, matrix_lr=0.04, scalar_lr=0.04, muon_momentum=0.95, muon_row_norm=0,
    muon_weight_decay=0.0, embed_weight_decay=0.0, scalar_weight_decay=0.0, muon_momentum_warmup_start=0.85,
    muon_momentum_warmup_steps=500, grad_clip_norm=0.0, ema_decay=0.0, export_format="int8+zlib", export_quant="rtn",
    loader_streams=0),
    "smoke": dict(  # on what data/build_smoke_dataset.py writes
    data_path="./data/smoke/datasets/fineweb10B_smoke", tokenizer_path="./data/smoke/tokenizers/fineweb_512_bpe.model",
    vocab_size=512, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2, recur_layers="1",
    parallel_start_layer=1, train_seq_len=128, train_batch_tokens=2048, iterations=60, max_wallclock_seconds=0,
    warmup_steps=2, val_batch_size=16384, train_log_every=10, ema_decay=0.9, ttt_chunk_tokens=128,
    ttt_lora_rank=8, gptq_calibration_batches=4)}
EXPORT_FORMATS = tuple(f"int{bits}+{compressor}" for bits in (6, 8) for compressor in ("brotli", "lzma", "zlib"))


def parse_setting(name: str, raw: str, kind: type):
    try:
        return kind(raw) if kind is not int else int(raw, 10)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}; unset it or give a {kind.__name__} "
                            f"value, e.g. {name}={kind(1)}") from None


def require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise SettingsError(f"{name}={value!r} is invalid: it must be {rule}")


# ----------------------------------------------------------------------------------------------
# Runtime: device, distributed group, and every choice that depends on the device (device_choices).


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    grad_accum_steps: int
    compute_dtype: torch.dtype  # activations, Muon's Newton-Schulz, and the token embedding's storage (build_model)
    compile: bool
    fused_adam: bool = False  # AdamW's fused kernel
    pin_memory: bool = False  # training batches staged in page-locked host memory, copied asynchronously
    attention: str = "sdpa"  # the kernel `attention` runs: fa3 | sdpa (pick_attention)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elif self.device.type == "mps":
            torch.mps.synchronize()


def pick_device_type(requested: str) -> str:
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available[requested]:
        raise SettingsError(f"DEVICE={requested!r} is not available on this machine; use DEVICE=auto or cpu")
    return requested


def pin_flash_attention() -> None:
    """CUDA attention runs FlashAttention or fails, never the math kernel's T x T fallback (as the official script).
    cuDNN stays off until a GPU measures it faster on the trainer's exact call (bench/gpu_check.py's kernel step)."""
    torch.backends.cuda.enable_flash_sdp(True)
    for other in ("math", "mem_efficient", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{other}_sdp")(False)


def device_choices(device_type: str, settings: Settings) -> dict:
    """Runtime's dtypes and kernels. bf16 where the hardware is built for it; fp32 on CPU, where bf16 is slow and tests
    want exactness. PRECISION=bf16 makes CUDA's choices on any device but pinned memory (it needs CUDA), so that a CPU
    runs the CUDA configuration (with COMPILE=1) in everything but the kernels."""
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and device_type == "cuda")
    return dict(compute_dtype=torch.bfloat16 if bf16 else torch.float32, fused_adam=bf16,
                compile=settings.compile == "1" or (settings.compile == "auto" and device_type == "cuda"),
                pin_memory=device_type == "cuda", attention=pick_attention(settings.attention, device_type))


def pick_cpu_threads(settings: Settings, local_world_size: int) -> int:
    """OMP_NUM_THREADS when set; else this process's share of the cores, one per 128 of model width: the small matmuls
    of a narrow model gain less from more threads than they lose waiting on each other on a busy machine."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()  # torch's own reading of it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // local_world_size, settings.model_dim // 128))


# Ranks wait in a collective while rank 0 exports alone: with EXPORT_FIT_CAP=1 up to 4 formats x 5 brotli-11 trials
# of ~60 s on the default's weights, past NCCL's default of 10 minutes.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def setup_runtime(settings: Settings) -> Runtime:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device_type = pick_device_type(settings.device)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device(device_type)
    if device_type == "cuda" and settings.precision == "fp32":
        raise SettingsError("PRECISION=fp32 is invalid on CUDA: its attention kernels take bf16; use PRECISION=auto")
    torch.set_num_threads(pick_cpu_threads(settings, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        pin_flash_attention()
    grad_accum_steps = settings.grad_accum_steps or max(1, 8 // world_size)
    settings.check_batch_layout(world_size, grad_accum_steps)
    if world_size > 1:
        if device_type == "mps":
            raise SettingsError("Apple MPS runs one process only; launch without torchrun or with --nproc_per_node=1")
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                device_id=device if device_type == "cuda" else None, timeout=PROCESS_GROUP_TIMEOUT)
    torch._dynamo.config.optimize_ddp = bool(settings.optimize_ddp)
    # Graphs of one function: recurrence off and on, training and scoring, one per cu_seqlens length of packed rows,
    # TTT's; past the limit (8) a fullgraph compile fails.
    torch._dynamo.config.recompile_limit = 64
    return Runtime(device, rank, world_size, local_rank, grad_accum_steps, **device_choices(device_type, settings))


def pick_attention(requested: str, device_type: str) -> str:
    """ATTENTION=auto: FlashAttention 3 on CUDA where it is installed, else SDPA; fa3: FA3 or a clear error."""
    if requested == "sdpa" or (requested == "auto" and device_type != "cuda"):
        return "sdpa"
    if find_flash_attention_3() is not None:
        return "fa3"
    if requested == "fa3":
        raise SettingsError("ATTENTION=fa3 but FlashAttention 3 is not installed: `pip install kernels` (on CUDA) or "
                            "the flash_attn_3 wheel (README: The attention kernel), or set ATTENTION=auto")
    return "sdpa"


# ----------------------------------------------------------------------------------------------
# Optimizer: Muon for the block matrices (momentum, then an orthogonalised update).


NS_COEFFS = {  # (a, b, c) of the quintic a X + b (X X^T) X + c (X X^T)^2 X, per iteration (the last repeats)
    "fixed": ((3.4445, -4.7750, 2.0315),),  # the baseline: one quintic tuned for speed
    # Polar Express (Amsel et al. 2025, modded-nanogpt): a quintic per iteration, singular values nearer 1 in 5.
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}


def newton_schulz_orthogonalize(G: Tensor, steps: int, eps: float = 1e-7, coeffs=NS_COEFFS["fixed"],
                                rounding: str = "1.0810") -> Tensor:
    """Approximately U V^T of G = U S V^T, by quintic Newton-Schulz iterations; G may be a batch (..., m, n).
    rounding="1.0714": that record's order of operations (transpose before normalising, c (A A)), the same in bf16."""
    transposed, late = G.size(-2) > G.size(-1), rounding == "1.0714"
    X = G.mT if transposed and late else G
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    if transposed and not late:
        X = X.mT
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + (c * (A @ A) if late else c * A @ A)) @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Momentum SGD, update orthogonalised (same-shaped matrices batched, split over ranks); decoupled decay. The
    gradient, momentum and row norms in state_dtype: fp32 (the 1.0810 record), or bf16 as the 1.0714 record's banks."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, rank: int, world_size: int,
                 ns_dtype: torch.dtype, orthogonalize=newton_schulz_orthogonalize, row_norm: bool = False,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      row_norm=row_norm, weight_decay=weight_decay))
        self.rank, self.world_size, self.ns_dtype, self.orthogonalize = rank, world_size, ns_dtype, orthogonalize
        self.state_dtype = state_dtype
        for p in (p for group in self.param_groups for p in group["params"]):  # once, not every step
            self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=state_dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            offsets = np.cumsum([0] + [p.numel() for p in params]).tolist()
            updates = torch.zeros(offsets[-1], device=params[0].device, dtype=self.ns_dtype)
            for shape, indices in same_shape_indices(params).items():
                mine = [i for i in indices[self.rank::self.world_size] if params[i].grad is not None]
                if not mine:
                    continue
                grads = [params[i].grad.to(self.state_dtype) for i in mine]
                bufs = [self.state[params[i]]["momentum_buffer"] for i in mine]
                for buf, grad in zip(bufs, grads):  # not foreach: for bf16 it rounds the factor to bf16 on a CPU
                    buf.mul_(group["momentum"]).add_(grad)
                g = torch.stack(grads).add_(torch.stack(bufs), alpha=group["momentum"])  # Nesterov
                if group["row_norm"]:  # equal-norm rows: every output unit gets a comparable step
                    g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype)
                g = self.orthogonalize(g.to(self.ns_dtype), group["backend_steps"])
                g = g * max(1, shape[0] / shape[1]) ** 0.5  # same RMS step size for tall matrices
                for update, i in zip(g, mine):
                    updates[offsets[i]:offsets[i + 1]] = update.reshape(-1)
            if self.world_size > 1:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            if group["weight_decay"] > 0:  # shrinks weights towards 0: smaller, more compressible rows
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            steps = [updates[offsets[i]:offsets[i + 1]].view_as(p).to(p.dtype) for i, p in enumerate(params)]
            torch._foreach_add_(params, steps, alpha=-group["lr"])


def same_shape_indices(params: list[Tensor]) -> dict[tuple, list[int]]:
    shapes = [tuple(p.shape) for p in params]
    return {shape: [i for i, other in enumerate(shapes) if other == shape] for shape in dict.fromkeys(shapes)}


# ----------------------------------------------------------------------------------------------
# Data: shards (SPEC.md) are a 256 x int32 header then uint16 token ids.

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 1024
BOS_ID = 1  # every document starts with it


def read_shard(path: str | Path) -> np.ndarray:
    """All tokens of a shard, after checking its header and size; a bad file is named in the error."""
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path), offset=SHARD_HEADER_BYTES)


def shard_token_count(path: str | Path) -> int:
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=256) if size >= SHARD_HEADER_BYTES else None
    if header is None or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a shard (bad magic/version or shorter than the 1024-byte header); "
                         f"delete it and download it again with data/cached_challenge_fineweb.py")
    num_tokens = int(header[2])
    if size != SHARD_HEADER_BYTES + 2 * num_tokens:
        raise ValueError(f"{path}: {size} bytes, but its header promises {num_tokens} tokens "
                         f"({SHARD_HEADER_BYTES + 2 * num_tokens} bytes); the file is truncated or corrupt, "
                         f"download it again with data/cached_challenge_fineweb.py")
    return num_tokens


def shard_paths(data_path: str, split: str, vocab_size: int) -> list[str]:
    name = f"fineweb_{split}_*.bin"
    pattern, paths = os.path.join(data_path, name), sorted(glob.glob(os.path.join(glob.escape(data_path), name)))
    if not paths:
        raise FileNotFoundError(f"no {split} shards match {pattern}; download them with `python3 "
                                f"data/cached_challenge_fineweb.py --variant sp{vocab_size}` or set DATA_PATH")
    return paths


def training_data_id(paths: list[str]) -> str:
    """The shards' names and sizes, hashed: the same shards give the same id on any machine, in any folder."""
    listing = "".join(f"{os.path.basename(p)} {os.path.getsize(p)}\n" for p in paths)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{where}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}; "
                         f"the shards were made with another tokenizer: set VOCAB_SIZE/DATA_PATH to match")


class TokenStream:
    """The training shards read in order as one endless stream of tokens (the official loader)."""

    def __init__(self, paths: list[str], vocab_size: int, seq_len: int):
        self.paths, self.vocab_size, self.seq_len = paths, vocab_size, seq_len
        self.shard_index, self.position, self.tokens = -1, 0, np.empty(0, dtype=np.uint16)

    def sequences(self, count: int) -> list[tuple[np.ndarray, int]]:  # one block: each overlaps the next by 1
        pieces, n = [], count * self.seq_len + 1
        while n > 0:
            if self.position >= self.tokens.size:
                self.shard_index = (self.shard_index + 1) % len(self.paths)
                self.tokens, self.position = read_shard(self.paths[self.shard_index]), 0
                check_token_ids(self.tokens, self.vocab_size, self.paths[self.shard_index])
            pieces.append(self.tokens[self.position:self.position + n])
            self.position, n = self.position + pieces[-1].size, n - pieces[-1].size
        block = np.concatenate(pieces)
        return [(block, i * self.seq_len) for i in range(count)]


class ShuffledSequences:
    """The 1.0810 record's ShuffledSequenceLoader on its rank v of n: shards paths[v::n], PCG64(v), each cut at a random
    phase into shuffled sequences, drawn from a shard chosen by sequences left; all cut again once all are used."""

    def __init__(self, paths: list[str], counts: list[int], v: int, n: int, seq_len: int):
        self.paths, self.counts, self.seq_len = paths[v::n], counts[v::n], seq_len
        self.rng = np.random.Generator(np.random.PCG64(v))
        self.maps = [np.memmap(p, "<u2", "r", SHARD_HEADER_BYTES, (c,)) for p, c in zip(self.paths, self.counts)]
        self.starts = [self.cut(i) for i in range(len(self.paths))]  # not all empty: check_streams_fit

    def cut(self, i: int) -> list[int]:
        num_tokens, seq_len = self.counts[i], self.seq_len
        max_phase = min(seq_len - 1, max(0, num_tokens - seq_len - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        return (phase + self.rng.permutation(max(0, num_tokens - 1 - phase) // seq_len) * seq_len).tolist()

    def sequences(self, count: int) -> list[tuple[np.ndarray, int]]:  # (tokens, start): read when sliced
        drawn = []
        for _ in range(count):
            if not any(self.starts):
                self.starts = [self.cut(i) for i in range(len(self.paths))]
            remaining = np.array([len(s) for s in self.starts], dtype=np.float64)
            i = int(self.rng.choice(len(self.paths), p=remaining / remaining.sum()))
            drawn.append((self.maps[i], self.starts[i].pop()))
        return drawn


def first_bos(tokens: np.ndarray, chunk: int = 1 << 16) -> int:
    """Where a shard's first document starts (0 if none does), read a chunk at a time: usually its first token."""
    for start in range(0, len(tokens), chunk):
        hits = np.flatnonzero(tokens[start:start + chunk] == BOS_ID)
        if hits.size:
            return start + int(hits[0])
    return 0


def document_cu_seqlens(tokens: np.ndarray | Tensor, max_len: int, bucket: int = 64) -> tuple[Tensor, int]:
    """A packed row's attention segments, as the 1.0714 record's _build_cu_seqlens cuts them: at 0, at every BOS and
    every max_len tokens into a document. Returns (cu_seqlens, the longest segment): int32 boundaries (on the row's
    device), padded with the row's length to a multiple of `bucket` entries: few shapes to compile (a compiled
    model also compiles anew for each max_seqlen: the record trains with max_len). Rows (B, T): of the row they form
    end to end, each of the B also cut at its start."""
    ids = tokens.cpu().numpy() if torch.is_tensor(tokens) else np.asarray(tokens)
    n, starts = ids.size, np.union1d(np.arange(0, ids.size, ids.shape[-1]), np.flatnonzero(ids.ravel() == BOS_ID))
    cuts = np.concatenate([np.arange(a, b, max_len) for a, b in zip(starts, np.append(starts[1:], n))] + [[n]])
    padded = torch.from_numpy(np.pad(cuts, (0, -len(cuts) % bucket), constant_values=n).astype(np.int32))
    return padded.to(tokens.device if torch.is_tensor(tokens) else "cpu"), int(np.diff(cuts).max())


class PackedDocuments:
    """The 1.0714 record's DocumentPackingLoader on its n GPUs at once: one cursor, from the first shard's first BOS;
    a step is n adjacent spans of `span` tokens, GPU v's the v-th; when the n do not fit in the rest of the shard, all
    move to the next shard's first BOS (after the last shard, the first). One process of the record differs: it checks
    a span at a time."""

    def __init__(self, paths: list[str], counts: list[int], n: int, span: int):
        self.maps = [np.memmap(p, "<u2", "r", SHARD_HEADER_BYTES, (c,)) for p, c in zip(paths, counts)]
        self.first = [first_bos(tokens) for tokens in self.maps]
        self.n, self.span = n, span
        self.steps_per_shard = [max(0, c - b) // (n * span) for c, b in zip(counts, self.first)]
        if not any(self.steps_per_shard):
            raise ValueError(f"no train shard in {os.path.dirname(paths[0])} holds LOADER_STREAMS x (TRAIN_BATCH_TOKENS"
                             f" / LOADER_STREAMS + 1) = {n * span} tokens from its first BOS: lower TRAIN_BATCH_TOKENS")
        self.shard, self.cursor = 0, self.first[0]

    def spans(self) -> list[tuple[np.ndarray, int]]:  # (tokens, start) of each GPU, read when sliced
        while self.cursor + self.n * self.span > len(self.maps[self.shard]):
            self.shard = (self.shard + 1) % len(self.maps)
            self.cursor = self.first[self.shard]
        start, self.cursor = self.cursor, self.cursor + self.n * self.span
        return [(self.maps[self.shard], start + v * self.span) for v in range(self.n)]


class TrainBatchLoader:
    """A step's sequences: j goes to micro-step j // (world x micro-batch) of rank j // micro-batch % world, so any
    world size and accumulation trains on the same ones; LOADER_STREAMS=N: the v-th N-th from stream v (the record's
    GPU v of N; one per shard if fewer); 0: the shards in order (the official loader). PACK_DOCUMENTS=1: micro-step m
    of rank r is GPU m x world + r of PackedDocuments. A rank reads only its own."""

    def __init__(self, settings: Settings, runtime: Runtime):
        s, rt, self.rt = settings, runtime, runtime
        self.vocab_size, self.seq_len = s.vocab_size, s.train_seq_len
        self.paths = shard_paths(s.data_path, "train", s.vocab_size)
        self.counts = [shard_token_count(p) for p in self.paths]  # all headers now, not after the training time
        if sum(self.counts) == 0:
            raise ValueError(f"the train shards in {s.data_path} hold no tokens: download them again")
        self.num_streams, seqs = min(s.loader_streams, len(self.paths)), s.train_batch_tokens // s.train_seq_len
        check_streams_fit(self.paths, self.counts, self.num_streams, s.train_seq_len)
        self.micro_seqs, n = seqs // (rt.world_size * rt.grad_accum_steps), max(1, self.num_streams)
        self.mine = [(m * rt.world_size + rt.rank) * self.micro_seqs + i  # this rank's sequences, micro-step by step
                     for m in range(rt.grad_accum_steps) for i in range(self.micro_seqs)]
        self.parts = {v: range(-(-v * seqs // n), -(-(v + 1) * seqs // n)) for v in range(n)}
        self.stream = partial(ShuffledSequences, self.paths, self.counts, n=n, seq_len=self.seq_len) if \
            self.num_streams else lambda v: TokenStream(self.paths, self.vocab_size, self.seq_len)
        self.packed = PackedDocuments(self.paths, self.counts, s.loader_streams, s.train_batch_tokens //
                                      s.loader_streams + 1) if s.pack_documents else None
        self.streams = {v: self.stream(v) for v, part in self.parts.items() if set(part) & set(self.mine)
                        and not self.packed}

    def next_step(self) -> list[tuple]:
        """This rank's micro-batches: (inputs, targets), packed: (inputs, targets, cu_seqlens, max_seqlen)."""
        if self.packed:
            spans, rt = self.packed.spans(), self.rt
            return [self.packed_row(*spans[m * rt.world_size + rt.rank]) for m in range(rt.grad_accum_steps)]
        drawn = {}
        for v, stream in self.streams.items():  # a stream draws all its sequences, to stay in step
            drawn.update(zip(self.parts[v], stream.sequences(len(self.parts[v]))))
        mine = [drawn[j] for j in self.mine]
        return [self.batch(mine[i:i + self.micro_seqs]) for i in range(0, len(mine), self.micro_seqs)]

    def calibration_batches(self, count: int):
        """GPTQ's: `count` micro-batches of stream 0 (the record's rank 0) from its start, every world-th per rank."""
        drawn = self.stream(0).sequences(count * self.micro_seqs)
        for b in range(self.rt.rank, count, self.rt.world_size):
            yield self.batch(drawn[b * self.micro_seqs:(b + 1) * self.micro_seqs])

    def packed_row(self, tokens: np.ndarray, start: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """A GPU's row (1, TRAIN_BATCH_TOKENS / LOADER_STREAMS), its documents cut every TRAIN_SEQ_LEN tokens."""
        length = self.packed.span - 1
        cu_seqlens = self.to_device(document_cu_seqlens(tokens[start:start + length], self.seq_len)[0])
        return *self.batch([(tokens, start)], length), cu_seqlens, self.seq_len

    def batch(self, sequences: list[tuple[np.ndarray, int]], length: int = 0) -> tuple[Tensor, Tensor]:
        rows = np.stack([tokens[start:start + (length or self.seq_len) + 1] for tokens, start in sequences])
        check_token_ids(rows, self.vocab_size, f"the train shards in {os.path.dirname(self.paths[0])}")
        rows = self.to_device(torch.from_numpy(rows.astype(np.int64)))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def to_device(self, t: Tensor) -> Tensor:  # pinned, the copy queued behind the step the device is running
        return t.pin_memory().to(self.rt.device, non_blocking=True) if self.rt.pin_memory else t.to(self.rt.device)


def check_streams_fit(paths: list[str], counts: list[int], num_streams: int, seq_len: int) -> None:
    """Stream v of n cuts its sequences from the shards paths[v::n] (a short last shard is fine beside a longer one)."""
    fit = [n for n in range(num_streams, -1, -1) if all(max(counts[v::n]) > seq_len for v in range(n))]  # 0: in order
    if fit[0] != num_streams:
        v = next(v for v in range(num_streams) if max(counts[v::num_streams]) <= seq_len)
        raise ValueError(f"loader stream {v} of {num_streams} reads only the train shards "
                         f"{', '.join(paths[v::num_streams])}, which hold no TRAIN_SEQ_LEN + 1 = {seq_len + 1} tokens "
                         f"(each stream needs one shard that long): set LOADER_STREAMS={' or '.join(map(str, fit))} "
                         f"(each works with these shards) or lower TRAIN_SEQ_LEN")


@dataclass
class ValidationSplit:
    tokens: np.ndarray  # scored tokens + 1: token i+1 is scored given tokens 0..i
    is_full: bool

    @property
    def num_scored(self) -> int:
        return self.tokens.size - 1

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokens.astype("<u2").tobytes()).hexdigest()[:16]


def load_validation_split(settings: Settings) -> ValidationSplit:
    """The validation shards, cut to whole sequences (and to MAX_VAL_TOKENS when it is set)."""
    paths = shard_paths(settings.data_path, "val", settings.vocab_size)
    tokens = np.concatenate([read_shard(p) for p in paths])
    check_token_ids(tokens, settings.vocab_size, f"validation shards {paths[0]}...")
    seq_len = settings.train_seq_len
    usable = (tokens.size - 1) // seq_len * seq_len
    if settings.max_val_tokens:
        usable = min(usable, settings.max_val_tokens // seq_len * seq_len)
    if usable <= 0:
        raise ValueError(f"the validation split in {settings.data_path} has fewer than TRAIN_SEQ_LEN={seq_len} "
                         f"scorable tokens (MAX_VAL_TOKENS={settings.max_val_tokens})")
    full = usable == (tokens.size - 1) // seq_len * seq_len
    return ValidationSplit(tokens[:usable + 1], full)


# ----------------------------------------------------------------------------------------------
# Evaluation: val_bpb = (nats per token / ln 2) x (tokens / bytes), with the bytes of SPEC.md.


@dataclass
class ByteTable:
    """Per token id: UTF-8 bytes without the leading space, whether it has one, whether it is a boundary."""
    base_bytes: np.ndarray | Tensor
    has_leading_space: np.ndarray | Tensor
    is_boundary: np.ndarray | Tensor

    def on(self, device: torch.device) -> ByteTable:
        return ByteTable(*(torch.from_numpy(a).to(device) for a in (self.base_bytes, self.has_leading_space,
                                                                      self.is_boundary)))

    def target_bytes(self, prev_ids, target_ids):
        return self.base_bytes[target_ids] + (self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids])


def build_byte_table(tokenizer_path: str, vocab_size: int) -> ByteTable:
    if not os.path.exists(tokenizer_path):
        raise FileNotFoundError(f"TOKENIZER_PATH={tokenizer_path} does not exist; download it with `python3 "
                                f"data/cached_challenge_fineweb.py --variant sp{vocab_size}` or set TOKENIZER_PATH")
    base = np.zeros(vocab_size, dtype=np.int64)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)  # ids the tokenizer never emits count as boundaries
    try:  # a file that is no tokenizer (garbage, a folder, a JSON without the keys) is named, not traced
        if tokenizer_path.endswith(".json"):  # byte260: special ids, then one id per byte value
            spec = json.loads(Path(tokenizer_path).read_text())
            tokenizer_vocab, offset = int(spec["vocab_size"]), int(spec["byte_offset"])
            base[offset:tokenizer_vocab], boundary[offset:tokenizer_vocab] = 1, False
        else:
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
            tokenizer_vocab = sp.vocab_size()
            for i in range(min(tokenizer_vocab, vocab_size)):
                if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                    continue  # zero bytes, and a boundary for the next token's leading space
                boundary[i] = False
                piece = sp.id_to_piece(i)
                if sp.is_byte(i):
                    base[i] = 1
                else:
                    space[i] = piece.startswith("\u2581")
                    base[i] = len(piece.removeprefix("\u2581").encode("utf-8"))
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TOKENIZER_PATH={tokenizer_path} is no SentencePiece .model or byte260 .json ({e!r})")
    if tokenizer_vocab != vocab_size:
        raise ValueError(f"{tokenizer_path} has a vocabulary of {tokenizer_vocab} but VOCAB_SIZE={vocab_size}; "
                         f"set VOCAB_SIZE={tokenizer_vocab} or point TOKENIZER_PATH at the matching tokenizer")
    return ByteTable(base, space, boundary)


def check_split_fits_tokenizer(split: ValidationSplit, table: ByteTable, s: Settings, sample: int = 4096) -> None:
    t, fix = split.tokens, f"point DATA_PATH={s.data_path} and TOKENIZER_PATH={s.tokenizer_path} at one export"
    if not ((table.base_bytes > 0)[t[1:]].any() or (table.has_leading_space[t[1:]] & ~table.is_boundary[t[:-1]]).any()):
        raise ValueError(f"the validation split has zero bytes under TOKENIZER_PATH: val_bpb is undefined: {fix}")
    if s.tokenizer_path.endswith(".json"):
        return  # byte260: any id sequence is its own encoding
    import difflib, sentencepiece as spm  # noqa: E401
    sp, kept, total = spm.SentencePieceProcessor(model_file=s.tokenizer_path), 0, 0
    for run in np.split(t[:sample], np.flatnonzero(table.is_boundary[t[:sample]])):  # control, unknown ids: no text
        ids = run[~table.is_boundary[run]].tolist()  # compared without spaces: normalisation moves them
        old, new = ([p.strip("\u2581") for p in pieces if p.strip("\u2581")] for pieces in
                    (sp.id_to_piece(ids), sp.encode(sp.decode(ids), out_type=str)))
        kept += sum(m.size for m in difflib.SequenceMatcher(None, old, new, autojunk=False).get_matching_blocks())
        total += len(old)
    if kept < 0.95 * total:  # measured (tests/test_tokenizer_match.py): own shards >= 98%, others <= 93%
        raise ValueError(f"the validation shards were not made with TOKENIZER_PATH: only {kept / total:.1%} of {total} "
                         f"tokens decode and re-encode to themselves (>= 95% when they match): {fix}")


def check_byte_accounting(split: ValidationSplit, table: ByteTable, s: Settings, num_docs: int = 256) -> None:
    """The table's bytes of sampled validation documents (BOS + ids, as the shards hold them) equal the UTF-8 bytes of
    their decoded text, <unk> counting 0 (SPEC.md); no id without text occurs but BOS, EOS and <unk>."""
    t, path = split.tokens, s.tokenizer_path
    if path.endswith(".json"):  # byte260: special ids, then one id per byte value
        spec = json.loads(Path(path).read_text())
        utf8 = lambda ids: bytes(i - int(spec["byte_offset"]) for i in ids)  # noqa: E731 (the text's bytes as they are)
        specials = {spec.get("eos_id"), spec.get("unk_id")}
    else:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=path)
        utf8, specials = lambda ids: sp.decode(ids).encode(), {sp.eos_id(), sp.unk_id()}  # noqa: E731
    present = np.zeros(table.is_boundary.size, dtype=bool)
    present[t] = True  # (np.bincount would copy the split to int64 first)
    strays = sorted(set(np.flatnonzero(present & table.is_boundary).tolist()) - specials - {BOS_ID})  # control, unused
    starts, counted, decoded = np.flatnonzero(t[1:] == BOS_ID) + 1, 0, 0  # whole documents after the first
    for a, b in list(zip(starts[:-1], starts[1:]))[::max(1, -(-len(starts) // num_docs))]:  # <= num_docs, spread
        counted += int(table.target_bytes(t[a - 1:b - 1], t[a:b]).sum())  # BOS and its document
        doc = t[a + 1:b]
        decoded += sum(len(utf8(run[~table.is_boundary[run]].tolist()))  # decoded between <unk> pieces
                       for run in np.split(doc, np.flatnonzero(table.is_boundary[doc])))
    if strays or counted != decoded:
        raise ValueError(f"TOKENIZER_PATH={path} miscounts the validation text (SPEC.md): {counted} bytes in sampled "
                         f"documents of {decoded} UTF-8 bytes; ids of no text in it: {strays[:8]}; use the unmodified "
                         f"tokenizer of the shards in DATA_PATH={s.data_path}")


def window_ends(num_scored: int, seq_len: int, stride: int) -> np.ndarray:
    """Where windows end (exclusive, scored-token indices): window k sees seq_len tokens, scores those after ends[k-1]
    (the first all its own): each once, with >= seq_len - stride of context when it can. stride = seq_len: plain."""
    return np.minimum(np.arange(seq_len, num_scored + stride, stride), num_scored)


def add_scored(sums: Tensor, nats: Tensor, num_bytes: Tensor, scored: Tensor) -> None:
    """sums (nats, tokens, bytes) += those of the targets that `scored` marks."""
    sums[0] += (nats.double() * scored).sum()
    sums[1] += scored.sum()
    sums[2] += (num_bytes.double() * scored).sum()


def ttt_documents(tokens: np.ndarray) -> np.ndarray:
    """(start, length) of each document, as the 1.0714 record's _find_docs: from its BOS (or the split's start)
    through the next BOS, its last target; the last one to the split's end (a lone BOS there has no target)."""
    starts = np.union1d(0, np.flatnonzero(tokens == BOS_ID))
    lengths = np.append(starts[1:] + 1, len(tokens)) - starts
    return np.stack((starts, lengths), 1)[lengths >= 2]


def ttt_batches(documents: np.ndarray, size: int) -> list[np.ndarray]:
    """The record's batches: the documents sorted by length (ties in order), `size` at a time."""
    order = np.argsort(documents[:, 1], kind="stable")
    return [documents[order[i:i + size]] for i in range(0, len(order), size)]


def ttt_batch_costs(batches: list[np.ndarray], chunk: int, window: int) -> list[int]:
    """Tokens through the model of each batch: its documents x the widths of its longest document's chunk steps."""
    return [len(b) * int(np.minimum(np.arange(1, -(-(b[:, 1].max() - 1) // chunk) + 1) * chunk, window).sum())
            for b in batches]


def share_by_cost(costs: list[float], world_size: int) -> list[list[int]]:
    """Indices for each rank, the costliest first, each to the rank with the least cost so far (the lowest on a tie):
    deterministic, and the last rank ends within 4/3 of the best split's time (Graham 1969)."""
    loads, shares = [0.0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank = loads.index(min(loads))
        shares[rank].append(i)
        loads[rank] += costs[i]
    return shares


@contextlib.contextmanager
def adapting(model: nn.Module):
    """The model as test-time adapters train on it: eval mode, no weight gradients (as its graph was compiled)."""
    training = model.training
    model.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.train(training).requires_grad_(True)


class Evaluator:
    """Scores the validation split (periodic, final, round trip): plain, sliding (last `stride` targets) or TTT.
    PACK_DOCUMENTS=1: documents attend within themselves (nats), as trained; plain passes score the 1.0714 record's
    rows of VAL_BATCH_SIZE / 8 tokens (eval_val), all of them (it leaves out each rank's last incomplete batch)."""

    def __init__(self, split: ValidationSplit, table: ByteTable, settings: Settings, runtime: Runtime,
                 log=lambda line: None):
        self.split, self.settings, self.rt, self.log = split, settings, runtime, log
        self.table = table.on(runtime.device)
        # On the device once, windows gathered there (not copied per batch from pageable memory); int32: 162 MB for
        # the 40.5M tokens of sp8192's split.
        self.tokens = torch.from_numpy(split.tokens.astype(np.int32)).to(runtime.device)
        seq_len = settings.train_seq_len
        self.batch_seqs = settings.val_batch_size // (seq_len * runtime.world_size * runtime.grad_accum_steps)
        self.ttt_rows = min(self.batch_seqs, math.ceil(settings.ttt_chunk_tokens / seq_len / runtime.world_size))
        self.packed, self.row_tokens = bool(settings.pack_documents), min(self.batch_seqs * seq_len, split.num_scored)
        self.lora_forward = None  # TTT_METHOD=lora's, once made (adapter_forward)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, stride: int = 0, stage: str = "validation") -> tuple[float, float]:
        """(val_loss in nats per token, val_bpb) over the split; stride 0 or >= TRAIN_SEQ_LEN: plain windows."""
        progress = Progress(self.log, stage)
        rows = self.packed and not 0 < stride < self.settings.train_seq_len
        score = self.reduce(self.scored_sums(model, stride, track=progress.over, rows=rows))
        progress.done()
        return score

    @torch.inference_mode()
    def scored_sums(self, model: nn.Module, stride: int, window_range: tuple[int, int] | None = None,
                    track=iter, rows: bool = False) -> Tensor:
        """(nats, tokens, bytes) scored on this rank, over all windows or the window indices [lo, hi)."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.rt.device)  # nats, tokens, bytes
        for nats, num_bytes, scored in self.scored_windows(model, stride, window_range, track, rows):
            add_scored(sums, nats, num_bytes, scored)
        return sums

    def reduce(self, sums: Tensor) -> tuple[float, float]:
        if self.rt.distributed:
            dist.all_reduce(sums)
        nats, tokens, num_bytes = sums.tolist()
        val_loss = nats / tokens
        return val_loss, val_loss / math.log(2) * tokens / num_bytes

    def scored_windows(self, model: nn.Module, stride: int, window_range: tuple[int, int] | None = None, track=iter,
                       rows: bool = False):
        """(nats, bytes, scored mask) per batch of this rank's windows (starts through `track`: Progress.over); padded
        rows keep one compiled shape. rows: plain windows of row_tokens, one a batch."""
        seq_len, batch, rt = self.settings.train_seq_len, self.batch_seqs, self.rt
        if rows:
            seq_len, batch, stride = self.row_tokens, 1, 0
        ends = window_ends(self.split.num_scored, seq_len, min(stride, seq_len) or seq_len)
        new_targets = np.diff(ends, prepend=ends[0] - seq_len)  # the first window scores all its targets
        lo, hi = window_range or (0, len(ends))
        first, last = lo + (hi - lo) * rt.rank // rt.world_size, lo + (hi - lo) * (rt.rank + 1) // rt.world_size
        positions, offsets = torch.arange(seq_len, device=rt.device), torch.arange(seq_len + 1, device=rt.device)
        ends, new_targets = torch.from_numpy(ends).to(rt.device), torch.from_numpy(new_targets).to(rt.device)
        was_training = model.training
        model.eval()
        for start in track(range(first, last, batch)):
            index = torch.arange(start, start + batch, device=rt.device)
            real = index.clamp(max=last - 1)  # padding rows repeat the last window and score nothing
            windows = self.tokens[(ends[real] - seq_len)[:, None] + offsets].long()
            inputs, targets = windows[:, :-1], windows[:, 1:]
            new = torch.where(index < last, new_targets[real], 0)
            scored = (positions[None, :] >= seq_len - new[:, None]).double()
            yield self.nats(model, inputs, targets), self.table.target_bytes(inputs, targets), scored
        model.train(was_training)

    def nats(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        """Per target. PACK_DOCUMENTS: the windows end to end as one packed row, each document in it (cut at every BOS,
        every TRAIN_SEQ_LEN tokens and each window's start: document_cu_seqlens) attending within itself; a trained
        SmearGate (not the 1.0714 record's: it stays 0) still mixes a window's last token into the next one's first."""
        if not self.packed:
            return model(inputs, targets)
        seq_len = self.settings.train_seq_len  # max_seqlen: fixed, one compiled graph
        cu_seqlens = document_cu_seqlens(inputs, seq_len)[0]
        return model(inputs.reshape(1, -1), targets.reshape(1, -1), cu_seqlens, seq_len).view_as(targets)

    def evaluate_with_ttt(self, model: nn.Module, stride: int, stage: str = "ttt_eval") -> tuple[float, float]:
        """Legal score-first TTT: chunks of ~TTT_CHUNK_TOKENS scored tokens in order, each scored (final) before it is
        trained on (TTT_EPOCHS SGD steps, LR cosine-decayed): no token influences its own score or an earlier one."""
        s, seq_len = self.settings, self.settings.train_seq_len
        ends = window_ends(self.split.num_scored, seq_len, min(stride, seq_len) or seq_len)
        starts = np.concatenate(([0], ends[:-1]))  # the first target each window scores
        chunks = np.split(np.arange(len(ends)), np.flatnonzero(np.diff(starts // s.ttt_chunk_tokens)) + 1)
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=s.ttt_lr, momentum=0.9)
        sums, progress = torch.zeros(3, dtype=torch.float64, device=self.rt.device), Progress(self.log, stage, "chunks")
        for c, windows in enumerate(progress.over(chunks)):
            sums += self.scored_sums(model, stride, (windows[0], windows[-1] + 1))
            if c < len(chunks) - 1:  # training on the last chunk would change no score
                optimizer.param_groups[0]["lr"] = s.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / (len(chunks) - 1)))
                self.train_on_scored(model, optimizer, starts[windows[0]], ends[windows[-1]])
        score = self.reduce(sums)
        progress.done()
        return score

    def train_on_scored(self, model: nn.Module, optimizer: torch.optim.Optimizer, first: int, end: int) -> None:
        """TTT_EPOCHS steps on sequences covering the scored targets [first, end); ranks take every world_size-th,
        gradients in one flat buffer per dtype (one all-reduce each a step); one batch shape (filler rows weigh 0):
        compile_ttt's. A bf16 parameter's gradient stays bf16 (reduced, clipped, stepped), as in the record's TTT."""
        rt, seq_len, params = self.rt, self.settings.train_seq_len, optimizer.param_groups[0]["params"]
        seq_starts = np.maximum(np.arange(end - seq_len, first - seq_len, -seq_len), 0)[::-1]  # the record's order
        mine = seq_starts[rt.rank::rt.world_size]
        padded = np.resize(mine, math.ceil(len(mine) / self.ttt_rows) * self.ttt_rows)
        padded, offsets = torch.from_numpy(padded).to(rt.device), torch.arange(seq_len + 1, device=rt.device)
        flats = []
        for dtype in dict.fromkeys(p.dtype for p in params):
            group = [p for p in params if p.dtype == dtype]
            flats.append(torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=rt.device))
            for p, grad in zip(group, flats[-1].split([p.numel() for p in group])):
                p.grad = grad.view_as(p)  # backward adds into the buffer in place
        model.train()
        for _ in range(self.settings.ttt_epochs):
            torch._foreach_zero_(flats)
            for b in range(0, len(padded), self.ttt_rows):
                tokens = self.tokens[padded[b:b + self.ttt_rows, None] + offsets].long()
                weight = torch.arange(b, b + self.ttt_rows, device=rt.device) < len(mine)
                ((model(tokens[:, :-1], tokens[:, 1:]).sum(1) * weight).sum() / (len(seq_starts) * seq_len)).backward()
            for flat in flats if rt.distributed else ():
                dist.all_reduce(flat)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        model.eval()

    def compile_ttt(self, model: GPT, compiled: nn.Module) -> None:
        """TTT's training graph (recurrence on), compiled in warm-up on made-up tokens, weights kept. full: forward and
        backward on zeros. lora: the adapters' forward and backward on random tokens, as the record, at the narrowest
        and the widest window (TTT_CHUNK_TOKENS, TRAIN_SEQ_LEN): one dynamic graph serves every width between; and for
        each batch size (the adapters' shapes are static: TTT_BATCH_SIZE and the last batch's, from the split's number
        of documents, all it reads of the split)."""
        s, device = self.settings, self.rt.device
        recurring, model.recurrence_active = model.recurrence_active, bool(s.recur_layer_ids)
        if s.ttt_method == "lora":
            forward, generator = self.adapter_forward(model), torch.Generator().manual_seed(0)
            sizes = sorted({len(b) for b in ttt_batches(ttt_documents(self.split.tokens), s.ttt_batch_size)})
            with adapting(model):
                for size, width in ((size, width) for size in sizes for width in (s.ttt_chunk_tokens, s.train_seq_len)):
                    lora = BatchedTTTLoRA(size, model, s.ttt_lora_rank).to(device)
                    inputs, targets = (torch.randint(s.vocab_size, (size, width), generator=generator).to(device)
                                       for _ in range(2))
                    forward(inputs, targets, lora=lora).mean().backward()
        else:
            tokens = torch.zeros(self.ttt_rows, s.train_seq_len + 1, dtype=torch.int64, device=device)
            compiled(tokens[:, :-1], tokens[:, 1:]).sum().backward()
        model.zero_grad(set_to_none=True)
        model.recurrence_active = recurring

    def adapter_forward(self, model: GPT):
        """TTT_METHOD=lora's forward, with dynamic shapes when compiled: one graph for every window width and batch
        size (static shapes would compile each width, 43 at the record's 48 to 2048, or pad narrow windows to wide)."""
        if self.lora_forward is None:
            self.lora_forward = torch.compile(model, dynamic=True, fullgraph=True) if self.rt.compile else model
        return self.lora_forward

    def evaluate_with_lora_ttt(self, model: GPT, stride: int = 0, stage: str = "ttt_eval") -> tuple[float, float]:
        """The 1.0714 record's score-first TTT, per document (ttt_documents): its chunks of TTT_CHUNK_TOKENS in order,
        each seen after up to TRAIN_SEQ_LEN - TTT_CHUNK_TOKENS tokens of its own document and scored (final) before its
        adapters take TTT_EPOCHS AdamW steps on it. Batches of TTT_BATCH_SIZE documents (ttt_batches) run side by side
        with adapters drawn from SEED and the batch's index, so a batch scores the same on any rank: the ranks split
        them by cost (tokens through the model: share_by_cost), and the score does not depend on the world size."""
        s, rt, chunk, window = self.settings, self.rt, self.settings.ttt_chunk_tokens, self.settings.train_seq_len
        batches = ttt_batches(ttt_documents(self.split.tokens), s.ttt_batch_size)
        costs = ttt_batch_costs(batches, chunk, window)
        forward, sums = self.adapter_forward(model), torch.zeros(3, dtype=torch.float64, device=rt.device)
        progress = Progress(self.log, stage)
        mine = np.random.default_rng(s.seed).permutation(share_by_cost(costs, rt.world_size)[rt.rank]).tolist()
        with adapting(model):  # in an order drawn (any scores the same): Progress's estimate by count is then fair
            for index in progress.over(mine):
                sums += self.adapted_batch_sums(model, forward, batches[index], index)
        score = self.reduce(sums)
        progress.done()
        return score

    def adapted_batch_sums(self, model: GPT, forward, docs: np.ndarray, index: int) -> Tensor:
        """(nats, tokens, bytes) of a batch of documents (start, length), as the record's eval_val_ttt_lora: step c
        scores chunk c of each document in the up-to-TRAIN_SEQ_LEN tokens that end it (zeros after it, and in the rows
        of documents done), then trains on each unfinished document's mean nats over its chunk (the last columns)."""
        s, rt, chunk, window = self.settings, self.rt, self.settings.ttt_chunk_tokens, self.settings.train_seq_len
        lora = BatchedTTTLoRA(len(docs), model, s.ttt_lora_rank).to(rt.device)
        lora.reset(torch.Generator(rt.device).manual_seed(s.seed * 2**20 + index))
        adam = torch.optim.AdamW(lora.parameters(), s.ttt_lora_lr, betas=(s.ttt_beta1, s.ttt_beta2), eps=1e-10,
                                 weight_decay=s.ttt_weight_decay, fused=rt.fused_adam)
        num_targets, sums = docs[:, 1] - 1, torch.zeros(3, dtype=torch.float64, device=rt.device)
        chunks = -(-num_targets // chunk)
        column = lambda a: torch.from_numpy(np.asarray(a)).to(rt.device)[:, None]  # noqa: E731 (one value a document)
        for c in range(chunks.max()):
            width, end = min((c + 1) * chunk, window), np.minimum((c + 1) * chunk, num_targets)
            first = np.maximum(end - window, 0)  # each window's first token, in its document
            positions = torch.arange(width + 1, device=rt.device)
            tokens = self.tokens[(column(docs[:, 0] + first) + positions).clamp(max=self.tokens.numel() - 1)].long()
            length = column(np.where(c < chunks, end - first, 0))
            inputs, targets = (torch.where(positions[:-1] < length, t, 0) for t in (tokens[:, :-1], tokens[:, 1:]))
            scored = (positions[:-1] >= column(c * chunk - first)) & (positions[:-1] < length)
            nats = forward(inputs, targets, lora=lora)
            add_scored(sums, nats.detach(), self.table.target_bytes(inputs, targets), scored)
            for step in range(s.ttt_epochs if (c < chunks - 1).any() else 0):
                nats = forward(inputs, targets, lora=lora) if step else nats
                adam.zero_grad(set_to_none=True)
                (nats[:, width - chunk:].mean(-1) * column(c < chunks - 1)[:, 0]).sum().backward()
                adam.step()
        return sums


# ----------------------------------------------------------------------------------------------
# Export: matrices quantised per row (GPTQ or plain rounding; int8, or int6 with an int8 or int7 embedding), small
# tensors in 16 bits, then brotli, lzma or zlib, told apart on loading by their own first bytes.

INT8_KEEP_FLOAT_MAX_NUMEL = 65_536  # tensors this small cost little to keep in 16 bits
INT8_CLIP_QUANTILE = 0.9999984  # clip the rare extreme weight rather than widen every step of its row


def quantize_int8(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (per-tensor for vectors) symmetric int8 with a clip at a high quantile of |w|."""
    t32 = t.float().reshape(t.shape[0], -1) if t.ndim == 2 else t.float().reshape(1, -1)
    clip = torch.quantile(t32.abs(), INT8_CLIP_QUANTILE, dim=1) if t32.numel() else torch.zeros(t32.size(0))
    # Quantise with the scale exactly as stored; fp16's smallest normal number keeps it representable.
    scale = (clip / 127.0).clamp_min(2.0**-14).to(torch.float16 if t.ndim == 2 else torch.float32).float()
    q = torch.round(torch.clamp(t32, -clip[:, None], clip[:, None]) / scale[:, None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(t.shape), scale.to(torch.float16 if t.ndim == 2 else torch.float32)


def quantize_rows(t: Tensor, bits: int, clip_sigmas: float) -> tuple[Tensor, Tensor]:
    """EXPORT_QUANT=rtn at int6: each row rounded to nearest at GPTQ's clip, without its error spreading (fast)."""
    qmax, t32 = 2 ** (bits - 1) - 1, t.float()
    scale = (clip_sigmas * t32.std(1) / qmax).clamp_min(2.0**-24).half()
    return torch.round(t32 / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int8), scale


@contextlib.contextmanager
def exact_fp32_matmuls():
    """TF32 off inside (on CUDA it rounds fp32 matmul inputs to 10 mantissa bits), then as it was."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@exact_fp32_matmuls()  # the record rounds on the CPU, in exact fp32
def gptq_quantize(w: Tensor, H: Tensor, bits: int, clip_sigmas: float, block: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022) as the 1.0810 and 1.0714 records round: per-row int<bits>, clip = clip_sigmas x the
    row's std, columns rounded by descending input energy, each one's error spread through H^-1 (H = X^T X of the
    layer's inputs X) over those not yet rounded, so that the outputs X W^T move least; inputs never firing lose
    weights."""
    W, H, qmax = w.to(H.device, torch.float32), H.float().clone(), 2 ** (bits - 1) - 1
    scale = (clip_sigmas * W.std(1) / qmax).clamp_min(2.0**-24).half().float()  # the record's 1e-10: 0 in fp16
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(0.01 * H.diagonal().mean())  # damped for a well-conditioned inverse
    order = torch.argsort(H.diagonal(), descending=True)
    W, H = W[:, order].T.contiguous(), H[order][:, order]  # W^T: the columns to round are contiguous rows
    W[dead[order]] = 0
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U
    Q = torch.zeros_like(W)
    for a in range(0, W.size(0), block):  # lazy batch updates: the far columns take one matmul per block
        b = min(a + block, W.size(0))
        errors = torch.zeros(b - a, W.size(1), device=W.device)
        for i in range(a, b):
            Q[i] = torch.round(W[i] / scale).clamp(-qmax, qmax)
            errors[i - a] = (W[i] - Q[i] * scale) / U[i, i]
            W[i + 1:b] -= U[i, i + 1:b, None] * errors[i - a]
        W[b:] -= U[a:b, b:].T @ errors
    return Q.T[:, torch.argsort(order)].to(torch.int8).contiguous().cpu(), scale.half().cpu()


@torch.no_grad()
def collect_hessians(model: nn.Module, settings: Settings, runtime: Runtime, log=lambda line: None) -> dict:
    """H = X^T X of each matrix's inputs, the mean over GPTQ_CALIBRATION_BATCHES of stream 0 (training)."""
    hessians, count, progress = {}, settings.gptq_calibration_batches, Progress(log, "gptq_calibration")
    def add(name: str, x: Tensor) -> None:
        x = x.detach().flatten(0, -2).float()
        hessians[name] = hessians.get(name, 0) + x.T @ x
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: add(f"{name}.weight", args[0]))
             for name, m in model.named_modules() if isinstance(m, CastedLinear)]
    if model.lm_head is None:  # the tied output head's input
        hooks.append(model.final_norm.register_forward_hook(lambda m, args, out: add("tok_emb.weight", out)))
    batches = TrainBatchLoader(settings, runtime).calibration_batches(count)
    for inputs, targets in progress.over(batches, len(range(runtime.rank, count, runtime.world_size))):
        model(inputs, targets)
    for hook in hooks:
        hook.remove()
    for H in hessians.values() if runtime.distributed else ():
        dist.all_reduce(H)
    runtime.sync()
    progress.done()
    return {name: H / count for name, H in hessians.items()}


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    rows = q.float().reshape(scale.numel(), -1) * scale.float()[:, None]
    return rows.reshape(q.shape)


def clip_sigmas_of(name: str, clips: float | dict[str, float]) -> float:  # one for all, or the first kind in the name
    return next(c for part, c in clips.items() if part in name) if isinstance(clips, dict) else clips


def quantize_state_dict(state_dict: dict[str, Tensor], control_names: set[str], bits: int = 8,
                        mlp_bits: int | None = None, gptq: tuple[dict, float | dict, float] = ({}, 12.85, 20.0),
                        embed_bits: int = 8, track=iter) -> dict:
    """Matrices to int<bits> (MLP ones to int<mlp_bits>) + fp16 row scales, the embedding (the tied head) to
    int<embed_bits>, in int8 storage; control_names fp32, other small tensors fp16. gptq = (hessians, clip sigmas of
    the matrices (one, or by kind: Settings.gptq_clips), embedding's): GPTQ rounds each tensor with a hessian at its
    clip; below 8 bits, a matrix without one is rounded plainly at it, else at a quantile clip (quantize_int8)."""
    packed = {"int8": {}, "scales": {}, "float": {}, "dtypes": {}}
    for name, t in track(state_dict.items()):
        t, embedding = t.detach().cpu(), name == "tok_emb.weight"
        row_bits = embed_bits if embedding else mlp_bits if mlp_bits and ".mlp." in name else bits
        clip = gptq[2] if embedding else clip_sigmas_of(name, gptq[1])
        packed["dtypes"][name] = str(t.dtype).removeprefix("torch.")
        if not t.is_floating_point():
            packed["float"][name] = t
        elif name in control_names:
            packed["float"][name] = t.float()
        elif t.numel() <= INT8_KEEP_FLOAT_MAX_NUMEL:
            packed["float"][name] = t.half()
        elif name in gptq[0]:
            packed["int8"][name], packed["scales"][name] = gptq_quantize(t, gptq[0][name], row_bits, clip)
        elif row_bits < 8 and t.ndim == 2:
            packed["int8"][name], packed["scales"][name] = quantize_rows(t, row_bits, clip)
        else:
            packed["int8"][name], packed["scales"][name] = quantize_int8(t)
    return packed


def dequantize_state_dict(packed: dict) -> dict[str, Tensor]:
    state_dict = {name: t for name, t in packed["float"].items()}
    for name, q in packed["int8"].items():
        state_dict[name] = dequantize_int8(q, packed["scales"][name])
    return {name: t.to(getattr(torch, packed["dtypes"][name])) for name, t in state_dict.items()}


XZ_MAGIC, ZLIB_HEADER, SHUFFLE_MAGIC = b"\xfd7zXZ\x00", b"\x78", b"BSHF\x02"
PACKED_CODE = (b'#coding:latin-1\nimport brotli;exec(brotli.decompress("""', b'""".encode("latin-1")))\n')


def compress_packed(packed: dict, export_format: str = "int8+zlib") -> bytes:
    """quantize_state_dict's output, saved and compressed; brotli (quality 11) after the record's byte shuffle."""
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    if export_format.endswith("brotli"):  # the bytes of a kind (e.g. fp16 exponents) side by side compress better
        return brotli.compress(SHUFFLE_MAGIC + buffer.getvalue()[0::2] + buffer.getvalue()[1::2], quality=11)
    if export_format.endswith("lzma"):  # stronger than zlib on quantised weights (range coder with wider context)
        return lzma.compress(buffer.getvalue(), format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    return zlib.compress(buffer.getvalue(), level=9)


def decompress_packed(blob: bytes) -> dict:  # compress_packed's input, from its output
    if blob.startswith((XZ_MAGIC, ZLIB_HEADER)):
        raw = lzma.decompress(blob) if blob.startswith(XZ_MAGIC) else zlib.decompress(blob)
    else:  # brotli: the first byte's low bits are 1011 (RFC 7932: a 4 MiB window)
        shuffled = brotli.decompress(blob)[len(SHUFFLE_MAGIC):]
        raw, half = bytearray(len(shuffled)), (len(shuffled) + 1) // 2
        raw[0::2], raw[1::2] = shuffled[:half], shuffled[half:]
    return torch.load(io.BytesIO(raw), map_location="cpu")


def decompress_model(blob: bytes) -> dict[str, Tensor]:
    return dequantize_state_dict(decompress_packed(blob))


def pack_code(code: bytes) -> tuple[bytes, bytes]:
    """(source, packed): docstrings dropped, 1-space indents, brotli-11 in a latin-1 string (see PACKED_CODE)."""
    if code.startswith(PACKED_CODE[0]):  # this file runs packed
        literal = ast.literal_eval(code[len(PACKED_CODE[0]) - 3:3 - len(PACKED_CODE[1])].decode("latin-1"))
        return re.sub(rb"(?m)^ +", lambda m: 4 * m[0], brotli.decompress(literal.encode("latin-1"))), code
    for node in ast.walk(tree := ast.parse(code)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and \
                ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    text = re.sub(r"(?m)^(?:    )+", lambda m: m[0][::4], ast.unparse(tree))  # the same program in fewer bytes
    escape = {b"\\": b"\\\\", b'"': b'\\"', b"\r": b"\\r", b"\0": b"\\0"}  # \\0 then a digit would be octal: \\x00
    return code, PACKED_CODE[0] + re.sub(rb'[\\"\r]|\0(?![0-7])|(\0)', lambda m: b"\\x00" if m[1] else escape[m[0]],
                                         brotli.compress(text.encode(), quality=11)) + PACKED_CODE[1]


def check_packed_file(path: Path) -> None:
    """A packed file reads its own source back (pack_code): it must be byte for byte as pack_code wrote it."""
    code = path.read_bytes()
    if code.startswith(PACKED_CODE[0].split(b"\n")[0]) and not (code.startswith(PACKED_CODE[0]) and b"\r" not in code
                                                                and code.endswith(PACKED_CODE[1])):
        raise ValueError(f"{path}: a packed file changed since packing (CRLF line ends or bytes after its last "
                         f"line): copy it again byte for byte, or run the plain train_gpt.py")


# One core of a shared AMD EPYC, on int6 codes of Gaussian weights (brotli: 16.8 MB in 30.9 s): an estimate to log.
COMPRESS_MB_PER_S = {"brotli": 0.5, "lzma": 0.6, "zlib": 5.0}
FIT_CAP_STEPS = ((6, 5), (5, 5), (5, 4))  # (matrix bits, MLP matrix bits), tried in turn
FIT_PRUNE_MAX = 0.14  # share of the codes pruning may zero: past it, the step-down adds less error (test_export_fit)


def export_artifact(model: nn.Module, settings: Settings, code_bytes: int, log, hessians: dict | None = None,
                    ledger: dict | None = None) -> bytes:
    """The compressed model; EXPORT_FIT_CAP=1: over the cap, prune +-1 codes or take fewer bits."""
    s, state = settings, model.state_dict()
    control = model.control_tensor_names() if s.export_bits == 8 else set()  # int6: the record's fp16 for all
    gptq = (hessians or {}, s.gptq_clips, s.gptq_embed_clip_sigmas)
    plans = [(s.export_bits, None)] + list(FIT_CAP_STEPS if s.export_fit_cap and s.export_bits == 6 else ())
    for i, (bits, mlp_bits) in enumerate(plans):
        if i and len(blob) + code_bytes <= ARTIFACT_CAP_BYTES:
            break
        if i:
            log(f"export_fit: {len(blob) + code_bytes} bytes > {ARTIFACT_CAP_BYTES}; now int{bits} matrices, "
                f"int{mlp_bits} MLP matrices")
        rounding = Progress(log, "rounding", "tensors")
        packed = quantize_state_dict(state, control, bits, mlp_bits, gptq, s.export_embed_bits, rounding.over)
        rounding_ms = rounding.done()
        if hessians is not None and ledger is not None:
            ledger["gptq"] = ledger.get("gptq", 0.0) + rounding_ms
        mb = sum(t.nbytes for kind in ("int8", "scales", "float") for t in packed[kind].values()) / 1e6
        compression = Progress(log, "compression", note=f"started: {s.export_format} of {mb:.1f} MB, estimated "
                               f"{mb / COMPRESS_MB_PER_S[s.export_format.split('+')[1]]:.0f}s (no progress inside it)")
        blob = compress_packed(packed, s.export_format)
        compression.done()
        if s.export_fit_cap and len(blob) + code_bytes > ARTIFACT_CAP_BYTES:
            blob = prune_to_fit(packed, state, blob, ARTIFACT_CAP_BYTES - code_bytes, s.export_format, log)
    return blob


def prune_to_fit(packed: dict, state: dict, blob: bytes, max_bytes: int, export_format: str, log) -> bytes:
    """Zeroes the +-1 codes q whose weights w move least (w^2 - (w - q s)^2, s the row scale) till it fits max_bytes."""
    q8, rows = packed["int8"], {k: (q.reshape(packed["scales"][k].numel(), -1), packed["scales"][k].float()[:, None])
                                for k, q in packed["int8"].items()}
    cost = torch.cat([torch.where(q.abs() == 1, (state[k].cpu().reshape(q.shape) * q * 2 - s) * s, torch.inf).flatten()
                      for k, (q, s) in rows.items()])
    order, ones, n = torch.argsort(cost, stable=True), int(torch.isfinite(cost).sum()), 8 * (len(blob) - max_bytes)
    for _ in range(4):  # n: a bit saved per code, then scaled by what the last try saved (lzma: not in proportion)
        if n > min(FIT_PRUNE_MAX * cost.numel(), ones):  # deep: the caller steps bits down
            return blob
        codes = torch.cat([q.flatten() for q in q8.values()]).index_fill_(0, order[:n], 0)
        pruned = {k: c.view_as(q8[k]).clone() for k, c in zip(q8, codes.split([q.numel() for q in q8.values()]))}
        trial = compress_packed({**packed, "int8": pruned}, export_format)
        if len(trial) <= max_bytes:
            log(f"export_fit: pruned {n} of {ones} +-1 codes (the weights that move least): {len(trial)} bytes")
            return trial
        n = math.ceil(n * min(4, 1.02 * (len(blob) - max_bytes) / max(len(blob) - len(trial), 1)))
    return blob


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:  # disk full: remove the partial file rather than leave it filling the disk
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path} ({e}): it needs {len(data):,} bytes and its disk has "
                       f"{shutil.disk_usage(path.parent).free:,} bytes free; free some space and re-run") from None


# ----------------------------------------------------------------------------------------------
# Model: the baseline GPT. Weights are fp32 masters; activations run in the runtime's compute dtype.


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose fp32 weight is cast to the activations' dtype at use."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary embedding of the first `dims` dims of each head (all when 0); the rest attend by content alone."""

    def __init__(self, head_dim: int, base: float, dims: int = 0, rounding: str = "1.0810"):
        super().__init__()
        self.dims, self.base, self.rounding = min(dims, head_dim) or head_dim, base, rounding

    def forward(self, x: Tensor) -> Tensor:
        """Rotate pairs (i, i + dims/2) of x: (batch, seq, heads, head_dim) by angles of the position in the row, also
        in a packed row (as the 1.0714 record: within a document only the distance between positions counts). The
        records keep the frequencies in their model's dtype (ROPE_ROUNDING): in bf16, 1.0810 (and the official
        script) computes positions and angles in bf16 too (positions past 256 round), 1.0714 in fp32."""
        inv_freq = self.base ** (-torch.arange(0, self.dims, 2, device=x.device, dtype=torch.float32) / self.dims)
        angle_dtype = x.dtype if self.rounding == "1.0810" else torch.float32
        inv_freq = inv_freq.to(x.dtype).to(angle_dtype)  # in bf16 the records' 1 / base^x to the bit (for any dims)
        angles = torch.outer(torch.arange(x.size(1), device=x.device, dtype=angle_dtype), inv_freq)[:, None]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (seq, 1, dims / 2)
        x1, x2 = x[..., :self.dims].chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., self.dims:]), dim=-1)


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output y its component along the token's own value v (the residual has it)."""
    v_unit = F.normalize(v.repeat_interleave(y.size(2) // v.size(2), dim=2), dim=-1)
    return y - (y * v_unit).sum(-1, keepdim=True) * v_unit


# Attention kernels: FlashAttention 3 (FA3, the records' kernel, on CUDA) where installed, else PyTorch's SDPA.
FLASH_ATTENTION_3 = None  # the module giving FA3's flash_attn_func and flash_attn_varlen_func, once found
FA3_HUB_KERNEL = "kernels-community/flash-attn3"  # the Hugging Face `kernels` package's FA3 builds


def find_flash_attention_3():
    """The records' wheel (flash_attn_interface), else `kernels`' build, fetched from the hub here, before any timed
    work; None without either, or without a build for this GPU and torch."""
    global FLASH_ATTENTION_3
    if FLASH_ATTENTION_3 is None and importlib.util.find_spec("flash_attn_interface"):
        FLASH_ATTENTION_3 = importlib.import_module("flash_attn_interface")
    elif FLASH_ATTENTION_3 is None and importlib.util.find_spec("kernels") and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # the hub unreachable, no build for this GPU and torch: SDPA then
            FLASH_ATTENTION_3 = importlib.import_module("kernels").get_kernel(FA3_HUB_KERNEL, version=1)
    return FLASH_ATTENTION_3


def attention(q: Tensor, k: Tensor, v: Tensor, kernel: str, cu_seqlens: Tensor | None = None,
              max_seqlen: int = 0) -> Tensor:
    """Causal attention in FA3's layout: q (batch, seq, heads, dim), k and v (batch, seq, kv_heads, dim); the output
    is shaped as q. With cu_seqlens (document_cu_seqlens; batch 1) each segment of the row attends within itself."""
    if kernel == "fa3":  # the records' calls
        fa3 = FLASH_ATTENTION_3
        y = fa3.flash_attn_func(q, k, v, causal=True) if cu_seqlens is None else fa3.flash_attn_varlen_func(
            q[0], k[0], v[0], cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen, causal=True)
        y = y[0] if isinstance(y, tuple) else y  # some FA3 builds also return the softmax's log-sum-exp
        return y if cu_seqlens is None else y[None]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA's (batch, heads, seq, dim)
    gqa = k.size(1) != q.size(1)
    if cu_seqlens is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif not torch.compiler.is_compiling():
        y = segment_attention(q, k, v, cu_seqlens, gqa)
    else:
        y = document_masked_attention(q, k, v, cu_seqlens, gqa)
    return y.transpose(1, 2)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, gqa: bool) -> Tensor:
    """Uncompiled: causal SDPA segment by segment, the fastest exact way with a backward on a CPU (measured:
    bench/varlen_attention.py)."""
    bounds = cu_seqlens.tolist()
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                     enable_gqa=gqa) for a, b in zip(bounds, bounds[1:]) if b > a], 2)


def document_masked_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, gqa: bool,
                              flex: bool | None = None) -> Tensor:
    """Compiled (one graph: no loop over segments): FlexAttention's block-sparse kernel with a document mask on CUDA;
    elsewhere SDPA with the dense seq x seq mask, as FlexAttention has no CPU backward (rows there are short)."""
    positions = torch.arange(q.size(2), device=q.device)
    document = torch.searchsorted(cu_seqlens, positions.to(cu_seqlens.dtype), right=True)
    same_document_causal = lambda b, h, i, j: (document[i] == document[j]) & (j <= i)  # noqa: E731
    if q.is_cuda if flex is None else flex:
        mask = create_block_mask(same_document_causal, None, None, q.size(2), q.size(2), device=q.device)
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    mask = same_document_causal(None, None, positions[:, None], positions[None, :])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def with_lora(out: Tensor, lora: dict | None, target: str, x: Tensor) -> Tensor:
    """out, plus the test-time adapter of `target` at this block pass (BatchedTTTLoRA.at) applied to x, if any."""
    return out if lora is None else out + lora[target](x)


GATE_INPUTS = 12  # SmearGate and the attention output gate read this many leading channels of their input


class CausalSelfAttention(nn.Module):
    """Grouped-query attention; q and k are RMS-normalised, rotated, and q gets a learned per-head gain. gate: each
    head's output is scaled by 2 sigmoid(W x[:12]), x the attention's input, W zero-initialised (the 1.0714 record)."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float,
                 rope_dims: int = 0, exclusive: bool = False, gate: bool = False, rope_rounding: str = "1.0810"):
        super().__init__()
        self.exclusive = exclusive
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.attn_gate_proj = CastedLinear(GATE_INPUTS, num_heads, zero_init=True) if gate else None
        self.rotary = Rotary(self.head_dim, rope_base, rope_dims, rope_rounding)

    def forward(self, x: Tensor, attend, lora: dict | None = None) -> Tensor:
        """x (B, T, C); attend: `attention` with the kernel and the row's segments bound; lora: this pass's adapters."""
        B, T, C = x.shape
        q = with_lora(self.c_q(x), lora, "q", x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = with_lora(self.c_k(x), lora, "k", x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = with_lora(self.c_v(x), lora, "v", x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        y = attend(q * self.q_gain.to(q.dtype)[:, None], k, v)
        if self.exclusive:
            y = exclude_self_value(y, v)
        if self.attn_gate_proj is not None:
            y = y * (2 * torch.sigmoid(self.attn_gate_proj(x[..., :GATE_INPUTS])))[..., None]
        return with_lora(self.proj(y.reshape(B, T, C)), lora, "o", x)  # O's adapter reads the input x too


class MLP(nn.Module):
    """proj(leaky_relu(fc x)^2); slope 0 is the baseline's relu^2, 0.5 keeps negative units alive."""

    def __init__(self, dim: int, mult: int, leaky_slope: float = 0.0):
        super().__init__()
        self.fc = CastedLinear(dim, mult * dim)
        self.proj = CastedLinear(mult * dim, dim, zero_init=True)
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor, lora: dict | None = None) -> Tensor:
        return with_lora(self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square()), lora, "mlp", x)


class Block(nn.Module):
    """Pre-norm block re-mixing its input with x0; LN scale 1/sqrt(i+1); parallel: attention and MLP read one input;
    two_lanes: the 1.0714 record's parallel form, two residual streams."""

    def __init__(self, dim: int, settings: Settings, layer: int = 0):
        super().__init__()
        s = settings
        self.attn = CausalSelfAttention(dim, s.num_heads, s.num_kv_heads, s.rope_base, s.qk_gain_init, s.rope_dims,
                                        exclusive=layer >= s.num_layers - s.xsa_last_n, gate=bool(s.gate_attn_out),
                                        rope_rounding=s.rope_rounding)
        self.mlp = MLP(dim, s.mlp_mult, s.mlp_leaky_slope)
        self.norm_scale = 1 / math.sqrt(layer + 1) if s.ln_scale else 1.0
        self.parallel = layer >= s.num_layers - s.parallel_last_n
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def attention_branch(self, x: Tensor, x0: Tensor, attend, lora: dict | None) -> tuple[Tensor, Tensor]:
        """(x mixed with x0, the scaled attention output of it)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        return x, self.attn_scale.to(x.dtype) * self.attn(self.norm_scale * rms_norm(x), attend, lora)

    def mlp_branch(self, x: Tensor, lora: dict | None) -> Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(self.norm_scale * rms_norm(x), lora)

    def forward(self, x: Tensor, x0: Tensor, attend, lora: dict | None = None) -> Tensor:
        x, attn_out = self.attention_branch(x, x0, attend, lora)
        after_attn = x + attn_out
        return after_attn + self.mlp_branch(x if self.parallel else after_attn, lora)

    def two_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, attend, post: Tensor, resid: Tensor,
                  lora: dict | None = None) -> tuple[Tensor, Tensor]:
        """Attention reads lane 0 (mixed with x0), the MLP lane 1; then lane j = resid[j] lane j + post[0, j] attention
        + post[1, j] MLP: learned routing (GPT.parallel_post_lambdas and parallel_resid_lambdas of this block)."""
        _, attn_out = self.attention_branch(lane0, x0, attend, lora)
        mlp_out = self.mlp_branch(lane1, lora)
        post, resid, lanes = post.to(lane0.dtype), resid.to(lane0.dtype), (lane0, lane1)
        return tuple(resid[j] * lanes[j] + post[0, j] * attn_out + post[1, j] * mlp_out for j in (0, 1))


class GPT(nn.Module):
    """A U-Net of block passes: the first half's outputs are mixed (weights, gates) into the second half. Depth
    recurrence: with `recurrence_active`, RECUR_LAYERS run 1 + NUM_LOOPS times (same weights) and the longer list of
    passes is split again: more depth for no bytes (switching it on recompiles). From PARALLEL_START_LAYER on, the
    decoder passes carry two residual lanes (Block.two_lanes); the skips join lane 0; the output is their mean."""

    def __init__(self, settings: Settings, compute_dtype: torch.dtype = torch.float32, attention_kernel: str = "sdpa"):
        super().__init__()
        rng = torch.get_rng_state()  # ORTHO_INIT=2 replays the draws from here (draw_as_banks)
        s, dim, recur = settings, settings.model_dim, settings.recur_layer_ids
        self.compute_dtype, self.logit_softcap, self.attention_kernel = compute_dtype, s.logit_softcap, attention_kernel
        self.tok_emb = nn.Embedding(s.vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, s, i) for i in range(s.num_layers))
        self.lm_head = None if s.tie_embeddings else CastedLinear(dim, s.vocab_size, zero_init=True)
        looped = (list(range(recur[0])) + recur * (s.num_loops + 1) + list(range(recur[-1] + 1, s.num_layers))
                  if recur else list(range(s.num_layers)))
        halves = lambda order: (order[:len(order) // 2], order[len(order) // 2:])  # encoder, decoder passes
        self.passes = {False: halves(list(range(s.num_layers))), True: halves(looped)}
        self.recurrence_active = False
        num_skips = len(self.passes[True][0])  # the looped split has the most encoder passes
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, dim)) if s.skip_gates else None
        self.two_lanes_from, lanes = s.parallel_start_layer or s.num_layers, s.parallel_start_layer > 0
        self.parallel_post_lambdas = nn.Parameter(torch.ones(s.num_layers, 2, 2)) if lanes else None
        self.parallel_resid_lambdas = nn.Parameter(torch.full((s.num_layers, 2), 1.1)) if lanes else None
        self.smear_gate = nn.Parameter(torch.zeros(1, GATE_INPUTS)) if s.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if s.smear_gate else None
        self.smear_bos_mask = bool(s.smear_bos_mask)
        self.final_norm = nn.RMSNorm(dim, elementwise_affine=False)  # a module: GPTQ hooks the head's input here
        if s.ortho_init == 2:
            self.draw_as_banks(rng, s)
        elif s.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=s.tied_embed_init_std)
        for m in self.modules() if s.ortho_init == 1 else ():  # the 1.0810 record's init, drawn in its order
            if isinstance(m, CastedLinear) and not m.zero_init and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)

    def draw_as_banks(self, rng: Tensor, settings: Settings) -> None:
        """ORTHO_INIT=2: the 1.0714 record's initial weights for the same seed. Its block matrices are parameter banks
        that draw nothing when built, so the draws are rewound and made in its order: the embedding's and the gates'
        default init when built (the gates then zeroed), the embedding's normal, then each block's c_q, c_k, c_v and
        fc orthogonal, whatever their shape."""
        torch.set_rng_state(rng)
        self.tok_emb.reset_parameters()
        gates = [b.attn.attn_gate_proj for b in self.blocks if b.attn.attn_gate_proj is not None]
        for m in gates + [self.lm_head] * (self.lm_head is not None):
            m.reset_parameters()
        if self.smear_gate is not None:
            nn.init.kaiming_uniform_(self.smear_gate, a=math.sqrt(5))  # nn.Linear(12, 1)'s draw, as the record's
        if settings.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=settings.tied_embed_init_std)
        for b in self.blocks:
            for m in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
                nn.init.orthogonal_(m.weight)
        zeroed = [m.weight for m in self.modules() if isinstance(m, CastedLinear) and m.zero_init]
        for w in zeroed + [self.smear_gate] * (self.smear_gate is not None):
            nn.init.zeros_(w)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B, T, C); SmearGate: + lambda x sigmoid(gate(e_t[:12])) x e_{t-1}, never across a BOS unless
        SMEAR_BOS_MASK=0."""
        x = self.tok_emb(input_ids).to(self.compute_dtype)
        if self.smear_gate is not None:
            gate = torch.sigmoid(F.linear(x[:, 1:, :GATE_INPUTS], self.smear_gate.to(x.dtype)))
            share = self.smear_lambda.to(x.dtype) * gate
            share = share * (input_ids[:, 1:, None] != BOS_ID) if self.smear_bos_mask else share
            x = torch.cat((x[:, :1], x[:, 1:] + share * x[:, :-1]), dim=1)
        return rms_norm(x)

    def logits(self, input_ids: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0,
               lora: BatchedTTTLoRA | None = None) -> Tensor:
        """(B, T) -> (B, T, V). cu_seqlens: the row's segments (document_cu_seqlens; B = 1) attend within themselves.
        lora: its adapters join every block pass (slot: the pass's index, encoder then decoder) and the head."""
        x = x0 = self.embed(input_ids)  # (B, T, C)
        attend = partial(attention, kernel=self.attention_kernel, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        adapters = (lambda slot: None) if lora is None else lora.at
        encoder, decoder = self.passes[self.recurrence_active]
        skips, lane1 = [], None  # with two lanes, x is lane 0
        for slot, i in enumerate(encoder):
            x = self.blocks[i](x, x0, attend, adapters(slot))
            skips.append(x)
        for k, i in enumerate(decoder):
            lane1 = x if lane1 is None and i >= self.two_lanes_from else lane1
            if skips:
                x = self.add_skip(x, k, skips.pop())
            if lane1 is None:
                x = self.blocks[i](x, x0, attend, adapters(len(encoder) + k))
            else:
                x, lane1 = self.blocks[i].two_lanes(x, lane1, x0, attend, self.parallel_post_lambdas[i],
                                                    self.parallel_resid_lambdas[i], adapters(len(encoder) + k))
        x = self.final_norm(x if lane1 is None else 0.5 * (x + lane1))
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head.to(x.dtype))  # (B, T, V)
        logits = logits if lora is None else logits + lora.lm_head_lora(x)
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def add_skip(self, x: Tensor, k: int, skip: Tensor) -> Tensor:
        """The k-th U-Net skip, weighted, mixed into x by a learned sigmoid gate (or added without SKIP_GATES)."""
        skip = self.skip_weights[k].to(x.dtype) * skip
        gates = self.skip_gates
        return x + skip if gates is None else torch.lerp(skip, x, torch.sigmoid(gates[k].to(x.dtype)))

    def forward(self, input_ids: Tensor, target_ids: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0,
                lora: BatchedTTTLoRA | None = None) -> Tensor:
        """Cross-entropy in nats of every target token, shape (B, T)."""
        logits = self.logits(input_ids, cu_seqlens, max_seqlen, lora).float()
        return F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction="none").view_as(target_ids)

    def frozen_names(self, settings: Settings) -> set[str]:  # what no optimizer trains
        return {"smear_gate", "smear_lambda"} if settings.smear_frozen else set()

    def control_tensor_names(self) -> set[str]:
        """Vectors, gains, gates and lane weights: trained with Adam and stored in fp32 by the export."""
        return {name for name, p in self.named_parameters() if p.ndim < 2 or name.endswith((
            "skip_weights", "skip_gates", "resid_mix", "smear_gate", "attn_gate_proj.weight", "parallel_post_lambdas",
            "parallel_resid_lambdas"))}


class BatchedLinearLoRA(nn.Module):
    """Low-rank adapters, one per row of a batch (a document in test-time training): row b maps x to x A_b^T B_b^T,
    A (batch, rank, in), B (batch, out, rank)."""

    def __init__(self, batch: int, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(batch, rank, in_features))
        self.B = nn.Parameter(torch.empty(batch, out_features, rank))
        self.reset()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """A uniform in +-1/sqrt(in), B zero: the adapter starts as no change (the 1.0714 record's)."""
        bound = 1 / math.sqrt(self.A.size(-1))
        self.A.uniform_(-bound, bound, generator=generator)
        self.B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.mT.to(x.dtype)) @ self.B.mT.to(x.dtype)


class BatchedTTTLoRA(nn.Module):
    """Test-time training's adapters for `batch` documents, the 1.0714 record's: Q, K, V, O (reading the attention's
    input) and MLP-out on every block pass of the model's current recurrence, and the head. GPT.logits(lora=...)
    adds them; reset() draws A in the record's order: the head's, then every pass's Q, then V, K, MLP and O."""

    def __init__(self, batch: int, model: GPT, rank: int):
        super().__init__()
        dim, vocab = model.tok_emb.embedding_dim, model.tok_emb.num_embeddings
        kv_dim, passes = model.blocks[0].attn.c_k.out_features, sum(map(len, model.passes[model.recurrence_active]))
        per_pass = lambda out: nn.ModuleList(BatchedLinearLoRA(batch, dim, out, rank) for _ in range(passes))  # noqa
        self.lm_head_lora = BatchedLinearLoRA(batch, dim, vocab, rank)
        self.q_loras, self.v_loras, self.k_loras = per_pass(dim), per_pass(kv_dim), per_pass(kv_dim)
        self.mlp_loras, self.o_loras = per_pass(dim), per_pass(dim)

    def reset(self, generator: torch.Generator | None = None) -> None:
        for lora in self.modules():
            if isinstance(lora, BatchedLinearLoRA):
                lora.reset(generator)

    def at(self, slot: int) -> dict[str, BatchedLinearLoRA]:
        """The adapters of block pass `slot`, by target."""
        return {"q": self.q_loras[slot], "k": self.k_loras[slot], "v": self.v_loras[slot], "o": self.o_loras[slot],
                "mlp": self.mlp_loras[slot]}


# ----------------------------------------------------------------------------------------------
# Training.


def build_model(settings: Settings, runtime: Runtime) -> GPT:
    """Every model of a run (and of the tests that stand for one): fp32 weights on the device, but the token embedding
    (the tied head) stored in the compute dtype, as the record and the official baseline keep it in bf16."""
    model = GPT(settings, runtime.compute_dtype, runtime.attention).to(runtime.device)
    model.tok_emb.to(runtime.compute_dtype)
    return model


def build_optimizers(model: GPT, settings: Settings, runtime: Runtime) -> list[torch.optim.Optimizer]:
    s, control = settings, model.control_tensor_names()
    named = dict(model.named_parameters())
    matrices = [p for n, p in named.items() if n.startswith("blocks.") and n not in control]
    scalars = [p for n, p in named.items() if n in control and n not in model.frozen_names(s)]
    adam = dict(betas=(s.beta1, s.beta2), eps=s.adam_eps, fused=runtime.fused_adam)
    token_lr = s.tied_embed_lr if s.tie_embeddings else s.embed_lr
    groups = [([model.tok_emb.weight], token_lr, s.embed_weight_decay), (scalars, s.scalar_lr, s.scalar_weight_decay)]
    groups += [([model.lm_head.weight], s.head_lr, 0.0)] if model.lm_head is not None else []
    optimizers = [torch.optim.AdamW([dict(params=g, lr=lr, base_lr=lr)], weight_decay=wd, **adam)  # wd 0: Adam
                  for g, lr, wd in groups]
    orthogonalize = partial(newton_schulz_orthogonalize, coeffs=NS_COEFFS[s.muon_ns_coeffs], rounding=s.muon_rounding)
    muon = Muon(matrices, s.matrix_lr, s.muon_momentum, s.muon_backend_steps, runtime.rank, runtime.world_size,
                ns_dtype=runtime.compute_dtype,
                orthogonalize=torch.compile(orthogonalize, dynamic=False) if runtime.compile else orthogonalize,
                row_norm=bool(s.muon_row_norm), weight_decay=s.muon_weight_decay,
                state_dtype=runtime.compute_dtype if s.muon_rounding == "1.0714" else torch.float32)
    for group in muon.param_groups:
        group["base_lr"] = s.matrix_lr
    return optimizers + [muon]


def training_progress(step: int, elapsed_ms: float, settings: Settings) -> float:
    """Training done, 0 to 1: by the cap less the GPTQ reserve (as the record), or by steps if further."""
    s = settings
    by_clock = elapsed_ms / (1000 * s.training_seconds) if s.max_wallclock_seconds > 0 else 0.0
    return min(max(step / s.iterations, by_clock), 1.0)


def lr_multiplier(step: int, elapsed_ms: float, settings: Settings) -> float:
    """A linear warmdown to 0 over the last WARMDOWN_FRAC of training (WARMDOWN_FRAC=0: WARMDOWN_ITERS steps)."""
    s = settings
    if s.warmdown_frac > 0:
        return min((1.0 - training_progress(step, elapsed_ms, s)) / s.warmdown_frac, 1.0)
    return step_based_warmdown(step, elapsed_ms, s)


def step_based_warmdown(step: int, elapsed_ms: float, settings: Settings) -> float:
    """The baseline's: over the last WARMDOWN_ITERS steps before ITERATIONS or the cap (steps left from the mean)."""
    s = settings
    if s.warmdown_iters <= 0:
        return 1.0
    by_steps = min(max((s.iterations - step) / s.warmdown_iters, 0.0), 1.0)
    if s.max_wallclock_seconds <= 0:
        return by_steps
    remaining_ms = max(1000.0 * s.training_seconds - elapsed_ms, 0.0)
    warmdown_ms = s.warmdown_iters * elapsed_ms / max(step, 1)
    return min(by_steps, min(remaining_ms / max(warmdown_ms, 1e-9), 1.0))


def muon_momentum(step: int, settings: Settings) -> float:
    """Linear from MUON_MOMENTUM_WARMUP_START over the first MUON_MOMENTUM_WARMUP_STEPS steps."""
    s = settings
    frac = min(step / s.muon_momentum_warmup_steps, 1.0) if s.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * s.muon_momentum_warmup_start + frac * s.muon_momentum


class WeightEMA:
    """ema <- decay x ema + (1 - decay) x w after every step, from the initial weights; the export takes it."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.params = decay, list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:  # multiply-add as the record, not lerp: the same float rounding
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, [p.detach().float() for p in self.params], alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, avg in zip(self.params, self.shadow):
            p.copy_(avg.to(p.dtype))


class TrainingDiverged(RunError):  # NaN or inf: nothing is exported
    pass


def check_finite_score(val_loss: float, val_bpb: float, what: str, settings: Settings) -> None:
    if not (math.isfinite(val_loss) and math.isfinite(val_bpb)):
        raise TrainingDiverged(f"{what} is not finite (val_loss:{val_loss} val_bpb:{val_bpb}); "
                               f"{settings.divergence_suspects()}")


class RankGradients:
    """GRAD_CLIP_PER_RANK=1, the 1.0714 record's step (no DDP): each micro-batch is one of its GPUs, whose gradient
    is clipped to GRAD_CLIP_NORM by its own norm over all parameters; the step takes the mean of all LOADER_STREAMS
    (summed in fp32 here, then over the ranks in one all-reduce; the record averages banks in a bf16 reduce-scatter).
    The record's optimizers zero only the gradients of what they train: each GPU's gradient of a frozen parameter
    (SMEAR_FROZEN) is never zeroed, so it adds up over its steps (scaled by each clip) and counts in every norm."""

    def __init__(self, model: GPT, settings: Settings, runtime: Runtime):
        self.params, self.rt = list(model.parameters()), runtime
        self.max_norm, self.count = settings.grad_clip_norm, runtime.world_size * runtime.grad_accum_steps
        self.flat = torch.zeros(sum(p.numel() for p in self.params), device=runtime.device)
        self.sums = [t.view_as(p) for t, p in zip(self.flat.split([p.numel() for p in self.params]), self.params)]
        self.frozen = [p for n, p in model.named_parameters() if n in model.frozen_names(settings)]
        self.carried = [[torch.zeros_like(p) for p in self.frozen] for _ in range(runtime.grad_accum_steps)]

    def add(self, micro: int) -> None:
        """After micro-batch `micro`'s backward: its gradient, clipped, joins the sum; .grad is zeroed for the next."""
        grads, carried = [p.grad for p in self.params], list(zip(self.frozen, self.carried[micro]))
        for p, grad in carried:
            p.grad += grad
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        for p, grad in carried:
            grad.copy_(p.grad)
        torch._foreach_add_(self.sums, grads)
        torch._foreach_zero_(grads)

    def set_mean(self) -> None:
        if self.rt.distributed:
            dist.all_reduce(self.flat)
        self.flat /= self.count
        torch._foreach_copy_([p.grad for p in self.params], self.sums)
        self.flat.zero_()


class Trainer:
    """Owns the model, optimizers and batches; `step` is one optimizer step over the global batch."""

    def __init__(self, settings: Settings, runtime: Runtime):
        self.settings, self.rt = settings, runtime
        torch.manual_seed(settings.seed)
        self.model = build_model(settings, runtime)
        # fullgraph: a graph break would be a silent slowdown; make it an error instead.
        self.compiled = torch.compile(self.model, dynamic=False, fullgraph=True) if runtime.compile else self.model
        self.train_model = (DDP(self.compiled, device_ids=[runtime.local_rank] if runtime.device.type == "cuda"
                                else None) if runtime.distributed and not settings.grad_clip_per_rank else self.compiled)
        self.rank_grads = RankGradients(self.model, settings, runtime) if settings.grad_clip_per_rank else None
        self.optimizers = build_optimizers(self.model, settings, runtime)
        self.loader = TrainBatchLoader(settings, runtime)
        self.all_finite = torch.ones((), dtype=torch.bool, device=runtime.device)
        self.ema = WeightEMA(self.model, settings.ema_decay) if settings.ema_decay > 0 else None

    def step(self, step: int, lr_scale: float, progress: float | None = None) -> Tensor:
        """Gradients over the micro-batches, then every optimizer; `progress` (0..1, default step / ITERATIONS) drives
        the fraction schedules. Returns this rank's mean loss as a device tensor (no host sync here)."""
        s, rt = self.settings, self.rt
        progress = step / s.iterations if progress is None else progress
        if s.recur_layers and progress >= s.recur_start_frac:
            self.model.recurrence_active = True
        self.model.zero_grad(set_to_none=True)
        train_loss = torch.zeros((), device=rt.device)
        batches = self.loader.next_step()
        for micro, (inputs, targets, *documents) in enumerate(batches):  # documents: cu_seqlens, max_seqlen
            last = micro == len(batches) - 1
            sync = self.train_model.no_sync() if isinstance(self.train_model, DDP) and not last else \
                contextlib.nullcontext()
            with sync:
                loss = self.train_model(inputs, targets, *documents).mean()
                (loss if self.rank_grads else loss / rt.grad_accum_steps).backward()
            if self.rank_grads:
                self.rank_grads.add(micro)
            train_loss += loss.detach() / rt.grad_accum_steps
        self.all_finite &= torch.isfinite(train_loss)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
                if isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(step, s)
        if self.rank_grads:
            self.rank_grads.set_mean()
        elif s.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        if self.ema is not None:
            self.ema.update()
        return train_loss

    def carry_kernel_warm_up(self, batches: list[tuple], looping: bool) -> None:
        """The record's warm-up first compiles its kernels: 12 backward passes on each GPU's first row cut every
        TRAIN_SEQ_LEN tokens (4 cu_seqlens sizes x 3), then 12 with recurrence. Its optimizers do not zero the frozen
        parameters' gradients (RankGradients): what these passes leave there is carried into its steps."""
        for micro, (inputs, targets, *_) in enumerate(batches):
            segments = document_cu_seqlens(torch.zeros_like(inputs[0]), self.settings.train_seq_len)  # no documents
            for recurrence in (False, True)[:1 + looping]:
                self.model.recurrence_active = recurrence
                self.model.zero_grad()
                self.train_model(inputs, targets, *segments).mean().backward()
                for _ in range(12):
                    for p, grad in zip(self.rank_grads.frozen, self.rank_grads.carried[micro]):
                        grad += p.grad
        self.model.recurrence_active = False
        self.model.zero_grad()

    def check_finite(self, step: int) -> None:
        flag = self.all_finite.clone().to(torch.int32)
        if self.rt.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            raise TrainingDiverged(f"the training loss became NaN or inf at or before step {step}; the run stops "
                                   f"and nothing is exported; {self.settings.divergence_suspects()}")

    def warm_up_and_restore(self, steps: int, log) -> None:
        """Steps (half with recurrence on) that compile outside the timed run, then everything put back.
        WARMUP_KEEP_MOMENTUM=1, the 1.0714 record's on 8 GPUs: after one batch (its kernel warm-up's), `steps` steps
        without recurrence then `steps` with; Muon's momentum is kept (its sharded buffers escape the restore)."""
        if steps <= 0:
            return
        s, adams = self.settings, [opt for opt in self.optimizers if not isinstance(opt, Muon)]
        initial_model = copy.deepcopy(self.model.state_dict())
        initial_optimizers = [copy.deepcopy(opt.state_dict()) for opt in adams]
        schedule = [(0, float(2 * i >= steps)) for i in range(steps)]
        if s.warmup_keep_momentum:
            batches, looping = self.loader.next_step(), bool(s.recur_layer_ids and s.num_loops)
            if self.rank_grads and self.rank_grads.frozen:
                self.carry_kernel_warm_up(batches, looping)
            schedule = [(i, 0.0) for i in range(steps)] + [(i, 1.0) for i in range(steps) if looping]
        for n, (i, progress) in enumerate(schedule):
            self.step(i, 1.0, progress)
            log(f"warmup_step:{n + 1}/{len(schedule)}")
        self.model.load_state_dict(initial_model)
        self.model.recurrence_active = False
        self.ema = WeightEMA(self.model, self.settings.ema_decay) if self.ema is not None else None
        for opt, state in zip(adams, initial_optimizers):
            opt.load_state_dict(state)
        for opt in self.optimizers if not s.warmup_keep_momentum else ():
            if isinstance(opt, Muon):  # zeroed in place: load_state_dict would cast a bf16 momentum to fp32
                for state in opt.state.values():
                    state["momentum_buffer"].zero_()
        self.loader = TrainBatchLoader(self.settings, self.rt)
        self.all_finite.fill_(True)


class RunLog:
    """stdout and logs/<RUN_ID>.txt (rank 0): a used RUN_ID is refused (OVERWRITE=1: renamed aside), a live one too."""

    def __init__(self, run_id: str, is_master: bool, overwrite: bool = False):
        self.is_master, self.file, self.path = is_master, None, Path("logs") / f"{run_id}.txt"
        if not is_master:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock = open(self.path.with_name(f"{run_id}.lock"), "a")  # flocked until the process ends, however
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            owned = [".txt"] + [f".int{bits}.ptz{unscored}" for bits in (6, 8) for unscored in ("", ".unscored")]
            earlier = [p for suffix in owned if (p := self.path.with_name(run_id + suffix)).exists()]  # names, no globs
            if earlier and not overwrite:
                raise RunError(f"RUN_ID={run_id} was used before: {', '.join(map(str, earlier))} exist; choose a new "
                               f"RUN_ID, or set OVERWRITE=1 to rename them aside (nothing is deleted)")
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            for p in earlier:
                os.replace(p, p.with_name(f"{p.name}.replaced-{stamp}"))
            self.file = open(self.path, "x", encoding="utf-8", newline="")
        except BlockingIOError:
            raise RunError(f"RUN_ID={run_id} is in use by a live run ({self.lock.name}): wait or choose another RUN_ID")
        except OSError as e:
            raise RunError(f"cannot create the log {self.path} ({e}): make logs/ a folder you can write") from None

    def __call__(self, line: str, console: bool = True, source: bool = False) -> None:
        """One line, whatever a value in it holds; `source`: the embedded source, the log's one multi-line block."""
        if not self.is_master:
            return
        line = line if source else one_line(line)
        if console:
            print(line, flush=True)
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError as e:
            raise RunError(f"cannot write the log {self.path} ({e}; its disk has {shutil.disk_usage('logs').free:,} "
                           f"bytes free): free some space, then re-run") from None


class Progress:
    """A stage as it runs: `over(items)` logs `progress:<stage> i/n <unit> elapsed:… remaining:~…` at each tenth and
    after 30 s without a line (on a terminal, rank 0 draws a tqdm bar instead of printing them); `done()`, once the
    caller has synced the device, logs `stage:<stage> time:Tms`: a killed run's log keeps the stages it finished."""
    TENTHS, EVERY_S = 10, 30.0

    def __init__(self, log, stage: str, unit: str = "batches", note: str = ""):
        self.log, self.stage, self.unit, self.bar, self.t0 = log, stage, unit, None, time.perf_counter()
        if note:
            log(f"progress:{stage} {note}")

    def over(self, items, total: int | None = None):
        """Yields `items` (`total` of them: len(items) by default), each counted done when the next is asked for."""
        self.total, self.count, self.tenths = len(items) if total is None else total, 0, 0
        self.t_line, self.write = time.perf_counter(), self.log
        if tqdm and isinstance(self.log, RunLog) and self.log.is_master and sys.stdout.isatty():  # lines: file only
            self.bar = tqdm(total=self.total, desc=self.stage, unit=self.unit, leave=False, file=sys.stdout)
            self.write = partial(self.log, console=False)
        for item in items:
            yield item
            self.update()

    def update(self) -> None:
        self.count, now = self.count + 1, time.perf_counter()
        if self.bar is not None:
            self.bar.update()
        if self.count * self.TENTHS // self.total > self.tenths or now - self.t_line >= self.EVERY_S:
            self.tenths, self.t_line, elapsed = self.count * self.TENTHS // self.total, now, now - self.t0
            self.write(f"progress:{self.stage} {self.count}/{self.total} {self.unit} elapsed:{elapsed:.1f}s "
                       f"remaining:~{elapsed * (self.total - self.count) / self.count:.1f}s")

    def done(self) -> float:
        """The stage's time in ms, also logged."""
        if self.bar is not None:
            self.bar.close()
        ms = 1000 * (time.perf_counter() - self.t0)
        self.log(f"stage:{self.stage} time:{ms:.0f}ms")
        return ms


def one_line(text: str) -> str:  # the line breaks of str.splitlines, escaped: a path or a message cannot add a line
    return re.sub(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]", lambda m: ascii(m[0])[1:-1], text)


def log_run_header(log: RunLog, settings: Settings, runtime: Runtime, code: bytes) -> None:
    log(f"source train_gpt.py bytes:{len(code)} sha256:{hashlib.sha256(code).hexdigest()}", console=False)
    log(code.decode("utf-8") + "end_of_source", console=False, source=True)
    log(f"run_id:{settings.run_id} started:{datetime.now(timezone.utc).isoformat(timespec='seconds')} log:{log.path}")
    dev = runtime.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    log(f"device:{dev.type} name:{name} world_size:{runtime.world_size} grad_accum_steps:{runtime.grad_accum_steps} "
        f"compute_dtype:{str(runtime.compute_dtype).removeprefix('torch.')} compile:{int(runtime.compile)} "
        f"attention:{runtime.attention} cpu_threads:{torch.get_num_threads()} torch:{torch.__version__} "
        f"python:{platform.python_version()} host:{platform.node()}")
    if dev.type == "cuda" and runtime.attention != "fa3":
        log("attention: SDPA's FlashAttention (FlexAttention on packed rows), not the records' FlashAttention 3: on "
            "8xH100 an estimated +12 ms a step, +19 ms with recurrence, ~500 fewer steps in 600 s, very roughly "
            "+0.004 to +0.008 val_bpb (estimates, unmeasured); for FA3: pip install kernels, or the flash_attn_3 "
            "wheel (README: The attention kernel)")
    log("settings:" + json.dumps({k.upper(): v for k, v in asdict(settings).items()}))
    env_prefixes = ("CUDA", "NCCL", "TORCH", "OMP", "PYTORCH", "RANK", "LOCAL_", "WORLD_", "MASTER_")
    log("environment:" + json.dumps({k: v for k, v in sorted(os.environ.items()) if k.startswith(env_prefixes)}))


def log_validation_split(log: RunLog, split: ValidationSplit, settings: Settings) -> str:
    """Log the split's fingerprint; return the suffix that marks a prefix score on every val line."""
    scope = "full" if split.is_full else "prefix"
    log(f"val_split tokens:{split.num_scored} sha256:{split.fingerprint()} scope:{scope}")
    published = PUBLISHED_VAL_TOKENS.get(settings.vocab_size, ())
    if split.is_full and split.num_scored not in published:
        log(f"WARNING: {split.num_scored} validation tokens is not the published split's count "
            f"{published or '(none published for this vocabulary)'}: do not compare this score with records")
    if split.is_full:
        return ""
    log(f"WARNING: MAX_VAL_TOKENS={settings.max_val_tokens} scores only a prefix of the validation split; "
        f"these val_bpb values are NOT full-split scores")
    return " val_scope:prefix"


def train(settings: Settings, runtime: Runtime, log: RunLog) -> None:
    s, rt = settings, runtime
    code = pack_code(Path(__file__).read_bytes())  # (source, packed), from a plain or a packed file
    log_run_header(log, s, rt, code[0])
    byte_table = build_byte_table(s.tokenizer_path, s.vocab_size)
    known = PUBLISHED_TOKENIZERS.get(sha := hashlib.sha256(Path(s.tokenizer_path).read_bytes()).hexdigest())
    log(f"tokenizer: published {known} sha256:{sha}" if known else f"tokenizer: custom sha256:{sha}")
    split = load_validation_split(s)
    check_split_fits_tokenizer(split, byte_table, s)
    check_byte_accounting(split, byte_table, s)
    val_suffix = log_validation_split(log, split, s)
    evaluator = Evaluator(split, byte_table, s, rt, log)
    trainer = Trainer(s, rt)
    log(f"model_params:{sum(p.numel() for p in trainer.model.parameters())}")
    streams = trainer.loader.num_streams
    log(f"train_shards:{len(trainer.loader.paths)} pattern:{os.path.join(s.data_path, 'fineweb_train_*.bin')} "
        f"data_id:{training_data_id(trainer.loader.paths)}" +
        (f" loader_streams:{streams} (one per shard, fewer than LOADER_STREAMS)" if streams < s.loader_streams else ""))
    if trainer.loader.packed:
        log_packed_data_repeat(log, sum(trainer.loader.packed.steps_per_shard), s)
    ledger, t_start, warmup = {}, time.perf_counter(), Progress(log, "warmup_compile")
    trainer.warm_up_and_restore(s.warmup_steps, log)
    if s.ttt_epochs and rt.compile and s.warmup_steps:
        evaluator.compile_ttt(trainer.model, trainer.compiled)
    rt.sync()
    ledger["warmup_compile"] = warmup.done()

    training_ms, validation_ms, step, stop_after = 0.0, 0.0, 0, None
    wallclock = WallclockStop(1000 * s.training_seconds, rt)
    if rt.distributed:  # every rank's clock starts now: the schedule, the recurrence switch and the cap agree
        dist.barrier()
    rt.sync()
    t0 = time.perf_counter()
    while True:
        last_step = step == s.iterations or stop_after is not None
        if last_step or (s.val_loss_every > 0 and step % s.val_loss_every == 0):
            rt.sync()
            training_ms += 1000 * (time.perf_counter() - t0)
            t_val = time.perf_counter()
            trainer.check_finite(step)
            if last_step and trainer.ema is not None:
                trainer.ema.copy_to_model()  # the last val line scores the weights the export will take
                log(f"ema:applied decay:{s.ema_decay}")
            val_loss, val_bpb = evaluator.evaluate(trainer.compiled, stage="final_" * last_step + "validation")
            check_finite_score(val_loss, val_bpb, f"the validation score at step {step}", s)
            log(f"step:{step}/{s.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{training_ms:.0f}ms step_avg:{training_ms / max(step, 1):.2f}ms{val_suffix}")
            validation_ms += 1000 * (time.perf_counter() - t_val)
            t0 = time.perf_counter()
        if last_step:
            if stop_after is not None and step < s.iterations:
                log(f"stopping_early: wallclock_cap train_time:{training_ms:.0f}ms step:{step}/{s.iterations}")
            break
        elapsed_ms = training_ms + 1000 * (time.perf_counter() - t0)
        recurring = trainer.model.recurrence_active
        train_loss = trainer.step(step, lr_multiplier(step, elapsed_ms, s), training_progress(step, elapsed_ms, s))
        if trainer.model.recurrence_active and not recurring:
            log(f"recurrence:on layers:{s.recur_layers} step:{step}")
        step += 1
        elapsed_ms = training_ms + 1000 * (time.perf_counter() - t0)
        if s.train_log_every > 0 and (step <= 10 or step % s.train_log_every == 0):
            trainer.check_finite(step)
            if rt.distributed:  # the loss of the global batch, as one process would log it
                dist.all_reduce(train_loss)
                train_loss /= rt.world_size
            log(f"step:{step}/{s.iterations} train_loss:{train_loss.item():.4f} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms")
        if wallclock.should_stop(lambda: training_ms + 1000 * (time.perf_counter() - t0)):
            stop_after = step
    ledger["training"], ledger["validation"] = training_ms, validation_ms
    log_peak_memory(log, rt)
    summary = export_and_rescore(trainer, evaluator, code, val_suffix, ledger, log, s, rt)
    ledger["total"] = 1000 * (time.perf_counter() - t_start)
    log("time_ledger " + " ".join(f"{k}:{v:.0f}ms" for k, v in ledger.items()))
    log(f"{summary}, log {log.path}")


RECORD_STEPS = 4843  # the most steps of the 1.0714 record's three 600 s runs on 8xH100 (its logs)


def log_packed_data_repeat(log: RunLog, steps: int, settings: Settings) -> None:
    log(f"train_data: packed documents; the shards repeat after {steps} steps")
    if steps < min(settings.iterations, RECORD_STEPS):
        log(f"WARNING: the training data repeats after {steps} steps, before the {RECORD_STEPS} steps the 1.0714 "
            f"record trains in 600 s on 8xH100: download more shards (data/cached_challenge_fineweb.py --train-shards)")


class WallclockStop:
    """Picks the last step, the same on every rank, so that train_time ends within cap_ms: once a step is queued it
    waits for the one before; a "go on" lets at most 2 more steps end (3 on several ranks: their vote is read a step
    late), given while clock + those x SAFETY x slowest recent step < cap."""
    RECENT_STEPS, SAFETY = 10, 1.2

    def __init__(self, cap_ms: float, runtime: Runtime, event=None, vote=None):
        self.cap_ms, self.distributed, self.device = cap_ms, runtime.distributed, runtime.device
        self.event = event or {"cuda": torch.cuda.Event, "mps": torch.mps.Event}.get(runtime.device.type)
        self.vote = vote or self.vote_of_all_ranks
        self.clock_ms, self.previous = [0.0], (None, False)  # the training clock after each recent step

    def should_stop(self, elapsed_ms) -> bool:
        """`elapsed_ms()` reads the training clock; True: the step just queued is the last."""
        if self.cap_ms <= 0:
            return False
        marker, vote = self.previous
        if marker is not None:  # None on a CPU, where steps run synchronously
            marker.synchronize()  # the device has finished the step before, and its vote
        self.clock_ms = (self.clock_ms + [elapsed_ms()])[-self.RECENT_STEPS - 1:]
        slowest_ms = max(np.diff(self.clock_ms))
        reached = self.clock_ms[-1] + (3 if self.distributed else 2) * self.SAFETY * slowest_ms >= self.cap_ms
        self.previous = (self.event() if self.event else None, self.vote(reached) if self.distributed else reached)
        if self.previous[0] is not None:
            self.previous[0].record()  # after this step and its vote
        return bool(vote) if self.distributed else reached

    def vote_of_all_ranks(self, reached: bool) -> Tensor:
        vote = torch.full((), int(reached), dtype=torch.int32, device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return vote.to("cpu", non_blocking=True)  # into pinned memory, read once the step's marker has passed


def log_peak_memory(log: RunLog, runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        log(f"peak_memory allocated:{torch.cuda.max_memory_allocated() // 2**20}MiB "
            f"reserved:{torch.cuda.max_memory_reserved() // 2**20}MiB")
    else:  # ru_maxrss: KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        log(f"peak_memory process_rss:{rss // (2**20 if sys.platform == 'darwin' else 2**10)}MiB")


def export_and_rescore(trainer: Trainer, evaluator: Evaluator, code: tuple, val_suffix: str, ledger: dict,
                       log: RunLog, settings: Settings, runtime: Runtime) -> str:
    """Write the compressed model, then load those exact bytes back into the model and score it again; returns the
    run's summary (rank 0's: the others do not know the artifact's bytes)."""
    rt, model, fmt = runtime, trainer.model, settings.export_format
    format_id = re.sub(r"\W", "_", fmt)  # int6+lzma -> int6_lzma, as the final lines spell it
    t_export = time.perf_counter()
    artifact_path = Path("logs") / f"{settings.run_id}.int{settings.export_bits}.ptz"
    unscored_path = artifact_path.with_name(artifact_path.name + ".unscored")  # renamed once its score is finite
    blob, hessians, total = b"", None, 0
    if settings.export_quant == "gptq":
        hessians = collect_hessians(model, settings, rt, log)
        ledger["gptq"] = 1000 * (time.perf_counter() - t_export)
    if rt.is_master:
        code_bytes = len(code[settings.export_packed_code])  # code: (source, packed)
        write_atomically(unscored_path, export_artifact(model, settings, code_bytes, log, hessians, ledger))
        if hessians is not None:  # GPTQ reads training tokens: its time must fit in the training budget
            used_ms = ledger["training"] + ledger["gptq"]
            log(f"gptq: {ledger['gptq']:.0f}ms (calibration and rounding) train_time+gptq:{used_ms:.0f}ms")
            if 0 < 1000 * settings.max_wallclock_seconds < used_ms:
                log(f"WARNING: training plus GPTQ took {used_ms:.0f}ms, over MAX_WALLCLOCK_SECONDS; raise "
                    f"GPTQ_RESERVE_SECONDS above {settings.gptq_reserve_seconds:g}")
        blob = unscored_path.read_bytes()
        total = len(blob) + code_bytes
        log(f"Serialized model {fmt}: {len(blob)} bytes (path:{artifact_path})")
        log(f"Code size: {len(code[0])} bytes packed:{len(code[1])} code_id:{hashlib.sha256(code[1]).hexdigest()}")
        log(f"Total submission size {fmt}: {total} bytes")
        if total > ARTIFACT_CAP_BYTES:
            log(f"WARNING: ARTIFACT OVER THE CAP: {total} bytes exceeds {ARTIFACT_CAP_BYTES:,} by "
                f"{total - ARTIFACT_CAP_BYTES} bytes; this run is not a valid submission")
    if rt.distributed:  # every rank scores the bytes rank 0 wrote, also across nodes without a shared disk
        blob = broadcast_bytes(blob, rt)
    ledger["export"] = 1000 * (time.perf_counter() - t_export)
    model.load_state_dict(decompress_model(blob))
    s, stride = settings, settings.eval_stride if 0 < settings.eval_stride < settings.train_seq_len else 0
    ttt, lora = s.ttt_epochs > 0, s.ttt_method == "lora"  # TTT scores as it goes: a sliding pass with EVAL_SLIDING=1
    passes = [("roundtrip", 0, "round-trip")] * (ttt or not stride) + [("sliding", stride, "sliding-window")] * bool(
        stride and (s.eval_sliding or not ttt))
    passes += [("ttt", s.ttt_chunk_tokens if lora else stride, "test-time-training")] * ttt  # lora: chunk by chunk
    ttt_scorer = (evaluator.evaluate_with_lora_ttt, trainer.model) if lora else (evaluator.evaluate_with_ttt,
                                                                                 trainer.compiled)
    ttt_detail = (f" lora_rank:{s.ttt_lora_rank} lr:{s.ttt_lora_lr} steps:{s.ttt_epochs} docs_per_batch:"
                  f"{s.ttt_batch_size}" if lora else f" epochs:{s.ttt_epochs} lr:{s.ttt_lr}") + \
        f" chunk_tokens:{s.ttt_chunk_tokens}"
    for name, pass_stride, what in passes:
        packed_rows = s.pack_documents and name == "roundtrip"  # the record's rows, documents cut at TRAIN_SEQ_LEN
        log(f"eval_pass:{name} stride:{pass_stride or s.train_seq_len} window:{s.train_seq_len}"
            + ttt_detail * (name == "ttt") + f" packed_rows:{evaluator.row_tokens}" * packed_rows)
        rt.sync()
        t_eval = time.perf_counter()
        score, scored_model = ttt_scorer if name == "ttt" else (evaluator.evaluate, trainer.compiled)
        val_loss, val_bpb = score(scored_model, pass_stride, stage=f"{name}_eval")
        rt.sync()
        ledger[f"{name}_eval"] = eval_ms = 1000 * (time.perf_counter() - t_eval)
        check_finite_score(val_loss, val_bpb, f"the {what} score of {unscored_path} (kept, no submission)", settings)
        log(f"final_{format_id}_roundtrip val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_ms:.0f}ms"
            f"{val_suffix}")
        log(f"final_{format_id}_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}{val_suffix}")
    eval_ms = sum(ledger[f"{name}_eval"] for name, *_ in passes)
    log(f"eval_total:{eval_ms:.0f}ms")
    if eval_ms > 600_000:  # the challenge's evaluation cap, on 8xH100
        log(f"WARNING: evaluation took {eval_ms:.0f}ms, over 600 s: lower TTT_EPOCHS or raise TTT_CHUNK_TOKENS")
    if rt.is_master:
        os.replace(unscored_path, artifact_path)
    fits = "fits under" if total <= ARTIFACT_CAP_BYTES else "not a valid submission: OVER"
    return (f"summary: val_bpb {val_bpb:.8f} ({passes[-1][0]} pass{val_suffix}), artifact {total:,} bytes ({fits} "
            f"{ARTIFACT_CAP_BYTES:,}) = {artifact_path} + train_gpt.py")


def broadcast_bytes(blob: bytes, runtime: Runtime) -> bytes:
    size = torch.tensor([len(blob)], dtype=torch.int64, device=runtime.device)
    dist.broadcast(size, src=0)
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=runtime.device)
    if runtime.is_master:
        data.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    return data.cpu().numpy().tobytes()


def settings_help(source: str) -> str:
    """`--help`: every setting, its default, the presets' values and its meaning: its comment in Settings, which a
    packed file (pack_code) has dropped, so that one lists names and values only."""
    body = source.partition("\nclass Settings:")[2].partition("@classmethod")[0]
    meanings = dict(re.findall(r"(?m)^    (\w+): .*?  # (.*)$", body))
    lines = ["Settings are environment variables (NAME=value python3 train_gpt.py); PRESET's values apply first:",
             f"{'NAME':28} {'DEFAULT':22} MEANING [PRESET VALUES]"]
    for f in fields(Settings):
        presets = ", ".join(f"{p}: {values[f.name]!r}" for p, values in PRESETS.items() if f.name in values)
        lines.append(f"{f.name.upper():28} {f.default!r:22} {meanings.get(f.name, '')}"
                     + f" [{presets}]" * bool(presets))
    return "\n".join(lines + ["(a packed file: the meanings are in the readable train_gpt.py)"] * (not meanings))


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):  # before anything runs or is written
        return print(settings_help(Path(__file__).read_text(encoding="utf-8", errors="replace")))
    log = RunLog("", is_master=False)  # writes nothing, until the run's own log exists
    try:
        check_packed_file(Path(__file__))  # before any log: the run's name stays free
        settings = Settings.from_env()
        if not settings.run_id:
            settings = Settings(**{**asdict(settings), "run_id": str(uuid.uuid4())})
        runtime = setup_runtime(settings)
        log = RunLog(settings.run_id, runtime.is_master, bool(settings.overwrite))
        train(settings, runtime, log)
    except (RunError, ValueError, FileNotFoundError) as e:  # SettingsError is a ValueError
        with contextlib.suppress(RunError):  # into the log too, unless the log is what failed
            log(f"error: {e}", console=False)
        sys.exit(f"error: {one_line(str(e))}")
    finally:
        close_process_group()


def close_process_group() -> None:
    if dist.is_initialized():
        gc.collect()  # DDP's reducer sits in reference cycles: free it while its process group exists
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
