"""AL / CS losses against hand computation on a 2-layer toy, and the adaptive λ_cs schedule."""

import math

import pytest
import torch

from blockffn.train.lambda_scheduler import AdaptiveLambda
from blockffn.train.losses import activation_locality_loss, chunk_ids, chunk_sparsity_loss

# 2 layers, 1 row of 6 tokens, 3 experts.  Documents: tokens 0-3 are doc A, 4-5 doc B.
A0 = [torch.tensor([[[0.02, -0.01, 0.00], [0.01, 0.03, -0.02], [-0.01, 0.02, 0.01], [0.03, 0.00, -0.03],
                     [0.01, 0.01, 0.01], [-0.02, 0.04, 0.00]]]),
      torch.tensor([[[0.00, 0.05, -0.01], [0.02, -0.02, 0.02], [0.01, 0.01, -0.01], [-0.03, 0.02, 0.04],
                     [0.02, -0.01, 0.00], [0.01, 0.03, -0.02]]])]
DOC_POS = torch.tensor([[0, 1, 2, 3, 0, 1]])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_activation_locality_by_hand():
    alpha = 100.0
    per_layer = []
    for a in A0:
        a = a[0].tolist()
        terms = []
        for t in range(1, 6):
            if DOC_POS[0, t] == 0:
                continue  # pair crosses a document boundary
            for e in range(3):
                x, y = alpha * a[t - 1][e], sigmoid(alpha * a[t][e])
                # BCE-with-logits written out: -(y log σ(x) + (1-y) log(1-σ(x)))
                terms.append(-(y * math.log(sigmoid(x)) + (1 - y) * math.log(1 - sigmoid(x))))
        per_layer.append(sum(terms) / len(terms))
    expected = sum(per_layer) / 2
    got = activation_locality_loss(A0, DOC_POS, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # gradient flows through both the input (t-1) and the target (t) side
    a = [x.clone().requires_grad_() for x in A0]
    activation_locality_loss(a, DOC_POS).backward()
    assert a[0].grad[0, 0].abs().sum() > 0 and a[0].grad[0, 3].abs().sum() > 0


@pytest.mark.parametrize("chunk", [2, 3])
def test_chunk_sparsification_by_hand(chunk):
    per_layer = []
    for a in A0:
        rows = a[0].tolist()
        p = []
        for r in rows:
            relu = [max(v, 0.0) for v in r]
            s = sum(relu) + 1e-5
            p.append([v / s for v in relu])
        # chunks aligned to each document start: doc A = tokens 0..3, doc B = 4..5
        chunks = []
        for doc in ([0, 1, 2, 3], [4, 5]):
            for i in range(0, len(doc), chunk):
                chunks.append(doc[i:i + chunk])
        vals = []
        for c in chunks:
            for e in range(3):
                log_sum = sum(math.log(1 - p[t][e] + 1e-5) for t in c)
                vals.append(1 - math.exp(log_sum))
        per_layer.append(sum(vals) / len(vals))
    expected = sum(per_layer) / 2
    assert chunk_sparsity_loss(A0, DOC_POS, chunk).item() == pytest.approx(expected, rel=1e-5)


def test_chunks_never_straddle_documents_or_rows():
    doc_pos = torch.tensor([[5, 6, 7, 0, 1, 2], [2, 3, 4, 5, 0, 1]])
    ids, n = chunk_ids(doc_pos, 4)
    # row 0: [5,6,7] continue a chunk that started at pos 4 -> one chunk; new doc at 0 -> chunk [0,1,2]
    # row 1: pos 2,3 -> chunk; pos 4,5 -> new chunk (4 % 4 == 0); new doc -> chunk
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 4, 4]] and n == 5


def test_cs_padding_mask_removes_tokens():
    mask = torch.tensor([[True, True, True, True, True, False]])
    full = chunk_sparsity_loss(A0, DOC_POS, 2)
    masked = chunk_sparsity_loss(A0, DOC_POS, 2, token_mask=mask)
    assert masked < full


def test_lambda_schedule_follows_the_documented_rule():
    sched = AdaptiveLambda(0.05, stable_steps=4, adjust_every=2)
    values = [sched.step(v) for v in [1.0, 1.0, 1.0, 1.0]]
    assert values == [0.05] * 4  # stable phase (first adjustment decision at step 4: γ = 1 -> stays)
    # rising loss: γ = 2.0 / 1.0 -> target = max(1.025, 2.0)·λ = 0.1, ramped linearly over 2 steps
    values = [sched.step(v) for v in [2.0, 2.0]]
    assert values[0] == pytest.approx(0.05) and values[1] == pytest.approx(0.05)
    assert sched.step(2.0) == pytest.approx(0.075)  # half-way through the ramp
    assert sched.step(2.0) == pytest.approx(0.1)
    # falling loss: γ = 1.0 / 2.0 -> λ halves
    for v in [1.0, 1.0]:
        sched.step(v)
    assert sched.step(1.0) == pytest.approx(0.1 * 0.75)
    assert sched.step(1.0) == pytest.approx(0.05)


def test_lambda_small_rise_uses_min_factor_and_cap():
    sched = AdaptiveLambda(1.0, stable_steps=2, adjust_every=1, max_factor=4.0)
    sched.step(1.0)
    sched.step(1.001)  # γ slightly > 1 -> factor 1.025
    assert sched.step(1.001) == pytest.approx(1.025)
    for _ in range(200):  # a loss that keeps doubling is capped at 4·λ0
        sched.step(sched.history[-1] * 2)
    assert sched.value == pytest.approx(4.0)


def test_lambda_state_round_trip():
    a = AdaptiveLambda(0.05, stable_steps=3, adjust_every=2)
    for v in [1, 2, 3, 4, 5]:
        a.step(v)
    b = AdaptiveLambda(0.05, stable_steps=3, adjust_every=2)
    b.load_state_dict(a.state_dict())
    assert [a.step(6), a.step(7)] == [b.step(6), b.step(7)]
