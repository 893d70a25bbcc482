"""MF, the projections and the InfoNCE alignment loss against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.collab import CollabProjector, MatrixFactorization, SemanticProjector, fold_in, info_nce


def test_info_nce_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    z, s, tau = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), 0.2

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i in range(5):
        sims = [cos(z[i].tolist(), s[j].tolist()) / tau for j in range(5)]
        total += -(sims[i] - math.log(sum(math.exp(v) for v in sims)))
    assert info_nce(z, s, tau).item() == pytest.approx(total / 5, rel=1e-5)


def test_info_nce_is_lower_for_aligned_pairs():
    s = torch.randn(8, 16)
    assert info_nce(s * 3.0, s, 0.1) < info_nce(torch.randn(8, 16), s, 0.1)


def test_mf_logit_is_the_dot_product_and_loss_is_bce():
    mf = MatrixFactorization(4, 6, dim=5)
    u, i, y = torch.tensor([0, 3]), torch.tensor([5, 1]), torch.tensor([1, 0])
    expected = (mf.users.weight[u] * mf.items.weight[i]).sum(-1)
    torch.testing.assert_close(mf(u, i), expected)
    p = torch.sigmoid(expected)
    bce = -(torch.log(p[0]) + torch.log(1 - p[1])) / 2
    torch.testing.assert_close(mf.loss(u, i, y), bce)


def test_projection_shapes_follow_table_1():
    proj = CollabProjector(256, 576)
    layers = list(proj.net)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (256, 1024, 576)
    x = torch.randn(3, 256)
    torch.testing.assert_close(proj(x), layers[2](F.gelu(layers[0](x))))
    w = SemanticProjector(576)
    assert w(torch.randn(2, 576)).shape == (2, 576)


def test_fold_in_without_history_is_the_prior():
    prior = torch.randn(8)
    assert torch.equal(fold_in(torch.zeros(0, 8), prior), prior)


def test_fold_in_solves_the_ridge_problem_pulled_to_the_prior():
    g = torch.Generator().manual_seed(0)
    items, prior = torch.randn(5, 8, generator=g), torch.randn(8, generator=g)
    u = fold_in(items, prior, reg=0.5, target=2.0).double()
    # The gradient of sum (<u, v> - 2)^2 + 0.5 ||u - prior||^2 vanishes at the solution.
    grad = 2 * items.double().T @ (items.double() @ u - 2.0) + 2 * 0.5 * (u - prior.double())
    assert grad.abs().max() < 1e-4


def test_fold_in_recovers_a_user_from_their_liked_items_better_than_the_prior():
    g = torch.Generator().manual_seed(1)
    items, true_user = torch.randn(200, 8, generator=g), torch.randn(8, generator=g)
    liked = items[(items @ true_user) > 1.0]
    prior = torch.randn(8, generator=g)
    folded = fold_in(liked, prior, reg=1.0, target=1.0)
    cos = torch.nn.functional.cosine_similarity
    assert cos(folded, true_user, dim=0) > 0.7 > cos(prior, true_user, dim=0)
