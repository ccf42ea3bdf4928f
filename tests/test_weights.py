"""Importance weights on a toy problem with a known posterior, and the CEI densities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowrecon.evaluation.weights import importance_weights, weighted_coverage, weighted_quantile
from flowrecon.systems.cei.geometry import add_momentum_noise, random_rotations, sample_ocs
from flowrecon.systems.cei.likelihood import (
    momentum_log_likelihood,
    ocs_log_prior,
    posterior_weights,
)
from flowrecon.systems.cei.simulator import asymptotic_momenta


def _normal_logpdf(x, mean, sd):
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))


def test_weights_correct_a_wrong_proposal_on_a_conjugate_gaussian():
    # x ~ N(0, 1), y = x + N(0, s^2): the posterior is N(y / (1 + s^2), s^2 / (1 + s^2)).
    rng = np.random.default_rng(0)
    s, n_events, k = 0.5, 2000, 1000
    x = rng.normal(size=n_events)
    y = x + s * rng.normal(size=n_events)
    post_mean, post_sd = y / (1 + s**2), np.sqrt(s**2 / (1 + s**2))
    # An over-confident, shifted proposal: alone it covers far too little.
    q_mean, q_sd = post_mean + 0.3, 0.8 * post_sd
    samples = q_mean + q_sd * rng.normal(size=(k, n_events))
    log_w = (
        _normal_logpdf(y, samples, s)  # likelihood
        + _normal_logpdf(samples, 0.0, 1.0)  # prior
        - _normal_logpdf(samples, q_mean, q_sd)  # proposal
    )
    w = importance_weights(log_w)
    np.testing.assert_allclose(w.weights.sum(0), 1.0)
    est_mean = (w.weights * samples).sum(0)
    # Monte Carlo error ~ post_sd / sqrt(ESS) ~ 0.04 an event; the proposal is 0.3 off.
    assert np.abs(est_mean - post_mean).mean() < 0.05
    assert np.abs(samples.mean(0) - post_mean).mean() > 0.25
    assert 50 < np.median(w.ess) < k
    raw = np.full((k, n_events), 1.0 / k)
    s3, t3 = samples[:, :, None], x[:, None]
    assert abs(weighted_coverage(s3, w.weights, t3, 0.9) - 0.9) < 0.02
    assert abs(weighted_coverage(s3, w.weights, t3, 0.5) - 0.5) < 0.03
    assert weighted_coverage(s3, raw, t3, 0.9) < 0.8  # the unweighted proposal is not


def test_importance_weights_edge_cases():
    w = importance_weights(np.array([[0.0, -np.inf], [np.log(3.0), -np.inf]]))
    np.testing.assert_allclose(w.weights[:, 0], [0.25, 0.75])
    np.testing.assert_allclose(w.weights[:, 1], [0.5, 0.5])  # no sample survives: uniform
    assert w.ess[1] == 0.0
    big = importance_weights(np.array([[1000.0], [1000.0 + np.log(2)]]))  # no overflow
    np.testing.assert_allclose(big.weights[:, 0], [1 / 3, 2 / 3])
    with pytest.raises(ValueError, match=r"shape \(K, B\)"):
        importance_weights(np.zeros(3))


def test_weighted_quantile_matches_unweighted_for_equal_weights():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(200, 5, 2))
    q = weighted_quantile(s, np.full((200, 5), 1 / 200), [0.5])
    np.testing.assert_allclose(q[0], np.median(s, axis=0), atol=1e-12)
    with pytest.raises(ValueError, match="level must be in"):
        weighted_coverage(s, np.full((200, 5), 1 / 200), s[0], 1.5)


def test_ocs_prior_is_a_normalised_density():
    # Integrate a broad version of the prior against an independent 6-D Gaussian.
    rng = np.random.default_rng(2)
    n, sd = 400_000, 2.0
    r = rng.normal(scale=sd, size=(n, 6))
    x = np.concatenate([np.zeros((n, 3)), r], axis=1)
    log_q = _normal_logpdf(r, 0.0, sd).sum(1)
    integral = np.mean(np.exp(ocs_log_prior(x, bond_sigma=0.3, bend_sigma_deg=30) - log_q))
    assert abs(integral - 1.0) < 0.03


def test_ocs_prior_is_rotation_and_translation_invariant():
    x = sample_ocs(50, torch.Generator().manual_seed(3))
    rot = random_rotations(50, torch.Generator().manual_seed(4))
    xr = (x.reshape(-1, 3, 3) @ rot.transpose(1, 2)).reshape(-1, 9) + 1.5
    np.testing.assert_allclose(ocs_log_prior(xr), ocs_log_prior(x), atol=1e-9)
    linear = np.array([[0.0, 0, 0, -2.19, 0, 0, 2.95, 0, 0]])
    assert np.isfinite(ocs_log_prior(linear)).all()


def test_momentum_likelihood_peaks_at_the_true_geometry():
    g = torch.Generator().manual_seed(5)
    x = sample_ocs(20, g)
    p_obs = add_momentum_noise(asymptotic_momenta(x), 0.01, g)
    shifted = x.clone()
    shifted[:, 3] += 0.05  # stretch one bond
    ll_true = momentum_log_likelihood(x, p_obs, 0.01)
    ll_off = momentum_log_likelihood(shifted, p_obs, 0.01)
    assert (ll_true > ll_off).mean() > 0.9
    both = momentum_log_likelihood(torch.stack([x, shifted]), p_obs, 0.01)
    np.testing.assert_allclose(both, np.stack([ll_true, ll_off]))
    with pytest.raises(ValueError, match="noise > 0"):
        momentum_log_likelihood(x, p_obs, 0.0)
    with pytest.raises(ValueError, match="unknown prior"):
        posterior_weights(x[None].numpy(), p_obs.numpy(), np.zeros((1, 20)), 0.01, prior="x")
