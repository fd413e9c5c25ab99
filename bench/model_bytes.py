"""Model bytes of the default export at full size, before any training run: does the default fit the cap?

    python3 bench/model_bytes.py            # the kit's export of the kit's model (settings from the environment)
    python3 bench/model_bytes.py --record   # the 1.0810 record's own export of its model (needs ../shared)

Trained weights are not at hand, so every matrix is made of Gaussian rows of varied scale and every Hessian from
correlated inputs (tests/test_gptq.py's method): such weights compress slightly worse than trained ones (the
record's own export of them is 0.5% above its logged, trained, model bytes). GPTQ, int6 matrices and the int8
embedding as the settings say, without EXPORT_FIT_CAP's step-down: the bytes of the format itself. The full size
takes minutes on a CPU, mostly brotli-11. Prints one line: `model_bytes:<N> ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import train_gpt  # noqa: E402
from test_gptq import correlated_inputs_hessian, gaussian_rows_model  # noqa: E402


def kit_model_bytes() -> int:
    settings = dataclasses.replace(train_gpt.Settings.from_env(), export_fit_cap=0)
    model = gaussian_rows_model(settings)
    hessians = {name: correlated_inputs_hessian(p.shape[1]) for name, p in model.state_dict().items() if p.ndim == 2}
    return len(train_gpt.export_artifact(model, settings, 0, lambda line: None, hessians))


def record_model_bytes() -> int:
    import torch
    from reference_record import load_record
    with tempfile.TemporaryDirectory() as folder:
        record = load_record(Path(folder))
        h = record.Hyperparameters()
        model = record.GPT(h)
        torch.manual_seed(0)
        with torch.no_grad():  # the same draws as gaussian_rows_model, in the record's parameter order
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape) * 0.02 * (0.5 + torch.rand(p.shape[0], 1)))
        state = {k: v.detach() for k, v in model.state_dict().items()}
        hessians = {n: correlated_inputs_hessian(t.shape[1]) for n, t in state.items() if t.numel() > 65536}
        with contextlib.redirect_stdout(io.StringIO()):  # its log of the quantized names
            result, meta = record.gptq_mixed_quantize(state, hessians, h)
        raw = io.BytesIO()
        torch.save({"w": result, "m": meta}, raw)
        return len(record._compress(raw.getvalue(), h.compressor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help="the record's export of the record's model")
    args = parser.parse_args()
    t0 = time.perf_counter()
    size = record_model_bytes() if args.record else kit_model_bytes()
    code = len(Path(train_gpt.__file__).read_bytes())
    print(f"model_bytes:{size} {'record' if args.record else 'kit'} seconds:{time.perf_counter() - t0:.0f} "
          f"room_for_code:{train_gpt.ARTIFACT_CAP_BYTES - size} (train_gpt.py as it is: {code} bytes)")


if __name__ == "__main__":
    main()
