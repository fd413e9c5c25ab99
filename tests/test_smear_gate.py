"""SmearGate (the input-dependent gate of the records after 1.0810; on in the default as the 1.0714 record's, frozen and
across a BOS), here on the 1.0810 recipe: position t adds lambda x sigmoid(gate . e_t[:12]) x e_{t-1} to its
embedding e_t, with lambda 0 at init, never across a BOS with SMEAR_BOS_MASK=1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import train_gpt
from test_strong_default import cpu_runtime, perturbed_model, tiny


def test_smear_gate_adds_lambda_times_an_input_gated_share_of_the_previous_embedding():
    model = perturbed_model(tiny(smear_gate=1))
    ids = torch.tensor([[5, 7, 9, 11]])  # no BOS
    with torch.no_grad():
        e = model.tok_emb(ids)
        lam, w = model.smear_lambda.item(), model.smear_gate[0]  # (12,): one output
        gate = torch.sigmoid((e[:, 1:, :12] * w).sum(-1, keepdim=True))  # read from token t itself
        expected = torch.cat((e[:, :1], e[:, 1:] + lam * gate * e[:, :-1]), dim=1)
        assert lam != 0 and torch.allclose(model.embed(ids), F.rms_norm(expected, (64,)), atol=1e-6)


def test_smear_gate_starts_as_the_plain_embedding():
    model = train_gpt.GPT(tiny(smear_gate=1))
    ids = torch.tensor([[5, 7, 9, 11]])
    assert model.smear_lambda.item() == 0 and model.smear_gate.shape == (1, 12)
    with torch.no_grad():
        assert torch.equal(model.embed(ids), F.rms_norm(model.tok_emb(ids), (64,)))


def test_smear_gate_keeps_a_documents_first_token_the_same_whatever_the_previous_document():
    """BOS fix: nothing of the previous document (here its last token) reaches the next document's tokens."""
    model = perturbed_model(tiny(smear_gate=1))
    bos = train_gpt.BOS_ID
    one, other = torch.tensor([[bos, 5, 6, 7, bos, 20, 21]]), torch.tensor([[bos, 40, 41, 42, bos, 20, 21]])
    with torch.no_grad():
        x_one, x_other = model.embed(one), model.embed(other)
    assert torch.equal(x_one[:, 4:], x_other[:, 4:])
    assert not torch.allclose(x_one[:, 1:4], x_other[:, 1:4])


def test_every_parameter_is_trained_by_exactly_one_optimizer_with_smear_gate_and_untied_head():
    model = train_gpt.GPT(tiny(smear_gate=1, tie_embeddings=0))
    optimizers = train_gpt.build_optimizers(model, tiny(smear_gate=1, tie_embeddings=0), cpu_runtime())
    trained = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(trained) == sorted(id(p) for p in model.parameters())
    scalars = optimizers[1].param_groups[0]["params"]  # AdamW with SCALAR_LR: the gate is a control tensor
    assert any(p is model.smear_gate for p in scalars) and any(p is model.smear_lambda for p in scalars)


def test_smear_gate_without_the_bos_mask_also_smears_into_a_documents_first_token():
    """SMEAR_BOS_MASK=0, the 1.0714 record's gate: the BOS position also adds a share of the previous token."""
    model = perturbed_model(tiny(smear_gate=1, smear_bos_mask=0))
    ids = torch.tensor([[train_gpt.BOS_ID, 5, 6, 7, train_gpt.BOS_ID, 20, 21]])
    with torch.no_grad():
        e = model.tok_emb(ids)
        gate = torch.sigmoid((e[:, 1:, :12] * model.smear_gate[0]).sum(-1, keepdim=True))
        expected = torch.cat((e[:, :1], e[:, 1:] + model.smear_lambda.item() * gate * e[:, :-1]), dim=1)
        assert torch.allclose(model.embed(ids), F.rms_norm(expected, (64,)), atol=1e-6)
        masked = perturbed_model(tiny(smear_gate=1)).embed(ids)
    assert not torch.allclose(model.embed(ids)[:, 4], masked[:, 4])
