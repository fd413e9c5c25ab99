"""The 1.0714 record's model (the kit's default GPT), checked against the record's own code run on the CPU
(tests/reference_record.py): the same tensors, the same initial weights for a seed, the same logits on packed rows of
documents (variable-length attention), and the same per-token losses with test-time LoRA adapters."""
from __future__ import annotations

import re

import pytest
import torch

import train_gpt
from reference_record import (RECORDS, kit_state_dict_1_0714, load_record, record_state_dict_1_0714,
                              require_reference)
from test_record_equivalence_model import assert_close_relative, one_thread  # noqa: F401
from train_gpt import Settings

# What the record's runs set beyond its source's defaults (its logs' Hyperparameters block; test below).
LOGGED = dict(QK_GAIN_INIT=5.25, SMEAR_GATE=1, SMEAR_GATE_WIDTH=12, GATE_ATTN_OUT=1, GATE_ATTN_SRC="proj",
              GATE_WIDTH=12)
# Reduced size: the record's 11 layers, loops of 3-5, XSA on all, two lanes from 8, MLP 4x, gated skips, at width 64
# with 2 KV heads and a 32-token TRAIN_SEQ_LEN (the longest segment of a packed row).
REDUCED_RECORD = dict(LOGGED, VOCAB_SIZE=128, MODEL_DIM=64, EMBEDDING_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2,
                      ROPE_DIMS=8, TRAIN_SEQ_LEN=32)
REDUCED_KIT = dict(vocab_size=128, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8,
                   train_seq_len=32)
# Float rounding only: both compute in fp32 on the CPU, the same operations up to their order (rotary frequencies
# computed as base^-x against 1 / base^x, per-head broadcasting, segment outputs gathered differently).
LOGITS_RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_record(tmp_path_factory.mktemp("record_1_0714"), {k: str(v) for k, v in REDUCED_RECORD.items()},
                       record="1.0714")


def kit_model(**overrides) -> train_gpt.GPT:
    return train_gpt.GPT(Settings(**{**REDUCED_KIT, **overrides}))


def perturbed_pair(record, seed: int = 0, **overrides):
    """The record's model with every tensor moved off its init (banks, gates, lambdas, smear), and the kit's model
    holding the same weights."""
    torch.manual_seed(seed)
    theirs = record.GPT(record.Hyperparameters())
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = kit_model(**overrides)
    state = kit_state_dict_1_0714(record, theirs.state_dict())  # overrides may drop tensors (e.g. the lanes')
    ours.load_state_dict({name: t for name, t in state.items() if name in ours.state_dict()})
    return theirs, ours


def packed_row(length: int = 200, seed: int = 1) -> torch.Tensor:
    """One row of documents that starts mid-document, with a 70-token document (cut at 32 and 64 tokens into it)."""
    ids = torch.randint(2, 128, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, [9, 29, 99, 104, 150]] = train_gpt.BOS_ID  # documents of 20, 70, 5, 46 and 50 tokens after a partial one
    return ids


def record_cu_seqlens(record, ids: torch.Tensor, max_len: int = 32):
    bos = (ids[0] == train_gpt.BOS_ID).nonzero().flatten().tolist()
    return record._build_cu_seqlens(bos, ids.size(1), ids.device, max_len, 64)


def logged_hyperparameters(seed: int = 42) -> dict[str, str]:
    require_reference("1.0714")
    log = (RECORDS["1.0714"].source.parent / f"train_seed{seed}.log").read_text(encoding="utf-8")
    return dict(re.findall(r"^  (\w+): (.*)$", log.split("Hyperparameters:")[1].split("train_shards")[0], re.M))


# Every line of the Hyperparameters block of the record's logs, against the kit's default: a setting of the same name,
# or of another (RENAMED), a value the kit derives from its settings (DERIVED), what the kit always does (FIXED), or
# nothing the run depends on (NOT_SETTINGS).
SAME_NAME = ("adam_eps", "beta1", "beta2", "ema_decay", "embed_lr", "eval_stride", "gate_attn_out",
             "gptq_calibration_batches", "gptq_reserve_seconds", "grad_clip_norm", "head_lr", "iterations", "ln_scale",
             "logit_softcap", "matrix_lr", "max_wallclock_seconds", "mlp_mult", "model_dim", "muon_backend_steps",
             "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps", "num_heads", "num_kv_heads",
             "num_layers", "num_loops", "parallel_start_layer", "qk_gain_init", "rope_base", "rope_dims", "scalar_lr",
             "tie_embeddings", "tied_embed_init_std", "tied_embed_lr", "train_batch_tokens", "train_log_every",
             "train_seq_len", "ttt_batch_size", "ttt_beta1", "ttt_beta2", "ttt_lora_lr", "ttt_lora_rank",
             "ttt_weight_decay", "val_loss_every", "vocab_size", "warmdown_frac", "warmup_steps", "xsa_last_n")
RENAMED = dict(adam_wd="scalar_weight_decay", embed_wd="embed_weight_decay", muon_wd="muon_weight_decay",
               muon_row_normalize="muon_row_norm", skip_gates_enabled="skip_gates", smear_gate_enabled="smear_gate",
               enable_looping_at="recur_start_frac", embedding_dim="model_dim", eval_seq_len="train_seq_len",
               ttt_eval_seq_len="train_seq_len", ttt_chunk_size="ttt_chunk_tokens", ttt_grad_steps="ttt_epochs",
               val_batch_tokens="val_batch_size", embed_bits="export_embed_bits", matrix_clip_sigmas="gptq_clip_sigmas",
               mlp_clip_sigmas="gptq_mlp_clip_sigmas", attn_clip_sigmas="gptq_attn_clip_sigmas",
               embed_clip_sigmas="gptq_embed_clip_sigmas", sliding_window_enabled="eval_sliding")
DERIVED = dict(loop_start=lambda s: s.recur_layer_ids[0], loop_end=lambda s: s.recur_layer_ids[-1],
               ttt_enabled=lambda s: s.ttt_epochs > 0 and s.ttt_method == "lora", matrix_bits=lambda s: s.export_bits,
               compressor=lambda s: s.export_format.split("+")[1],
               world_size=lambda s: s.loader_streams,  # its 8 GPUs: the kit's micro-batches, whatever its world size
               gate_width=lambda s: train_gpt.GATE_INPUTS, smear_gate_width=lambda s: train_gpt.GATE_INPUTS,
               ttt_optimizer=lambda s: {"lora": "adam"}[s.ttt_method])
FIXED = dict(distributed="True", grad_accum_steps="1",  # its 8 GPUs (world_size) of one micro-batch each
             gate_attn_src="proj",  # the attention gate reads the block's normalised attention input
             gate_mlp_out="False", rope_yarn="False",  # the kit has neither
             parallel_final_lane="mean",  # GPT.logits: the two lanes' mean
             ttt_k_lora="True", ttt_mlp_lora="True", ttt_o_lora="True",  # BatchedTTTLoRA: Q, K, V, O, MLP-out, head
             min_lr="0.0",  # lr_multiplier: the warm-down ends at 0
             val_doc_fraction="1.0", ttt_eval_batches="")  # TTT scores every document, in every batch
NOT_SETTINGS = ("artifact_dir", "data_dir", "datasets_dir", "eval_only_path", "is_main_process", "local_rank",
                "logfile", "model_path", "quantized_model_path", "rank", "run_id", "tokenizer_path", "train_files",
                "val_files", "ttt_output_dir",  # paths, names and the process's rank
                "seed",  # each run's own: 42, 1337 and 0 (the kit's default, 1337, is one of them)
                "muon_beta2",  # read by no code of the record
                "rope_train_seq_len")  # read only with rope_yarn


def as_value(raw: str):
    return raw if raw in ("", "proj", "mean", "adam", "brotli") else float(raw == "True") if raw in (
        "True", "False") else float(raw)


@pytest.mark.parametrize("seed", [42, 1337, 0])
def test_the_default_is_every_setting_the_records_runs_logged(seed):
    """Each line of the record's run's Hyperparameters block, one by one, against Settings() (the default)."""
    logged, s = logged_hyperparameters(seed), Settings()
    assert Settings.from_env({}) == s and s.preset == "strong"
    accounted = [*SAME_NAME, *RENAMED, *DERIVED, *FIXED, *NOT_SETTINGS]
    assert sorted(accounted) == sorted(logged) and len(set(accounted)) == len(accounted)
    expected = {**{k: getattr(s, k) for k in SAME_NAME}, **{k: getattr(s, v) for k, v in RENAMED.items()},
                **{k: f(s) for k, f in DERIVED.items()}}
    wrong = {k: (logged[k], v) for k, v in expected.items() if as_value(logged[k]) != as_value(str(v))}
    assert not wrong, f"the record logged / the kit's default: {wrong}"
    assert {k: logged[k] for k in FIXED} == FIXED
    assert (s.smear_bos_mask, s.smear_frozen, s.parallel_last_n, s.mlp_leaky_slope) == (0, 1, 0, 0.5)  # its code's
    assert (s.pack_documents, s.grad_clip_per_rank, s.warmup_keep_momentum, s.ortho_init) == (1, 1, 1, 2)
    assert (s.muon_rounding, s.rope_rounding, s.muon_ns_coeffs, s.export_quant) == ("1.0714", "1.0714", "fixed", "gptq")


def test_full_size_model_has_the_records_35945671_parameters_in_the_same_tensors(tmp_path):
    record = load_record(tmp_path, {k: str(v) for k, v in LOGGED.items()}, record="1.0714")
    with torch.device("meta"):  # full size, shapes only
        theirs, ours = record.GPT(record.Hyperparameters()), train_gpt.GPT(Settings())
    assert sum(p.numel() for p in ours.parameters()) == 35_945_671  # the record's logs: model_params:35945671
    unbanked = kit_state_dict_1_0714(record, {n: torch.empty(t.shape) for n, t in theirs.state_dict().items()})
    theirs_shapes = {n: t.shape for n, t in unbanked.items()}
    assert {n: p.shape for n, p in ours.state_dict().items()} == theirs_shapes
    assert "blocks.10.attn.attn_gate_proj.weight" in theirs_shapes and theirs_shapes["parallel_post_lambdas"] == \
        (11, 2, 2)


def test_model_starts_from_the_records_initial_weights_for_the_same_seed(record):
    """Exactly, every tensor: the record draws its embedding and gates when built, its banks only in _init_weights
    (every block matrix orthogonal, also the 32 x 64 ones here), ORTHO_INIT=2 replays that order."""
    torch.manual_seed(3)
    theirs = kit_state_dict_1_0714(record, record.GPT(record.Hyperparameters()).state_dict())
    their_generator = torch.get_rng_state()
    torch.manual_seed(3)
    ours = kit_model().state_dict()
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), name
    assert torch.equal(torch.get_rng_state(), their_generator)  # later draws (TTT's adapters) follow alike
    assert ours["blocks.0.attn.c_k.weight"].shape == (32, 64) and ours["blocks.0.attn.c_k.weight"].any()


@pytest.mark.parametrize("looping", [False, True])
def test_logits_equal_the_records_on_a_packed_row_of_documents(record, looping):
    theirs, ours = perturbed_pair(record)
    theirs.looping_active = ours.recurrence_active = looping
    ids = packed_row()
    cu_seqlens, max_seqlen = train_gpt.document_cu_seqlens(ids[0], 32)
    their_cu, their_max = record_cu_seqlens(record, ids)
    assert torch.equal(cu_seqlens, their_cu) and max_seqlen == their_max == 32
    with torch.no_grad():
        expected = theirs.forward_logits(ids, cu_seqlens=their_cu, max_seqlen=their_max)
        assert_close_relative(ours.logits(ids, cu_seqlens, max_seqlen), expected, LOGITS_RTOL)
        dense = theirs.forward_logits(ids)  # the documents matter: without segments the logits differ
    assert (dense - expected).abs().max() > 1e-2 * expected.abs().max()


def test_logits_equal_the_records_on_dense_rows(record):
    """Without cu_seqlens (GPTQ calibration, test-time training): causal attention over each whole row."""
    theirs, ours = perturbed_pair(record, seed=1)
    theirs.looping_active = ours.recurrence_active = True
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close_relative(ours.logits(ids), theirs.forward_logits(ids), LOGITS_RTOL)


def test_lora_forward_equals_the_records_forward_ttt(record):
    """Per-token losses with adapters on every block pass (Q, K, V, O, MLP) and the head, looping on, B non-zero."""
    theirs, ours = perturbed_pair(record, seed=2)
    theirs.looping_active = ours.recurrence_active = True
    torch.manual_seed(4)
    their_lora = record.BatchedTTTLoRA(3, theirs, 4)
    torch.manual_seed(4)
    our_lora = train_gpt.BatchedTTTLoRA(3, ours, 4)
    assert our_lora.state_dict().keys() == their_lora.state_dict().keys()
    for name, t in our_lora.state_dict().items():  # the same draws, in the same order
        assert torch.equal(t, their_lora.state_dict()[name]), name
    with torch.no_grad():
        for p in their_lora.parameters():
            p.add_(0.05 * torch.randn_like(p))
    our_lora.load_state_dict(their_lora.state_dict())
    ids = torch.randint(0, 128, (3, 33), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs.forward_ttt(ids[:, :-1], ids[:, 1:], lora=their_lora)
        assert_close_relative(ours(ids[:, :-1], ids[:, 1:], lora=our_lora), expected, LOGITS_RTOL)
        without = ours(ids[:, :-1], ids[:, 1:])
    assert (without - expected).abs().max() > 1e-3 * expected.abs().max()  # the adapters matter


def test_lora_reset_matches_the_records_order_and_draws_from_a_given_generator(record):
    theirs, ours = perturbed_pair(record)
    theirs.looping_active = ours.recurrence_active = True
    their_lora, our_lora = record.BatchedTTTLoRA(2, theirs, 4), train_gpt.BatchedTTTLoRA(2, ours, 4)
    torch.manual_seed(6)
    their_lora.reset()
    our_lora.reset(torch.Generator().manual_seed(6))
    for name, t in our_lora.state_dict().items():
        assert torch.equal(t, their_lora.state_dict()[name]), name
    assert len(our_lora.q_loras) == 17 and our_lora.k_loras[0].A.shape == (2, 4, 64)  # 8 + 9 passes looped
    assert our_lora.k_loras[0].B.shape == (2, 32, 4) and not our_lora.lm_head_lora.B.any()


@pytest.mark.parametrize("changed_back", [dict(smear_bos_mask=1), dict(parallel_start_layer=9),
                                          dict(parallel_start_layer=0, parallel_last_n=3)])
def test_logits_differ_when_one_setting_is_changed_back(record, changed_back):
    """The equivalence is a property of the record's settings: each of these changes breaks it."""
    theirs, ours = perturbed_pair(record, **changed_back)
    theirs.looping_active = ours.recurrence_active = True
    ids = packed_row()
    cu_seqlens, max_seqlen = train_gpt.document_cu_seqlens(ids[0], 32)
    with torch.no_grad():
        expected = theirs.forward_logits(ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        assert (ours.logits(ids, cu_seqlens, max_seqlen) - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("changed_back", [dict(ortho_init=1), dict(gate_attn_out=0)])
def test_initial_weights_differ_when_one_setting_is_changed_back(record, changed_back):
    torch.manual_seed(3)
    theirs = kit_state_dict_1_0714(record, record.GPT(record.Hyperparameters()).state_dict())
    torch.manual_seed(3)
    ours = kit_model(**changed_back).state_dict()
    assert ours.keys() != theirs.keys() or not torch.equal(ours["blocks.0.attn.c_k.weight"],
                                                          theirs["blocks.0.attn.c_k.weight"])


def test_kit_weights_load_into_the_records_model_unchanged(record):
    """The name map both ways (for tests that start the record from the kit's weights)."""
    ours = kit_model()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p))
    theirs = record.GPT(record.Hyperparameters())
    theirs.load_state_dict(record_state_dict_1_0714(record, ours.state_dict()))
    back = kit_state_dict_1_0714(record, theirs.state_dict())
    assert all(torch.equal(t, back[name]) for name, t in ours.state_dict().items())


def test_control_tensors_are_the_ones_the_records_name_patterns_pick(record):
    """Adam (SCALAR_LR) and 16-bit passthrough: the gates and lane weights too, as CONTROL_TENSOR_NAME_PATTERNS."""
    model = kit_model()
    theirs = {n for n, p in model.named_parameters()
              if p.ndim < 2 or any(pattern in n for pattern in record.CONTROL_TENSOR_NAME_PATTERNS)}
    assert model.control_tensor_names() == theirs
    assert {"blocks.3.attn.attn_gate_proj.weight", "parallel_post_lambdas", "parallel_resid_lambdas"} <= theirs
    muon = train_gpt.build_optimizers(model, Settings(**REDUCED_KIT), train_gpt.Runtime(
        torch.device("cpu"), 0, 1, 0, 1, torch.float32, False))[-1]
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and n not in theirs}


def test_output_gate_and_fresh_adapters_start_as_no_change():
    """The gate's W is zero (2 sigmoid(0) = 1) and a fresh adapter's B is zero: the logits are the model's without."""
    torch.manual_seed(0)
    gated, plain = kit_model(), kit_model(gate_attn_out=0)
    gated.recurrence_active = plain.recurrence_active = True
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in gated.parameters():
            if p.abs().sum() > 0:  # every tensor but the zero-initialised gates and projections
                p.add_(0.1 * torch.randn_like(p))
        plain.load_state_dict({n: t for n, t in gated.state_dict().items() if "attn_gate_proj" not in n})
        assert not gated.blocks[0].attn.attn_gate_proj.weight.any()
        assert torch.equal(gated.logits(ids), plain.logits(ids))
        assert torch.equal(gated.logits(ids, lora=train_gpt.BatchedTTTLoRA(2, gated, 4)), plain.logits(ids))
