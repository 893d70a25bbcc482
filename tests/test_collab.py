"""MF, the projections and the InfoNCE alignment loss against direct formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sellarec.model.bundle import PROJ_C, PROJ_W, load_projections, with_prefix, without_prefix
from sellarec.model.collab import (
    CollabProjector,
    MatrixFactorization,
    Projections,
    SemanticProjector,
    fold_in,
    fold_in_labelled,
    info_nce,
    soft_vectors,
)


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


def _labelled_problem(seed: int, n: int = 60, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items, true_user = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    labels = torch.bernoulli(torch.sigmoid(items @ true_user), generator=g)
    return items, labels, true_user


def test_labelled_fold_in_without_interactions_is_the_prior():
    prior = torch.randn(8)
    assert torch.equal(fold_in_labelled(torch.zeros(0, 8), torch.zeros(0), prior), prior)


def test_labelled_fold_in_matches_scipy_on_the_regularised_logistic_objective():
    """The same objective minimised by SciPy's L-BFGS: MF's BCE on <u, v_i>, L2 to the prior."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    items, labels, _ = _labelled_problem(0)
    prior = 0.3 * torch.randn(8, generator=torch.Generator().manual_seed(5))
    reg = 2.0
    v, y, mu = items.double().numpy(), labels.double().numpy(), prior.double().numpy()

    def objective(u):
        x = v @ u
        value = (np.logaddexp(0.0, x) - y * x).sum() + 0.5 * reg * ((u - mu) ** 2).sum()
        grad = v.T @ (1 / (1 + np.exp(-x)) - y) + reg * (u - mu)
        return value, grad

    reference = scipy_optimize.minimize(objective, mu, jac=True, method="L-BFGS-B", tol=1e-14).x
    folded = fold_in_labelled(items, labels, prior, reg=reg)
    np.testing.assert_allclose(folded.double().numpy(), reference, atol=1e-5)
    # MF's own loss (mean BCE) plus the prior term has zero gradient there as well.
    u = folded.double().clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(items.double() @ u, labels.double(), reduction="sum")
    (loss + 0.5 * reg * (u - prior.double()).square().sum()).backward()
    assert u.grad.abs().max() < 1e-4


def test_labelled_fold_in_is_pulled_to_the_prior_and_stays_finite_on_separable_labels():
    items, labels, true_user = _labelled_problem(1)
    prior = torch.zeros(8)
    strong = fold_in_labelled(items, labels, prior, reg=1e6)
    assert strong.abs().max() < 1e-3
    separable = (items @ true_user > 0).float()  # unregularised logistic regression diverges here
    folded = fold_in_labelled(items, separable, prior, reg=1e-3)
    assert torch.isfinite(folded).all()
    assert torch.nn.functional.cosine_similarity(folded, true_user, dim=0) > 0.9
    assert torch.equal(folded, fold_in_labelled(items, separable, prior, reg=1e-3))  # deterministic


def test_labelled_fold_in_recovers_a_user_better_than_positives_only():
    """Negatives say which way the user does not lean: the positives alone cannot."""
    items, labels, true_user = _labelled_problem(2, n=400)
    prior = torch.zeros(8)
    cos = torch.nn.functional.cosine_similarity
    labelled = fold_in_labelled(items, labels, prior, reg=1.0)
    liked = fold_in(items[labels == 1], prior, reg=1.0, target=1.0)
    assert cos(labelled, true_user, dim=0) > 0.95
    assert cos(labelled, true_user, dim=0) > cos(liked, true_user, dim=0)
    with pytest.raises(ValueError):
        fold_in_labelled(items, labels[:-1], prior)


def test_soft_vectors_put_each_projection_in_its_slot_and_zeros_elsewhere():
    proj_c, proj_w = CollabProjector(4, 6, hidden=5), SemanticProjector(6)
    user, item, semantic = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 6)
    out = soft_vectors(proj_c, proj_w, 6, user, item, semantic, 3)
    assert out.shape == (3, 3, 6)
    torch.testing.assert_close(out[:, 0], proj_c(user))
    torch.testing.assert_close(out[:, 1], proj_c(item))
    torch.testing.assert_close(out[:, 2], proj_w(semantic))
    only_user = soft_vectors(proj_c, None, 6, user, None, semantic, 3)  # no Proj W->L: warm stays 0
    assert torch.equal(only_user[:, 1:], torch.zeros(3, 2, 6))
    assert torch.equal(soft_vectors(None, None, 6, user, item, semantic, 3), torch.zeros(3, 3, 6))


def test_soft_vectors_let_stage_3_train_the_projections():
    proj_c = CollabProjector(4, 6, hidden=5)
    soft_vectors(proj_c, None, 6, torch.randn(2, 4), None, None, 2).square().sum().backward()
    assert proj_c.net[0].weight.grad is not None and proj_c.net[0].weight.grad.abs().sum() > 0


def test_projections_round_trip_through_bundle_tensors():
    """Stored with their prefixes, rebuilt by the one loader: same outputs, pinned norm kept,
    frozen; a projection that was not stored is None and its soft tokens are zeros."""
    proj_c, proj_w = CollabProjector(4, 6, hidden=5, out_norm=2.5), SemanticProjector(6)
    tensors = with_prefix(PROJ_C, proj_c.state_dict()) | with_prefix(PROJ_W, proj_w.state_dict())
    assert without_prefix(tensors, PROJ_C).keys() == proj_c.state_dict().keys()
    loaded = load_projections(tensors, 6)
    x, w = torch.randn(3, 4), torch.randn(3, 6)
    torch.testing.assert_close(loaded.proj_c(x), proj_c(x))
    torch.testing.assert_close(loaded.proj_w(w), proj_w(w))
    assert loaded.proj_c(x).norm(dim=-1) == pytest.approx([2.5] * 3, rel=1e-5)
    assert not any(p.requires_grad for p in loaded.proj_c.parameters()) and not loaded.proj_c.training
    only_c = load_projections(with_prefix(PROJ_C, proj_c.state_dict()), 6)
    assert only_c.uses_collab and not only_c.uses_semantic
    none = load_projections({}, 6)
    assert isinstance(none, Projections) and none.proj_c is None and none.proj_w is None
    assert torch.equal(none.soft_vectors(x, x, w, 3), torch.zeros(3, 3, 6))


def test_fold_in_without_collaborative_vectors_is_empty():
    """A variant with no MF side (TALLRec, SeLLa-Rec without <User_ID>) stores empty vectors."""
    empty = torch.zeros(0)
    assert fold_in(torch.zeros(3, 0), empty).shape == (0,)
    assert fold_in_labelled(torch.zeros(3, 0), torch.tensor([1, 0, 1]), empty).shape == (0,)
