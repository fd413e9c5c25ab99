"""On a CUDA GPU: compiled bf16 training of both presets, evaluation equal to the CPU's, the export from CUDA
tensors, and attention on the FlashAttention kernel. Skipped without CUDA; bench/gpu_check.py runs them on a
GPU (`python3 -m pytest -m cuda`). Sizes follow the presets' defaults, so the tests follow them when they change.
Every model is built as Trainer builds it (build_model: on CUDA, the token embedding in bf16)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import train_gpt
from shard_io import write_shard
from train_gpt import Settings

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.py)")]


@pytest.fixture(autouse=True)
def fresh_dynamo_caches():
    """Each test compiles from scratch, far from dynamo's recompile limit (which would fall back to eager)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def runtime_on(device: str, precision: str = "auto") -> train_gpt.Runtime:
    """One process's Runtime with the choices setup_runtime makes for `device` (on CUDA: bf16, fused, compiled)."""
    choices = train_gpt.device_choices(device, Settings(precision=precision))
    return train_gpt.Runtime(torch.device(device, 0) if device == "cuda" else torch.device(device), 0, 1, 0, 1,
                             **choices)


def cuda_runtime() -> train_gpt.Runtime:
    return runtime_on("cuda")


def perturbed_model(settings: Settings, runtime: train_gpt.Runtime, scale: float = 0.02) -> train_gpt.GPT:
    """A model built as Trainer builds it, whose zero-initialised projections are not zero, so every path counts."""
    torch.manual_seed(0)
    model = train_gpt.build_model(settings, runtime)
    for p in model.parameters():
        p.data.add_(scale * torch.randn_like(p))
    return model


def write_repeating_shard(folder, vocab_size: int, seq_len: int) -> None:
    """A short random pattern of 64 distinct ids, repeated: a few steps visibly lower the loss on it."""
    pattern = np.random.default_rng(0).integers(0, min(64, vocab_size), 3 * seq_len + 7)
    write_shard(folder / "fineweb_train_000000.bin", np.tile(pattern, 40).astype(np.uint16))


@pytest.mark.parametrize("preset", ["strong", "baseline"])
def test_compiled_bf16_training_steps_of_each_preset_lower_the_loss(preset, tmp_path):
    seq_len = Settings.for_preset(preset).train_seq_len
    settings = Settings.for_preset(preset, data_path=str(tmp_path), train_batch_tokens=8 * seq_len, device="cuda")
    write_repeating_shard(tmp_path, settings.vocab_size, seq_len)
    runtime = train_gpt.setup_runtime(settings)
    assert (runtime.device.type, runtime.compute_dtype, runtime.compile) == ("cuda", torch.bfloat16, True)
    trainer = train_gpt.Trainer(settings, runtime)
    losses = [trainer.step(i, 1.0, progress=0.0).item() for i in range(4)]
    if settings.recur_layers:  # the second graph: depth recurrence on
        losses.append(trainer.step(4, 1.0, progress=max(settings.recur_start_frac, 0.6)).item())
        assert trainer.model.recurrence_active
    assert all(np.isfinite(losses)), losses
    assert losses[3] < losses[0], losses


def test_compiled_bf16_evaluation_on_cuda_equals_the_fp32_cpu_evaluation():
    settings = Settings.for_preset("strong", train_seq_len=256, val_batch_size=3 * 256)
    cpu_model = perturbed_model(settings, runtime_on("cpu"))
    cpu_model.recurrence_active = bool(settings.recur_layers)
    cuda_model = train_gpt.build_model(settings, cuda_runtime())
    cuda_model.load_state_dict(cpu_model.state_dict())
    cuda_model.recurrence_active = cpu_model.recurrence_active
    tokens = np.random.default_rng(0).integers(0, settings.vocab_size, 5 * 256 + 1).astype(np.uint16)
    split = train_gpt.ValidationSplit(tokens, True)
    table = train_gpt.ByteTable(np.random.default_rng(1).integers(1, 5, settings.vocab_size),
                                np.zeros(settings.vocab_size, bool), np.zeros(settings.vocab_size, bool))
    cpu = train_gpt.Evaluator(split, table, settings, runtime_on("cpu"))
    on_cuda = train_gpt.Evaluator(split, table, settings, cuda_runtime())
    compiled = torch.compile(cuda_model, dynamic=False, fullgraph=True)
    for stride in (0, 64):  # plain and sliding windows: one batch shape, so one compiled graph for both
        with sdpa_kernel(SDPBackend.MATH):  # the CPU reference: plain math, whatever an earlier test pinned
            cpu_loss, cpu_bpb = cpu.evaluate(cpu_model, stride)
        cuda_loss, cuda_bpb = on_cuda.evaluate(compiled, stride)
        assert cuda_loss == pytest.approx(cpu_loss, rel=1e-2), stride  # bf16 activations against fp32
        assert cuda_bpb == pytest.approx(cpu_bpb, rel=1e-2), stride


def test_compiled_evaluation_on_cuda_compiles_one_graph_per_recurrence_state():
    from torch._dynamo.utils import counters
    settings = Settings.for_preset("strong", train_seq_len=128, val_batch_size=3 * 128)
    model = perturbed_model(settings, cuda_runtime())
    tokens = np.random.default_rng(0).integers(0, settings.vocab_size, 5 * 128 + 1).astype(np.uint16)
    ones = np.ones(settings.vocab_size, np.int64)
    ev = train_gpt.Evaluator(train_gpt.ValidationSplit(tokens, True),
                             train_gpt.ByteTable(ones, ones == 0, ones == 0), settings, cuda_runtime())
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    graphs = []
    for recurrence in (False, True):
        model.recurrence_active = recurrence
        before = counters["stats"]["unique_graphs"]
        ev.evaluate(compiled)  # 5 windows in batches of 3
        ev.evaluate(compiled, stride=32)  # 17 windows in batches of 3
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 1]


@pytest.mark.parametrize("export_format", sorted({Settings().export_format, "int8+zlib"}))
def test_export_from_cuda_tensors_is_the_cpu_export_and_loads_back_on_cuda(export_format):
    """The CUDA model against the same weights on the CPU in the CUDA configuration (PRECISION=bf16)."""
    settings = Settings.for_preset("strong", num_layers=2)  # full width: matrices big enough to be quantised
    cpu_model = perturbed_model(settings, runtime_on("cpu", precision="bf16"))
    cuda_model = train_gpt.build_model(settings, cuda_runtime())
    cuda_model.load_state_dict(cpu_model.state_dict())
    control = cpu_model.control_tensor_names()
    bits = int(export_format.split("+")[0].removeprefix("int"))
    def export(model):
        return train_gpt.compress_packed(train_gpt.quantize_state_dict(model.state_dict(), control, bits), export_format)
    blob = export(cuda_model)
    assert blob == export(cpu_model)
    restored = train_gpt.decompress_model(blob)
    cuda_model.load_state_dict(restored)
    for name, tensor in cuda_model.state_dict().items():
        assert tensor.device.type == "cuda" and torch.equal(tensor.cpu(), restored[name]), name


def test_attention_runs_the_flash_attention_kernel():
    settings = Settings.for_preset("strong", device="cuda")
    runtime = train_gpt.setup_runtime(settings)  # pins FlashAttention
    model = train_gpt.build_model(settings, runtime)
    inputs = torch.randint(0, settings.vocab_size, (2, settings.train_seq_len), device=runtime.device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        model(inputs, inputs).mean().backward()
        torch.cuda.synchronize()
    names = [event.key for event in profile.key_averages()]
    assert any("flash" in name.lower() for name in names), names
    other_kernels = ("_efficient_attention", "_cudnn_attention", "_scaled_dot_product_attention_math")
    assert not [name for name in names if any(k in name for k in other_kernels)]


def test_attention_flash_cannot_run_fails_instead_of_falling_back():
    train_gpt.pin_flash_attention()
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float32)  # flash takes only fp16 / bf16
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)


@pytest.mark.parametrize("preset", ["strong", "1.0810"])  # TTT_METHOD=lora and full
def test_ttt_compiles_no_graph_after_the_warm_up_compiled_its_step(preset):
    """compile_ttt (run in warm-up) compiles TTT's graphs; TTT inside the timed evaluation then compiles nothing.
    lora: the adapters' forward and backward, one dynamic graph per batch size (documents of 2 to 700 tokens: 3
    batches of 4, the last of 2). full: scoring uses the evaluation graph, training the warmed-up one."""
    from torch._dynamo.utils import counters
    settings = Settings.for_preset(preset, train_seq_len=256, val_batch_size=4 * 256, ttt_epochs=1, ttt_batch_size=4,
                                   **({"ttt_chunk_tokens": 512} if preset == "1.0810" else {}))
    model = perturbed_model(settings, cuda_runtime())
    model.recurrence_active = bool(settings.recur_layers)  # as after training
    lengths = np.array([2, 9, 30, 64, 100, 150, 230, 256, 300, 700])
    tokens = np.random.default_rng(0).integers(2, settings.vocab_size, lengths.sum() + 1)
    tokens[np.cumsum(lengths) - lengths] = train_gpt.BOS_ID
    ones = np.ones(settings.vocab_size, np.int64)
    ev = train_gpt.Evaluator(train_gpt.ValidationSplit(tokens.astype(np.uint16), True),
                             train_gpt.ByteTable(ones, ones == 0, ones == 0), settings, cuda_runtime())
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    if settings.ttt_method == "full":
        ev.evaluate(compiled, 64)  # the evaluation graph, as the last validation of training compiles it
    ev.compile_ttt(model, compiled)
    before = counters["stats"]["unique_graphs"]
    ev.evaluate_with_lora_ttt(model) if settings.ttt_method == "lora" else ev.evaluate_with_ttt(compiled, 64)
    assert counters["stats"]["unique_graphs"] == before