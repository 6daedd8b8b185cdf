"""Tests for simco_jax.losses against a float64 reference value of the paper's loss, an
independent float64 NumPy implementation, and the closed-form gradients of the dual-temperature
loss (Zhang et al., CVPR 2022, arXiv:2203.17248)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simco_jax import losses

# The dual-temperature loss in float64 of rng = np.random.default_rng(0); q, k = rng.normal(size=
# (6, 8)) twice, rows L2-normalised, τα = 0.1, dt_m = 10.
REFERENCE_LOSS = 3.601696702795699

# Jitted once per shape: op-by-op eager dispatch would dominate the test time.
_STATIC = ("temperature", "dt_m", "negative_groups")
dual_temperature_infonce = jax.jit(losses.dual_temperature_infonce, static_argnames=_STATIC)
infonce = jax.jit(losses.infonce, static_argnames=("temperature", "negative_groups"))
anchor_statistics = jax.jit(losses.anchor_statistics, static_argnames=_STATIC)


@pytest.fixture
def x64():
    """Run the test with float64 enabled, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def unit_rows(rng, rows, dim):
    x = rng.normal(size=(rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Independent float64 reference: one anchor at a time, textbook softmax.
# ----------------------------------------------------------------------------------------------


def reference_negatives(query, key, queue, groups):
    """List over anchors of the (N_i, D) negatives."""
    if queue is not None:
        return [queue for _ in range(len(query))]
    group_size = len(query) // groups
    negatives = []
    for i in range(len(query)):
        start = (i // group_size) * group_size
        members = [j for j in range(start, start + group_size) if j != i]
        negatives.append(key[members])
    return negatives


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_per_anchor(query, key, queue=None, tau_alpha=0.1, dt_m=10.0, groups=1):
    """Per-anchor P^α, P^β, p^α over the negatives, and the dual-temperature loss term."""
    tau_beta = tau_alpha * dt_m
    out = {"p_alpha": [], "p_beta": [], "neg_probs_alpha": [], "term": []}
    for q, k, negs in zip(query, key, reference_negatives(query, key, queue, groups), strict=True):
        s = np.concatenate([[q @ k], negs @ q])
        p_alpha = softmax(s / tau_alpha)
        p_beta = softmax(s / tau_beta)
        out["p_alpha"].append(p_alpha[0])
        out["p_beta"].append(p_beta[0])
        out["neg_probs_alpha"].append(p_alpha[1:])
        out["term"].append((1 - p_beta[0]) / (1 - p_alpha[0]) * -np.log(p_alpha[0]))
    return out


def reference_loss(*args, **kwargs):
    return float(np.mean(reference_per_anchor(*args, **kwargs)["term"]))


def closed_form_grads(query, key, queue=None, tau_alpha=0.1, dt_m=10.0, groups=1):
    """dL/dquery, dL/dkey from ∂L/∂s_pos,i = −c_i and ∂L/∂s_neg,ij = c_i·p^α_ij/(1−P^α_i),
    c_i = (1−P^β_i)/(τα·B), chained through s = q·kᵀ (and q·queueᵀ)."""
    stats = reference_per_anchor(query, key, queue, tau_alpha, dt_m, groups)
    batch = len(query)
    d_keys = np.zeros((batch, batch))  # ∂L/∂(q_i·k_j)
    d_queue = np.zeros((batch, 0 if queue is None else len(queue)))  # ∂L/∂(q_i·queue_j)
    group_size = batch // groups
    for i in range(batch):
        c = (1 - stats["p_beta"][i]) / (tau_alpha * batch)
        share = stats["neg_probs_alpha"][i] / (1 - stats["p_alpha"][i])
        d_keys[i, i] = -c
        if queue is None:
            start = (i // group_size) * group_size
            members = [j for j in range(start, start + group_size) if j != i]
            d_keys[i, members] = c * share
        else:
            d_queue[i] = c * share
    d_query = d_keys @ key + (0 if queue is None else d_queue @ queue)
    return d_query, d_keys.T @ query


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


def test_reference_value(x64):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 8))
    k = rng.normal(size=(6, 8))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    loss = dual_temperature_infonce(jnp.asarray(q), jnp.asarray(k), temperature=0.1, dt_m=10)
    assert loss.dtype == jnp.float64  # the float32 cast is "at least float32"
    np.testing.assert_allclose(float(loss), REFERENCE_LOSS, rtol=1e-12)
    np.testing.assert_allclose(reference_loss(q, k), REFERENCE_LOSS, rtol=1e-12)


@pytest.mark.parametrize(
    "batch, queue_size, groups, tau_alpha, dt_m",
    [
        (8, None, 1, 0.1, 10.0),
        (8, None, 1, 0.2, 3.0),
        (12, None, 3, 0.1, 10.0),
        (8, 24, 1, 0.1, 10.0),
        (8, 24, 1, 0.07, 1.0),
    ],
)
def test_matches_numpy_reference(x64, batch, queue_size, groups, tau_alpha, dt_m):
    rng = np.random.default_rng(batch + (queue_size or 0) + groups)
    q, k = unit_rows(rng, batch, 16), unit_rows(rng, batch, 16)
    queue = None if queue_size is None else unit_rows(rng, queue_size, 16)
    loss = dual_temperature_infonce(
        jnp.asarray(q),
        jnp.asarray(k),
        None if queue is None else jnp.asarray(queue),
        temperature=tau_alpha,
        dt_m=dt_m,
        negative_groups=groups,
    )
    expected = reference_loss(q, k, queue, tau_alpha, dt_m, groups)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


def test_float32_matches_numpy_reference():
    rng = np.random.default_rng(1)
    q, k, queue = unit_rows(rng, 8, 16), unit_rows(rng, 8, 16), unit_rows(rng, 32, 16)
    for bank in (None, queue):
        loss = dual_temperature_infonce(
            jnp.asarray(q, jnp.float32),
            jnp.asarray(k, jnp.float32),
            None if bank is None else jnp.asarray(bank, jnp.float32),
        )
        assert loss.dtype == jnp.float32 and loss.shape == ()
        np.testing.assert_allclose(float(loss), reference_loss(q, k, bank), rtol=1e-5)


def test_negative_groups_equal_separate_groups(x64):
    rng = np.random.default_rng(2)
    q, k = jnp.asarray(unit_rows(rng, 12, 8)), jnp.asarray(unit_rows(rng, 12, 8))
    grouped = dual_temperature_infonce(q, k, negative_groups=3)
    separately = np.mean([dual_temperature_infonce(q[g : g + 4], k[g : g + 4]) for g in (0, 4, 8)])
    np.testing.assert_allclose(float(grouped), float(separately), rtol=1e-13)
    # ... and differs from the global batch, so the grouping really restricts the negatives.
    assert abs(float(grouped) - float(dual_temperature_infonce(q, k))) > 1e-3


def test_dt_m_one_is_infonce():
    rng = np.random.default_rng(3)
    q, k, queue = unit_rows(rng, 8, 16), unit_rows(rng, 8, 16), unit_rows(rng, 32, 16)
    for bank in (None, queue):
        args = [None if x is None else jnp.asarray(x, jnp.float32) for x in (q, k, bank)]
        plain = infonce(*args, temperature=0.2)
        dual = dual_temperature_infonce(*args, temperature=0.2, dt_m=1.0)
        assert float(plain) == float(dual)
        stats = anchor_statistics(*args, temperature=0.2, dt_m=1.0)
        np.testing.assert_array_equal(stats["weight"], np.ones(8, np.float32))
        np.testing.assert_array_equal(stats["grad_scale"], stats["neg_mass_alpha"] / 0.2)
        # InfoNCE itself: the textbook mean of −log softmax(s_i/τ)[positive].
        expected = -np.mean(np.log(reference_per_anchor(q, k, bank, 0.2, 1.0)["p_alpha"]))
        np.testing.assert_allclose(float(plain), expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use_queue, groups, dt_m", [(False, 1, 10.0), (False, 2, 4.0), (True, 1, 10.0), (False, 1, 1.0)]
)
def test_gradients_match_closed_form(x64, use_queue, groups, dt_m):
    rng = np.random.default_rng(4)
    q, k = unit_rows(rng, 8, 16), unit_rows(rng, 8, 16)
    queue = unit_rows(rng, 20, 16) if use_queue else None

    def loss_fn(query, key, bank):
        return dual_temperature_infonce(
            query, key, bank, temperature=0.1, dt_m=dt_m, negative_groups=groups
        )

    bank = None if queue is None else jnp.asarray(queue)
    grads = jax.grad(loss_fn, argnums=(0, 1, 2) if use_queue else (0, 1))(
        jnp.asarray(q), jnp.asarray(k), bank
    )
    d_query, d_key = closed_form_grads(q, k, queue, 0.1, dt_m, groups)
    np.testing.assert_allclose(grads[0], d_query, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grads[1], d_key, rtol=1e-10, atol=1e-14)
    if use_queue:  # past keys are constants
        np.testing.assert_array_equal(grads[2], np.zeros_like(queue))


def test_weight_is_stop_gradient(x64):
    """grad of the loss == grad of (weight held constant) · cross-entropy."""
    rng = np.random.default_rng(5)
    q, k = jnp.asarray(unit_rows(rng, 8, 16)), jnp.asarray(unit_rows(rng, 8, 16))
    weight = anchor_statistics(q, k)["weight"]  # computed outside, a constant here

    def weighted_cross_entropy(query, key):
        s = query @ key.T / 0.1
        negatives = jnp.where(jnp.eye(8, dtype=bool), -jnp.inf, s)
        ce = jnp.logaddexp(jnp.diag(s), jax.nn.logsumexp(negatives, axis=1)) - jnp.diag(s)
        return jnp.mean(weight * ce)

    expected = jax.jit(jax.grad(weighted_cross_entropy, argnums=(0, 1)))(q, k)
    actual = jax.grad(dual_temperature_infonce, argnums=(0, 1))(q, k)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        float(dual_temperature_infonce(q, k)), float(weighted_cross_entropy(q, k)), 1e-12
    )

    # Had the weight carried gradient the result would differ: make sure the test can tell.
    def differentiated_weight(query, key):
        stats = losses._negative_log_odds(
            losses._similarities(query, key, None, 1), temperature=0.1, dt_m=10.0
        )
        z_alpha, z_beta = stats
        return jnp.mean(jax.nn.sigmoid(z_beta) / jax.nn.sigmoid(z_alpha) * jax.nn.softplus(z_alpha))

    wrong = jax.jit(jax.grad(differentiated_weight))(q, k)
    assert np.max(np.abs(wrong - actual[0])) > 1e-3


def test_queue_path_equals_direct_computation(x64):
    rng = np.random.default_rng(6)
    q, k, queue = unit_rows(rng, 4, 8), unit_rows(rng, 4, 8), unit_rows(rng, 16, 8)
    loss = dual_temperature_infonce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue))
    # Direct: each anchor's logits are [q_i·k_i, q_i·queue] — the batch's other keys are not used.
    logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], axis=1)
    p_alpha = np.exp(logits[:, 0] / 0.1) / np.exp(logits / 0.1).sum(1)
    p_beta = np.exp(logits[:, 0] / 1.0) / np.exp(logits / 1.0).sum(1)
    direct = np.mean((1 - p_beta) / (1 - p_alpha) * -np.log(p_alpha))
    np.testing.assert_allclose(float(loss), direct, rtol=1e-12)
    queue_grad = jax.grad(dual_temperature_infonce, argnums=2)(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue)
    )
    np.testing.assert_array_equal(queue_grad, np.zeros_like(queue))


# ----------------------------------------------------------------------------------------------
# Extreme inputs
# ----------------------------------------------------------------------------------------------


def _all_finite(*arrays):
    return all(bool(jnp.all(jnp.isfinite(a))) for a in arrays)


def test_positive_probability_rounding_to_one():
    """q == k, negatives opposite, τα = 0.01: P^α = 1 − e^−200 (1 in float32 and float64)."""
    q = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]], jnp.float32)  # B = 2: one negative, at cosine −1
    z_beta = -2.0 / 0.1  # log-odds of the negative at τβ (at τα it is −200)
    loss, (d_query, d_key) = jax.value_and_grad(
        lambda a, b: dual_temperature_infonce(a, b, temperature=0.01, dt_m=10.0),
        argnums=(0, 1),
    )(q, q)
    assert _all_finite(loss, d_query, d_key)
    # The term tends to 1 − P^β = σ(z^β) as P^α → 1.
    np.testing.assert_allclose(float(loss), 1 / (1 + np.exp(-z_beta)), rtol=1e-5)
    # The pull on the positive survives though 1 − P^α rounds to 0: c = σ(z^β)/(τα·B).
    c = 1 / (1 + np.exp(-z_beta)) / (0.01 * 2)
    d_keys = np.array([[-c, c], [c, -c]])  # ∂L/∂(q_i·k_j); the only negative takes all of p^α
    np.testing.assert_allclose(d_query, d_keys @ np.asarray(q), rtol=1e-5)
    np.testing.assert_allclose(d_key, d_keys.T @ np.asarray(q), rtol=1e-5)
    stats = anchor_statistics(q, q, temperature=0.01, dt_m=10.0)
    np.testing.assert_array_equal(stats["p_alpha"], [1.0, 1.0])  # e^z^α underflows float32
    np.testing.assert_allclose(stats["grad_scale"], [c * 2] * 2, rtol=1e-5)
    assert _all_finite(stats["p_beta"], stats["neg_mass_alpha"])
    # InfoNCE at τ = 0.1: P = 1 − 2e-9 rounds to 1 in float32, so a naive softmax − one-hot
    # would give the positive no gradient; the log-odds form keeps ∂L/∂s_pos = −σ(−20)/(τ·B).
    c_plain = 1 / (1 + np.exp(20.0)) / (0.1 * 2)
    d_plain = jax.grad(lambda a: infonce(a, q, temperature=0.1))(q)
    np.testing.assert_allclose(d_plain[:, 0], [-2 * c_plain, 2 * c_plain], rtol=1e-5)


def test_large_queue_weight_beyond_float32():
    """K = 65536 negatives at cosine −0.5, τα = 0.01: the weight (≈ e^135) overflows float32
    while the loss and its gradients stay finite and correct."""
    batch, size = 2, 65536
    q = jnp.eye(batch, 4, dtype=jnp.float32)  # q_i = k_i = e_i
    queue = jnp.tile(jnp.asarray([[-0.5, -0.5, 0.5, 0.5]], jnp.float32), (size, 1))
    z_beta = np.log(size) - 1.5 / 0.1  # log-odds of the negatives at τβ (at τα: −138.9)
    loss, grads = jax.value_and_grad(
        lambda a, b, c: dual_temperature_infonce(a, b, c, temperature=0.01, dt_m=10.0),
        argnums=(0, 1, 2),
    )(q, q, queue)
    assert _all_finite(loss, *grads)
    sigmoid_beta = 1 / (1 + np.exp(-z_beta))
    np.testing.assert_allclose(float(loss), sigmoid_beta, rtol=1e-5)
    c = sigmoid_beta / (0.01 * batch)
    np.testing.assert_allclose(grads[1], -c * np.asarray(q), rtol=1e-5)  # ∂/∂k_i = −c·q_i
    # ∂/∂q_i = −c·k_i + c·(mean queue row); float32 sums 65536 equal shares.
    np.testing.assert_allclose(grads[0], -c * np.asarray(q) + c * np.asarray(queue[:2]), rtol=1e-4)
    weight = anchor_statistics(q, q, queue, temperature=0.01, dt_m=10.0)["weight"]
    assert np.all(np.isposinf(weight))  # the true ratio exceeds float32's max: honest overflow


def test_batch_of_two_and_large_queue_match_reference():
    rng = np.random.default_rng(7)
    q, k, queue = unit_rows(rng, 2, 32), unit_rows(rng, 2, 32), unit_rows(rng, 65536, 32)
    as32 = [jnp.asarray(x, jnp.float32) for x in (q, k, queue)]
    in_batch = dual_temperature_infonce(as32[0], as32[1])
    with_queue, grads = jax.value_and_grad(dual_temperature_infonce, argnums=(0, 1))(*as32)
    assert _all_finite(in_batch, with_queue, *grads)
    np.testing.assert_allclose(float(in_batch), reference_loss(q, k), rtol=1e-5)
    np.testing.assert_allclose(float(with_queue), reference_loss(q, k, queue), rtol=1e-5)
    d_query, d_key = closed_form_grads(q, k, queue)
    np.testing.assert_allclose(grads[0], d_query, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(grads[1], d_key, rtol=1e-3, atol=1e-6)


def test_bfloat16_inputs():
    rng = np.random.default_rng(8)
    q, k, queue = unit_rows(rng, 8, 32), unit_rows(rng, 8, 32), unit_rows(rng, 64, 32)
    for bank in (None, queue):
        f32 = [None if x is None else jnp.asarray(x, jnp.float32) for x in (q, k, bank)]
        bf16 = [None if x is None else x.astype(jnp.bfloat16) for x in f32]
        loss_bf16, grads = jax.value_and_grad(dual_temperature_infonce, argnums=(0, 1))(*bf16)
        assert loss_bf16.dtype == jnp.float32
        assert grads[0].dtype == jnp.bfloat16 and _all_finite(loss_bf16, *grads)
        loss_f32 = dual_temperature_infonce(*f32)
        # bf16 keeps 8 bits of mantissa: cosines move by ~4e-3, logits by ~4e-2 at τα = 0.1.
        np.testing.assert_allclose(float(loss_bf16), float(loss_f32), rtol=2e-2)
    extreme = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]], jnp.bfloat16)
    loss, grads = jax.value_and_grad(
        lambda a, b: dual_temperature_infonce(a, b, temperature=0.01), argnums=(0, 1)
    )(extreme, extreme)
    assert _all_finite(loss, *grads) and float(loss) > 0


# ----------------------------------------------------------------------------------------------
# anchor_statistics and argument checks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_queue", [False, True])
def test_anchor_statistics(x64, use_queue):
    rng = np.random.default_rng(9)
    q, k = unit_rows(rng, 8, 16), unit_rows(rng, 8, 16)
    queue = unit_rows(rng, 24, 16) if use_queue else None
    args = [jnp.asarray(q), jnp.asarray(k), None if queue is None else jnp.asarray(queue)]
    stats = anchor_statistics(*args, temperature=0.1, dt_m=10.0)
    ref = reference_per_anchor(q, k, queue, 0.1, 10.0)
    p_alpha, p_beta = np.asarray(ref["p_alpha"]), np.asarray(ref["p_beta"])
    assert set(stats) == {"p_alpha", "p_beta", "weight", "grad_scale", "neg_mass_alpha"}
    assert all(v.shape == (8,) for v in stats.values())
    np.testing.assert_allclose(stats["p_alpha"], p_alpha, rtol=1e-12)
    np.testing.assert_allclose(stats["p_beta"], p_beta, rtol=1e-12)
    np.testing.assert_allclose(stats["neg_mass_alpha"], 1 - p_alpha, rtol=1e-12)
    np.testing.assert_allclose(stats["weight"], (1 - p_beta) / (1 - p_alpha), rtol=1e-12)
    np.testing.assert_allclose(stats["grad_scale"], (1 - p_beta) / 0.1, rtol=1e-12)

    # grad_scale is −B·∂L/∂s_pos,i by autodiff through the loss on the similarity matrix.
    def loss_of_similarities(similarities):
        z_alpha, z_beta = losses._negative_log_odds(similarities, 0.1, 10.0)
        return jnp.mean(losses._weighted_cross_entropy(z_alpha, z_beta))

    similarities = losses._similarities(args[0], args[1], args[2], 1)
    d_similarities = jax.jit(jax.grad(loss_of_similarities))(similarities)
    np.testing.assert_allclose(-8 * d_similarities[:, 0], stats["grad_scale"], rtol=1e-12)


def test_argument_errors():
    q = jnp.asarray(unit_rows(np.random.default_rng(10), 6, 4), jnp.float32)
    with pytest.raises(ValueError, match="divisor of the batch size 6"):
        losses.dual_temperature_infonce(q, q, negative_groups=4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        losses.infonce(q, q, negative_groups=6)
    with pytest.raises(ValueError, match="queue=None"):
        losses.infonce(q, q, q, negative_groups=2)
    with pytest.raises(ValueError, match="positives on matching rows"):
        losses.anchor_statistics(q, q[:4])


def test_eager_matches_jit():
    rng = np.random.default_rng(11)
    q, k = (jnp.asarray(unit_rows(rng, 8, 16), jnp.float32) for _ in range(2))
    eager = losses.dual_temperature_infonce(q, k, negative_groups=2)
    np.testing.assert_allclose(
        float(eager), float(dual_temperature_infonce(q, k, negative_groups=2)), rtol=1e-6
    )
