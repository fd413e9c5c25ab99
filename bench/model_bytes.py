"""Model bytes of the default export at full size, before any training run: does the default fit the cap?

    python3 bench/model_bytes.py            # the kit's export of the kit's model (settings from the environment)
    python3 bench/model_bytes.py --record   # the 1.0714 record's own export of the same weights (needs ../shared)

Trained weights are not at hand, so every matrix is made of Gaussian rows of varied scale and every Hessian from
correlated inputs (tests/test_gptq.py's method): such weights compress slightly worse than trained ones (compare the
record's own export of them with its logged, trained, model bytes). GPTQ, int6 matrices and the embedding's bits as
the settings say, without EXPORT_FIT_CAP's step-down: the bytes of the format itself. The full size takes minutes on
a CPU, mostly brotli-11. Prints one line: `model_bytes:<N> ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import train_gpt  # noqa: E402
from test_gptq import correlated_inputs_hessian, gaussian_rows_model  # noqa: E402


def kit_model() -> tuple[train_gpt.Settings, train_gpt.GPT]:
    settings = dataclasses.replace(train_gpt.Settings.from_env(), export_fit_cap=0)
    return settings, gaussian_rows_model(settings)


def hessians_of(state: dict) -> dict:
    """One Hessian per matrix of the kit's state dict (whose names the record's export uses too)."""
    torch.manual_seed(1)
    return {name: correlated_inputs_hessian(t.shape[1]) for name, t in state.items() if t.ndim == 2}


def kit_model_bytes() -> int:
    settings, model = kit_model()
    return len(train_gpt.export_artifact(model, settings, 0, lambda line: None, hessians_of(model.state_dict())))


def record_model_bytes() -> int:
    """The record's own export (its gptq_mixed_quantize and _compress) of the same weights and Hessians, loaded into
    its model through its own banking and taken out again as its serialize takes them."""
    from reference_record import load_record, record_state_dict_1_0714
    from test_record_1_0714_model import LOGGED
    settings, model = kit_model()
    with tempfile.TemporaryDirectory() as folder:
        env = {k: str(v) for k, v in LOGGED.items() if k not in os.environ}  # its runs' settings, unless set here
        record = load_record(Path(folder), env, record="1.0714")
        h = record.Hyperparameters()
        theirs = record.GPT(h)
        theirs.load_state_dict(record_state_dict_1_0714(record, model.state_dict()))
        state = record._unbank_state_dict(theirs.state_dict(), h.num_layers)
        with contextlib.redirect_stdout(io.StringIO()):  # its log of the quantized names
            result, meta = record.gptq_mixed_quantize(state, hessians_of(model.state_dict()), h)
        raw = io.BytesIO()
        torch.save({"w": result, "m": meta}, raw)
        return len(record._compress(raw.getvalue(), h.compressor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="the 1.0714 record's export of the same weights")
    args = parser.parse_args()
    from reference_record import RECORDS
    if args.record and not RECORDS["1.0714"].source.exists():
        sys.exit(f"error: --record needs the 1.0714 record's source, {RECORDS['1.0714'].source} (../shared beside the "
                 f"repository): put it there, or leave out --record")
    t0 = time.perf_counter()
    size = record_model_bytes() if args.record else kit_model_bytes()
    code = len(Path(train_gpt.__file__).read_bytes())
    print(f"model_bytes:{size} {'record' if args.record else 'kit'} seconds:{time.perf_counter() - t0:.0f} "
          f"room_for_code:{train_gpt.ARTIFACT_CAP_BYTES - size} (train_gpt.py as it is: {code} bytes)")


if __name__ == "__main__":
    main()
