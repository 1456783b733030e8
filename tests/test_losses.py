"""Tests for tunelab.objectives.losses.

TRL (test-only dependency) is the oracle where it exposes the maths; TRL 1.16 keeps most losses inside
trainer methods, so those are called unbound on small stand-in objects carrying only what they read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.objectives.losses import (
    bradley_terry_loss,
    chunked_cross_entropy,
    distill_loss,
    dpo_loss,
    entropy_from_logits,
    kto_loss,
    mlm_mask,
    orpo_loss,
    sequence_logprobs,
    token_logprobs,
)

torch.manual_seed(0)
F64 = torch.float64


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------------
# TRL stand-ins
# ------------------------------------------------------------------------------------------------


class _FakeModel:
    """Stands in for a model: returns fixed outputs whatever it is called with."""

    def __init__(self, outputs):
        self.outputs, self.training = outputs, True

    def __call__(self, **kwargs):
        return self.outputs


def _accelerator():
    ident = lambda x: x  # noqa: E731  single process: gather is the identity
    return SimpleNamespace(device=torch.device("cpu"), gather=ident, gather_for_metrics=ident)


def _trl_dpo(loss_type, beta, pc, pr, rc, rr, len_c, len_r):
    """Run TRL 1.16 DPOTrainer._compute_loss (the only place its DPO maths lives) one pair at a time.

    A fake model returns per-token log-probs whose row sums are the given sequence log-probs, placed on
    `len` completion tokens, and the reference log-probs come in precomputed; everything after that is
    TRL's own code. TRL returns the batch mean, so one pair per call yields per-pair losses; rewards are
    read from its metrics.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    losses, chosen_rewards, rejected_rewards = [], [], []
    for i in range(len(pc)):
        lc, lr = int(len_c[i]), int(len_r[i])
        T = max(lc, lr) + 2
        completion_mask = torch.zeros(2, T, dtype=torch.long)
        completion_mask[0, 1:1 + lc] = 1
        completion_mask[1, 1:1 + lr] = 1
        per_token = torch.zeros(2, T - 1, dtype=F64)
        per_token[0, :lc] = pc[i] / lc
        per_token[1, :lr] = pr[i] / lr
        out = SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros(2, T - 1, dtype=F64),
            mean_logits=torch.zeros(2, T - 1, dtype=F64),
            is_top1=torch.zeros(2, T - 1, dtype=torch.bool),
        )
        model = _FakeModel(out)
        stub = SimpleNamespace(
            model=model, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
            beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
            _total_train_tokens=0, _tp_size=1,
        )
        inputs = {
            "input_ids": torch.zeros(2, T, dtype=torch.long),
            "attention_mask": torch.ones(2, T, dtype=torch.long),
            "completion_mask": completion_mask,
            "ref_chosen_logps": rc[i:i + 1],
            "ref_rejected_logps": rr[i:i + 1],
        }
        losses.append(DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False).item())
        chosen_rewards.append(stub._metrics["train"]["rewards/chosen"][0])
        rejected_rewards.append(stub._metrics["train"]["rewards/rejected"][0])
    return torch.tensor(losses, dtype=F64), torch.tensor(chosen_rewards, dtype=F64), torch.tensor(rejected_rewards, dtype=F64)


def _trl_cpo_loss(loss_type, beta, chosen, rejected, label_smoothing=0.0, simpo_gamma=0.5):
    """TRL CPOTrainer.cpo_loss (unbound; it reads only these attributes)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    stub = SimpleNamespace(
        alpha=0.0, accelerator=_accelerator(), loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
    )
    return CPOTrainer.cpo_loss(stub, chosen, rejected)


def _pref_batch(n=8):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-50 * torch.rand(n, generator=g, dtype=F64) - 1 for _ in range(4))
    len_c = torch.randint(1, 40, (n,), generator=g)
    len_r = torch.randint(1, 40, (n,), generator=g)
    return pc, pr, rc, rr, len_c, len_r


# ------------------------------------------------------------------------------------------------
# Preference losses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(beta):
    pc, pr, rc, rr, lc, lr = _pref_batch()
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
    t_losses, t_cr, t_rj = _trl_dpo("sigmoid", beta, pc, pr, rc, rr, lc, lr)
    _close(losses, t_losses)
    _close(cr, t_cr)
    _close(rj, t_rj)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl_length_averaged(beta):
    pc, pr, rc, rr, lc, lr = _pref_batch()
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_len=lc, rejected_len=lr)
    t_losses, t_cr, t_rj = _trl_dpo("ipo", beta, pc, pr, rc, rr, lc, lr)
    _close(losses, t_losses)
    _close(cr, t_cr)
    _close(rj, t_rj)
    # and it is really the length-averaged form, not the summed one
    summed, *_ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_len=torch.ones(8), rejected_len=torch.ones(8))
    assert not torch.allclose(summed, losses)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_label_smoothing(eps):
    # TRL 1.16's DPO sigmoid loss no longer takes label smoothing, so two oracles: CPOTrainer.cpo_loss's sigmoid
    # loss (same conservative formula on a log-prob gap; feeding it the log-ratios gives cDPO), and plain math.
    pc, pr, rc, rr, *_ = _pref_batch()
    beta = 0.2
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="label_smoothing", label_smoothing=eps)
    t_losses, _, _ = _trl_cpo_loss("sigmoid", beta, pc - rc, pr - rr, label_smoothing=eps)
    _close(losses, t_losses)
    for i in range(len(pc)):
        h = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        _close(losses[i], -(1 - eps) * log_sig(h) - eps * log_sig(-h))
    _close(cr, beta * (pc - rc))
    _close(rj, beta * (pr - rr))
    sig, *_ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=eps)
    _close(sig, losses)


@pytest.mark.parametrize("gamma,eps", [(0.5, 0.0), (1.4, 0.0), (0.5, 0.2)])
def test_simpo_matches_trl_cpo(gamma, eps):
    pc, pr, _, _, lc, lr = _pref_batch()
    beta = 2.0
    losses, cr, rj = dpo_loss(
        pc, pr, None, None, beta=beta, loss_type="simpo", gamma=gamma, label_smoothing=eps, chosen_len=lc, rejected_len=lr
    )
    # TRL's CPOTrainer feeds cpo_loss length-averaged log-probs for simpo (average_log_prob=True)
    t_losses, t_cr, t_rj = _trl_cpo_loss("simpo", beta, pc / lc, pr / lr, label_smoothing=eps, simpo_gamma=gamma)
    _close(losses, t_losses)
    _close(cr, t_cr)
    _close(rj, t_rj)
    # paper form: -log sigma(beta/|y_w| log pi_w - beta/|y_l| log pi_l - gamma)
    if eps == 0.0:
        i = 3
        x = beta * pc[i].item() / lc[i].item() - beta * pr[i].item() / lr[i].item() - gamma
        _close(losses[i], math.log1p(math.exp(-x)))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
    """The odds-ratio term equals TRL ORPOTrainer.odds_ratio_loss on the same length-averaged log-probs (both
    sides of log1mexp's -ln 2 branch occur), and the SFT term is the chosen response's per-token NLL."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, lc, lr = _pref_batch()
    avg_c, avg_r = pc / lc, pr / lr
    assert (avg_c > -math.log(2)).any() and (avg_c < -math.log(2)).any()
    losses, log_odds, ratio = orpo_loss(avg_c, avg_r, beta=beta)
    stub = SimpleNamespace(beta=beta, accelerator=_accelerator())
    t_losses, _, _, t_ratio_mean, t_log_odds_mean = ORPOTrainer.odds_ratio_loss(stub, avg_c, avg_r)
    _close(losses, -avg_c - t_losses)  # TRL: loss = nll - mean(beta * log sigma(log_odds))
    _close(ratio.mean(), t_ratio_mean)
    _close(log_odds.mean(), t_log_odds_mean)
    i = 2  # closed form: odds = p / (1 - p)
    p_c, p_r = math.exp(avg_c[i].item()), math.exp(avg_r[i].item())
    odds = (p_c / (1 - p_c)) / (p_r / (1 - p_r))
    _close(losses[i], -avg_c[i].item() - beta * math.log(odds / (1 + odds)))


def _trl_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, dw, uw):
    """TRL 1.16 KTOTrainer._compute_loss on a fake model whose per-token log-probs sum to the given sequence
    log-probs (main rows) and KL log-probs (the mismatched rows), with the reference log-probs precomputed."""
    from trl.trainer.kto_trainer import KTOTrainer

    n, T = len(logps), 4
    main_ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)

    def outputs(seq):
        per_token = torch.zeros(n, T - 1, dtype=F64)
        per_token[:, 0] = seq
        zeros = torch.zeros(n, T - 1, dtype=F64)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    class Model:
        training = True

        def __call__(self, input_ids, **kwargs):
            return outputs(kl_logps if input_ids is kl_ids else logps)

    stub = SimpleNamespace(
        model=Model(), accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=dw, undesirable_weight=uw,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
    mask = torch.ones(n, T, dtype=torch.long)
    inputs = {"input_ids": main_ids, "attention_mask": mask, "completion_mask": mask, "label": labels,
              "KL_input_ids": kl_ids, "KL_attention_mask": mask, "KL_completion_mask": mask,
              "ref_logps": ref_logps, "ref_KL_logps": ref_kl_logps}
    loss = KTOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
    return loss, stub._metrics["train"]["kl"][0]


@pytest.mark.parametrize("beta,dw,uw,kl_shift", [(0.1, 1.0, 1.0, 2.0), (0.5, 1.33, 1.0, 2.0), (0.1, 1.0, 1.0, -5.0)])
def test_kto_matches_trl(beta, dw, uw, kl_shift):
    """Per-example KTO losses averaged over the batch equal TRL's KTOTrainer loss, with the KL reference point
    computed as TRL does (mean over the mismatched rows, clamped at 0: kl_shift -5 makes it negative)."""
    pc, pr, rc, rr, *_ = _pref_batch(6)
    logps, ref_logps = pc, rc
    kl_logps, ref_kl_logps = pr, pr - kl_shift + 0.1 * rr
    labels = torch.tensor([True, False, True, True, False, False])
    kl = (kl_logps - ref_kl_logps).mean().clamp(min=0)
    losses, rewards = kto_loss(logps, ref_logps, labels, kl, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    t_loss, t_kl = _trl_kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta, dw, uw)
    _close(losses.mean(), t_loss)
    _close(kl, t_kl)
    assert (kl == 0) == (kl_shift < 0)
    _close(rewards, beta * (logps - ref_logps))
    i = 1  # undesirable, closed form
    _close(losses[i], uw * (1 - 1 / (1 + math.exp(-beta * (kl.item() - (logps[i] - ref_logps[i]).item())))))


def test_dpo_unknown_type_and_gradients():
    pc, pr, rc, rr, *_ = _pref_batch(4)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    pc = pc.clone().requires_grad_()
    losses, cr, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all()  # lowering the loss means raising the chosen log-prob
    assert not cr.requires_grad


def test_bradley_terry_matches_trl_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(2)
    rc, rr, margin = (3 * torch.randn(6, generator=g, dtype=F64) for _ in range(3))
    ours = bradley_terry_loss(rc, rr, margin)
    ours_no_margin = bradley_terry_loss(rc, rr)
    for i in range(6):
        for m in (margin[i:i + 1], None):
            logits = torch.stack([rc[i:i + 1], rr[i:i + 1]]).view(2, 1)
            out = SimpleNamespace(logits=logits)
            model = _FakeModel(out)
            stub = SimpleNamespace(
                model=model, accelerator=_accelerator(), args=SimpleNamespace(center_rewards_coefficient=None),
                _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
            )
            inputs = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
            if m is not None:
                inputs["margin"] = m
            trl_loss = RewardTrainer.compute_loss(stub, model, inputs)
            _close(ours[i] if m is not None else ours_no_margin[i], trl_loss)
    # stable for huge gaps (logsigmoid, not log(sigmoid))
    big = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    _close(big, [400.0], tol=1e-4)


# ------------------------------------------------------------------------------------------------
# Token log-probs, entropy, chunked CE
# ------------------------------------------------------------------------------------------------


def _labels(B, T, V, g):
    labels = torch.randint(V, (B, T), generator=g)
    labels[:, :3] = -100
    labels[0, -4:] = -100
    return labels


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_token_logprobs_matches_trl_and_naive(chunk):
    from trl.trainer.utils import selective_log_softmax

    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 17, 50
    logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    labels = _labels(B, T, V, g)
    lp = token_logprobs(logits, labels, chunk_size=chunk, temperature=0.7)
    tgt = labels[:, 1:]
    ref = selective_log_softmax(logits[:, :-1], tgt.clamp(min=0), temperature=0.7) * (tgt != -100)
    _close(lp, ref, tol=1e-10)
    assert (lp[tgt == -100] == 0).all()
    w = torch.randn(B, T - 1, generator=g, dtype=F64)
    (g1,) = torch.autograd.grad((lp * w).sum(), logits)
    (g2,) = torch.autograd.grad((ref * w).sum(), logits)
    _close(g1, g2, tol=1e-10)


def test_token_logprobs_bf16_returns_fp32_and_sequence_logprobs_matches_trl():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(4)
    B, T, V = 4, 12, 30
    logits = torch.randn(B, T, V, generator=g)
    labels = _labels(B, T, V, g)
    s, n = sequence_logprobs(logits, labels, chunk_size=4)
    _close(s, CPOTrainer.get_batch_logps(logits, labels.clone()), tol=1e-5)
    _close(n, (labels[:, 1:] != -100).sum(-1))
    lp16 = token_logprobs(logits.bfloat16(), labels)
    assert lp16.dtype == torch.float32
    x = logits.bfloat16().requires_grad_()
    token_logprobs(x, labels).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and (x.grad[:, -1] == 0).all()


def test_entropy_matches_trl():
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 9, 40, generator=g, dtype=F64)
    mask = torch.rand(3, 9, generator=g) > 0.3
    ent = entropy_from_logits(logits, mask, chunk_size=4)
    _close(ent, trl_entropy(logits) * mask, tol=1e-10)
    uniform = entropy_from_logits(torch.zeros(1, 2, 16))
    _close(uniform, torch.full((1, 2), math.log(16)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-10)])
@pytest.mark.parametrize("use_bias", [False, True])
def test_chunked_cross_entropy_equals_full_ce_and_grads(dtype, tol, use_bias):
    g = torch.Generator().manual_seed(6)
    B, T, H, V = 3, 21, 16, 97
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=g, dtype=dtype)).requires_grad_() if use_bias else None
    labels = _labels(B, T, V, g)
    logits = F.linear(hidden, weight, bias)[:, :-1]
    labels[:, 1::2] = logits[:, ::2].argmax(-1)  # every other target is the model's top token: accuracy near 1/2
    labels[2, 5:9] = -100  # a hole in the middle

    loss, n, correct = chunked_cross_entropy(hidden, weight, labels, chunk_size=7, bias=bias)
    ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum", ignore_index=-100)
    target = labels[:, 1:]
    assert int(n) == int((target != -100).sum())
    assert correct.dtype == torch.long and not correct.requires_grad
    assert int(correct) == int((logits.argmax(-1) == target)[target != -100].sum()) > int(n) // 3
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)

    params = [hidden, weight] + ([bias] if use_bias else [])
    ours = torch.autograd.grad(2.5 * loss, params)
    full = torch.autograd.grad(2.5 * ref, params)
    for a, b in zip(ours, full):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_chunked_cross_entropy_softcap_frozen_head_and_no_grad():
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 2, 11, 8, 33
    hidden = torch.randn(B, T, H, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=F64)  # frozen head (LoRA): no weight grad computed
    labels = _labels(B, T, V, g)
    cap = 3.0
    logits = cap * torch.tanh(F.linear(hidden, weight)[:, :-1] / cap)
    labels[:, 1::2] = logits[:, ::2].argmax(-1)
    loss, _, correct = chunked_cross_entropy(hidden, weight, labels, chunk_size=4, softcap=cap)
    assert int(correct) == int((logits.argmax(-1) == labels[:, 1:]).sum()) > 0
    ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    _close(loss, ref, tol=1e-10)
    _close(torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(ref, hidden)[0], tol=1e-10)
    with torch.no_grad():
        l2, _, c2 = chunked_cross_entropy(hidden, weight, labels, chunk_size=4, softcap=cap)
    _close(l2, ref, tol=1e-10)
    assert int(c2) == int(correct)
    empty = torch.full_like(labels, -100)
    l3, n3, c3 = chunked_cross_entropy(hidden, weight, empty)
    assert l3.item() == 0.0 and int(n3) == 0 and int(c3) == 0
    assert torch.autograd.grad(l3, hidden)[0].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# Distillation
# ------------------------------------------------------------------------------------------------


def _softmax(row, tau):
    m = max(row)
    e = [math.exp((x - m) / tau) for x in row]
    return [x / sum(e) for x in e]


def _kl_py(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_distill_closed_form():
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 3, 5, generator=g, dtype=F64)
    t = torch.randn(2, 3, 5, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    tau, beta = 2.0, 0.3
    fwd = rev = jsd = 0.0
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            ps, pt = _softmax(s[b, i].tolist(), tau), _softmax(t[b, i].tolist(), tau)
            fwd += _kl_py(pt, ps)
            rev += _kl_py(ps, pt)
            m = [beta * a + (1 - beta) * c for a, c in zip(pt, ps)]
            jsd += beta * _kl_py(pt, m) + (1 - beta) * _kl_py(ps, m)
    for kind, want in (("forward_kl", fwd), ("reverse_kl", rev), ("jsd", jsd)):
        got, n = distill_loss(s, t, mask, kind=kind, temperature=tau, beta=beta, chunk_size=2)
        _close(got, tau**2 * want, tol=1e-10)
        assert int(n) == 4
    assert abs(fwd - rev) > 1e-3  # forward and reverse KL differ
    # generalised JSD: JSD_beta(teacher, student) == JSD_(1-beta)(student, teacher); symmetric only at 0.5
    a, _ = distill_loss(s, t, mask, kind="jsd", temperature=tau, beta=beta)
    b, _ = distill_loss(t, s, mask, kind="jsd", temperature=tau, beta=1 - beta)
    c, _ = distill_loss(t, s, mask, kind="jsd", temperature=tau, beta=beta)
    _close(a, b, tol=1e-10)
    assert abs(float(a - c)) > 1e-4
    h1, _ = distill_loss(s, t, mask, kind="jsd", beta=0.5)
    h2, _ = distill_loss(t, s, mask, kind="jsd", beta=0.5)
    _close(h1, h2, tol=1e-10)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        zero, _ = distill_loss(s, s.clone(), mask, kind=kind, temperature=tau)
        _close(zero, 0.0, tol=1e-12)
    with pytest.raises(ValueError):
        distill_loss(s, t, mask, kind="tvd")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_distill_jsd_matches_trl_gkd(beta, tau):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, 6, 11, generator=g, dtype=F64)
    t = torch.randn(2, 6, 11, generator=g, dtype=F64)
    labels = torch.randint(11, (2, 6), generator=g)
    labels[0, :2] = -100
    ours, _ = distill_loss(s, t, labels != -100, kind="jsd", temperature=tau, beta=beta, chunk_size=3)
    trl = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=tau, reduction="sum")
    _close(ours, tau**2 * trl, tol=1e-10)  # TRL applies no tau^2
    # TRL's endpoints: beta = 0 is forward KL, beta = 1 reverse KL
    if beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
        _close(ours, distill_loss(s, t, labels != -100, kind=kind, temperature=tau)[0], tol=1e-12)


def test_distill_gradients_chunked_equal_unchunked():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(3, 8, 13, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(3, 8, 13, generator=g, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 8, generator=g) > 0.25
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        a, _ = distill_loss(s, t, mask, kind=kind, temperature=1.5, chunk_size=2)
        b, _ = distill_loss(s, t, mask, kind=kind, temperature=1.5, chunk_size=10_000)
        ga = torch.autograd.grad(a, s)[0]
        gb = torch.autograd.grad(b, s)[0]
        _close(a, b, tol=1e-12)
        _close(ga, gb, tol=1e-12)
        assert ga[~mask].abs().sum() == 0 and ga[mask].abs().sum() > 0
    a, _ = distill_loss(s, t, mask, kind="forward_kl")
    a.backward()
    assert t.grad is None  # teacher is a constant


# ------------------------------------------------------------------------------------------------
# MLM masking
# ------------------------------------------------------------------------------------------------

MASK_ID, VOCAB = 4, 30_000


def _mlm_batch(g, B=200, T=1000):
    ids = torch.randint(10, VOCAB, (B, T), generator=g)
    special = torch.rand(B, T, generator=g) < 0.1
    ids[special] = 1
    return ids, special


def test_mlm_mask_statistics():
    g = torch.Generator().manual_seed(12)
    ids, special = _mlm_batch(g)  # 200k tokens
    out, labels = mlm_mask(ids, special_mask=special, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g)
    sel = labels != -100
    assert not (sel & special).any()
    assert (out[~sel] == ids[~sel]).all()
    assert (labels[sel] == ids[sel]).all()
    frac = sel.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.005, frac
    n = sel.sum().item()
    masked = (out[sel] == MASK_ID).sum().item() / n
    unchanged = (out[sel] == ids[sel]).sum().item() / n
    randomised = ((out[sel] != MASK_ID) & (out[sel] != ids[sel])).sum().item() / n
    assert abs(masked - 0.8) < 0.01, masked
    assert abs(unchanged - 0.1) < 0.01, unchanged
    assert abs(randomised - 0.1) < 0.01, randomised
    # random replacements are spread over the vocabulary, not one id
    assert out[sel][(out[sel] != MASK_ID) & (out[sel] != ids[sel])].unique().numel() > 1000
    # reproducible with a seeded generator
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = mlm_mask(ids, special_mask=special, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g1)
    b = mlm_mask(ids, special_mask=special, mask_token_id=MASK_ID, vocab_size=VOCAB, generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_mlm_whole_word_masking():
    g = torch.Generator().manual_seed(13)
    B, T = 200, 1000
    ids, _ = _mlm_batch(g, B, T)
    # words of 1-4 tokens; the first token of each row is a special ([CLS]) with word id -1
    lengths = torch.randint(1, 5, (B, T), generator=g)
    word_ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        word_ids[b] = torch.repeat_interleave(torch.arange(T), lengths[b])[:T]
    special = torch.zeros(B, T, dtype=torch.bool)
    special[:, 0] = True
    word_ids[:, 0] = -1
    out, labels = mlm_mask(
        ids, special_mask=special, mask_token_id=MASK_ID, vocab_size=VOCAB, whole_word_ids=word_ids, generator=g
    )
    sel = labels != -100
    assert not sel[:, 0].any()
    # every word is selected entirely or not at all
    key = (torch.arange(B).unsqueeze(1) * (T + 1) + word_ids.clamp(min=0)).flatten()
    keep = ~special.flatten()
    key, s = key[keep], sel.flatten()[keep].long()
    n_tok = torch.zeros(B * (T + 1), dtype=torch.long).index_add_(0, key, torch.ones_like(s))
    n_sel = torch.zeros(B * (T + 1), dtype=torch.long).index_add_(0, key, s)
    present = n_tok > 0
    assert ((n_sel[present] == 0) | (n_sel[present] == n_tok[present])).all()
    assert (n_tok[present] > 1).sum() > 10_000  # multi-token words are actually exercised
    word_frac = (n_sel[present] > 0).float().mean().item()
    assert abs(word_frac - 0.15) < 0.005, word_frac
    tok_frac = sel.sum().item() / (~special).sum().item()
    assert abs(tok_frac - 0.15) < 0.01, tok_frac
    masked = (out[sel] == MASK_ID).float().mean().item()
    assert abs(masked - 0.8) < 0.01, masked
