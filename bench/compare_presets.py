"""CPU evidence: the presets at equal tiny size and equal steps, over several seeds.

    python3 bench/compare_presets.py                        # 3 seeds, the fineweb split, baseline vs strong
    python3 bench/compare_presets.py --configs strong-march strong   # the strong default before/after issue 12
    python3 bench/compare_presets.py --splits shakespeare --seeds 1337 1338

Configurations: `baseline` (PRESET=baseline, sp1024), `strong` (the default: sp8192, SmearGate, score-first TTT,
the ladder's settings) and `strong-march` (the strong default before issue 12: sp1024, no SmearGate, no TTT,
QK gain 5.0, Muon momentum 0.99, weight decay 0.04). Each run's log has the score without TTT in the
final line before the last, which the table reports too.

Data (built in a temporary folder from ../shared/data, tokenized with the published tokenizer of the
configuration's vocabulary):
- `fineweb` (default): the FineWeb-Edu sample's paragraphs, the first 80% for training and the last 20% for
  validation: disjoint documents of the challenge's own distribution.
- `shakespeare`: train on tiny-shakespeare, validate on the whole FineWeb-Edu sample; the validation text
  is another domain, so it measures transfer to it as much as modelling.
300 steps of 2048 tokens read the fineweb split's 304K training tokens twice.

Both presets get the same size overrides (layers, width, heads, MLP, sequence, batch, steps). Each preset's
step-counted constants, set for a 8xH100 run, are mapped to this run's length so both keep the shape they
have there: the baseline's WARMDOWN_ITERS 1200 and MUON_MOMENTUM_WARMUP_STEPS 500 of its 13,780 steps, and
the strong default's EMA horizon (decay 0.997, ~333 steps of ~5,000). The strong default's layer choices are
mapped to 4 layers (RECUR_LAYERS 4,5 or 3,4,5 of 11 -> 1,2 of 4; PARALLEL_LAST_N 4 of 11 -> 1;
ROPE_DIMS 16 of 64 head dims -> 8 of 32), and TTT's chunk to the small validation split (TTT_CHUNK_TOKENS 4096:
~20 chunks, as ~1,240 chunks of 32,768 on the published split).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path[:0] = [str(REPO / "data"), str(REPO / "records")]
from run_log import read_run_log  # noqa: E402
from shard_io import write_shard  # noqa: E402

SIZE = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3, TRAIN_SEQ_LEN=256,
            TRAIN_BATCH_TOKENS=2048, VAL_BATCH_SIZE=65536, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=100, WARMUP_STEPS=0,
            MAX_WALLCLOCK_SECONDS=0, DEVICE="cpu")
CONFIGS = {"baseline": ("baseline", 1024, {}), "strong": ("strong", 8192, dict(TTT_CHUNK_TOKENS=4096)),
           "strong-march": ("strong", 1024, dict(SMEAR_GATE=0, TTT_EPOCHS=0, QK_GAIN_INIT=5.0, MUON_MOMENTUM=0.99,
                                                 MUON_WEIGHT_DECAY=0.04))}


def tokenizer(vocab: int) -> Path:
    return SHARED / "tokenizers" / f"fineweb_{vocab}_bpe.model"


def preset_overrides(preset: str, iterations: int) -> dict:
    if preset == "baseline":
        return dict(WARMDOWN_ITERS=round(1200 / 13780 * iterations),
                    MUON_MOMENTUM_WARMUP_STEPS=round(500 / 13780 * iterations))
    ema_steps = 333 / 5000 * iterations  # the same horizon 1 / (1 - decay) as a fraction of training
    return dict(EMA_DECAY=f"{1 - 1 / ema_steps:.4f}", RECUR_LAYERS="1,2", PARALLEL_LAST_N=1, ROPE_DIMS=8)


def write_documents(folder: Path, split: str, docs_ids: list[list[int]]) -> int:
    stream = np.concatenate([np.concatenate(([1], ids)) for ids in docs_ids]).astype(np.uint16)
    write_shard(folder / f"fineweb_{split}_000000.bin", stream)
    return stream.size


def build_split(name: str, root: Path, sp) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    fineweb = [line for line in (SHARED / "fineweb_sample" / "fineweb_edu_sample10BT_prefix_1Mchars.txt")
               .read_text(encoding="utf-8").split("\n") if line.strip()]
    if name == "shakespeare":
        plays = (SHARED / "fallback" / "tinyshakespeare_input.txt").read_text(encoding="utf-8")
        train_docs, val_docs = [p for p in plays.split("\n\n") if p.strip()], fineweb
    else:
        cut = len(fineweb) * 4 // 5
        train_docs, val_docs = fineweb[:cut], fineweb[cut:]
    n_train = write_documents(folder, "train", sp.encode(train_docs))
    n_val = write_documents(folder, "val", sp.encode(val_docs))
    print(f"split {name}: train {n_train} tokens ({len(train_docs)} docs), val {n_val} tokens ({len(val_docs)} docs)",
          flush=True)
    return folder


def run(config: str, seed: int, data: Path, iterations: int, workdir: Path) -> dict:
    preset, vocab, overrides = CONFIGS[config]
    run_id = f"{data.name}_{config}_{seed}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update({k: str(v) for k, v in {**SIZE, **preset_overrides(preset, iterations), **overrides}.items()})
    env.update(PRESET=preset, SEED=str(seed), ITERATIONS=str(iterations), RUN_ID=run_id, DATA_PATH=str(data),
               TOKENIZER_PATH=str(tokenizer(vocab)), VOCAB_SIZE=str(vocab))
    t0 = time.time()
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=workdir,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{run_id} failed:\n{result.stderr[-3000:]}")
    log_path = workdir / "logs" / f"{run_id}.txt"
    scored = read_run_log(log_path)
    first_final = re.findall(r"^final_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log_path.read_text(), re.M)[0]
    row = dict(val_loss=scored.val_loss, val_bpb=scored.val_bpb, bpb_without_ttt=float(first_final),
               pre_export_bpb=scored.pre_export_val_bpb, model_bytes=scored.model_bytes, seconds=time.time() - t0)
    print(f"{run_id}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    return row


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--splits", nargs="+", default=["fineweb"], choices=["fineweb", "shakespeare"])
    parser.add_argument("--configs", nargs="+", default=["baseline", "strong"], choices=list(CONFIGS))
    args = parser.parse_args()
    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table = ["| split | config | final val_loss | final val_bpb (sliding for strong) | the same without TTT "
                 "| pre-export val_bpb (plain) | model bytes |", "|---|---|---|---|---|---|---|"]
        for split in args.splits:
            for config in args.configs:
                vocab = CONFIGS[config][1]
                sp = spm.SentencePieceProcessor(model_file=str(tokenizer(vocab)))
                data = root / f"sp{vocab}"
                data = data / split if (data / split).exists() else build_split(split, data, sp)
                rows = [run(config, seed, data, args.iterations, root) for seed in args.seeds]
                columns = [mean_std([r[k] for r in rows])
                           for k in ("val_loss", "val_bpb", "bpb_without_ttt", "pre_export_bpb")]
                table.append(f"| {split} | {config} | {' | '.join(columns)} "
                             f"| {statistics.mean(r['model_bytes'] for r in rows):,.0f} |")
    print(f"\n{len(args.seeds)} seeds {args.seeds}, {args.iterations} steps, size {SIZE}\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
