"""The Muon + AdamW hybrid and SOAP: the split of parameters, one optimizer to the Trainer's
scheduler, a step equal to the two halves stepped apart, and state that saves and loads."""

from __future__ import annotations

import copy

import pytest
import torch
from models import tiny_bert, tiny_llama_config

from curvature.optim import build_optimizer
from curvature.optim.hybrid import Combined, MuonAdamW, muon_split


def _bert():
    return tiny_bert(vocab_size=40, num_labels=3)


def _batch():
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, 40, (4, 10), generator=g),
        "labels": torch.randint(0, 3, (4,), generator=g),
    }


def test_split_puts_hidden_matrices_on_muon_and_the_rest_on_adamw():
    model = _bert()
    muon, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for p in muon)
    # every attention/FFN/pooler matrix, nothing else
    assert all(n.endswith(".weight") for n in muon_names)
    assert len(muon_names) == 2 * 6 + 1  # q, k, v, o, ffn in, ffn out per layer + pooler
    assert not any("embeddings" in n or "classifier" in n or "LayerNorm" in n for n in muon_names)
    assert {id(p) for p in muon}.isdisjoint({id(p) for p in rest})
    assert len(muon) + len(rest) == len(list(model.parameters()))


def test_tied_embedding_stays_on_adamw():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(50, tie_word_embeddings=True))
    muon, rest = muon_split(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p is not model.lm_head.weight for p in muon)
    assert any(p is model.lm_head.weight for p in rest)


def test_one_step_equals_the_two_halves_stepped_apart():
    model = _bert().eval()  # no dropout: both models see the same function
    twin = copy.deepcopy(model)
    opt = build_optimizer("muon", model, lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, Combined)
    muon, rest = muon_split(twin)
    ref_muon = torch.optim.Muon(muon, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for m, opts in ((model, [opt]), (twin, [ref_muon, ref_adam])):
            for o in opts:
                o.zero_grad()
            m(**_batch()).loss.backward()
            for o in opts:
                o.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_scheduler_drives_both_halves_and_state_round_trips():
    model = _bert()
    opt = MuonAdamW(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    model(**_batch()).loss.backward()
    opt.step()
    sched.step()
    assert {g["lr"] for g in opt.param_groups} == {5e-3}
    assert [type(o).__name__ for o in opt.optimizers] == ["Muon", "AdamW"]
    state = opt.state_dict()
    other = MuonAdamW(copy.deepcopy(model), lr=1e-2)
    other.load_state_dict(state)
    for a, b in zip(opt.optimizers, other.optimizers):
        for sa, sb in zip(a.state.values(), b.state.values()):
            for k in sa:
                torch.testing.assert_close(sa[k], sb[k])
    with pytest.raises(ValueError, match="2 optimizers"):
        Combined([torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1)]).load_state_dict(
            state
        )


@pytest.mark.parametrize("name", ["muon", "soap"])
def test_trains_a_small_classifier(name):
    model = _bert().eval()  # no dropout: a deterministic loss to compare
    opt = build_optimizer(name, model, lr=1e-2)
    batch = _batch()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_keyword_named():
    with pytest.raises(ValueError, match="did you mean 'momentum'"):
        build_optimizer("muon", _bert(), lr=1e-3, momentun=0.9)
    with pytest.raises(ValueError, match="optimizer soap: unexpected keyword 'precondition_freq'"):
        build_optimizer("soap", _bert(), lr=1e-3, precondition_freq=3)
