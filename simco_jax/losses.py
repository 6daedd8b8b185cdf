"""InfoNCE and dual-temperature InfoNCE (Zhang et al., CVPR 2022, "Dual Temperature Helps ...").

Per anchor i of a batch of B, with L2-normalised query q_i, positive key k_i and negatives n_ij,
the similarities are s_i = [q_i·k_i, q_i·n_i1, …, q_i·n_iN] (positive in column 0) and

    P^α_i = softmax(s_i / τα)[0],    P^β_i = softmax(s_i / τβ)[0],    τβ = dt_m · τα

    L = (1/B) Σ_i  sg[ (1 − P^β_i) / (1 − P^α_i) ] · ( −log P^α_i )        (dual temperature)

sg is stop-gradient, on the weight only; keys carry gradient unless the caller stops them (SimCo
relies on this). The gradients are ∂L/∂s_pos,i = −(1−P^β_i)/(τα·B) and
∂L/∂s_neg,ij = (1−P^β_i)/(τα·B) · p^α_ij/(1−P^α_i): τβ sets how hard each anchor is pulled
(inter-anchor hardness-awareness), τα how that pull is shared among its negatives (intra-anchor).
InfoNCE (MoCo v2) is the case τβ = τα (dt_m = 1), where the weight is exactly 1.

Negatives: with a queue (K, D) they are the K queue rows (stop-gradient: a queue holds past keys);
without one they are the other keys of the batch, k_j for j ≠ i (cross-view only, diagonal
removed: B − 1 negatives), or, with negative_groups = G, only the other keys of the anchor's own
contiguous group of B/G (per-device in-batch negatives, as a multi-device run that does not gather
keys would use).

Numerics. Everything is computed in at least float32 (bf16/f16 inputs are cast up; float64 stays
float64 under x64). Each anchor is summarised by the log-odds of its negatives

    z_i = logsumexp_j(s_neg,ij / τ) − s_pos,i / τ,
    so  1 − P_i = σ(z_i),   log(1 − P_i) = log σ(z_i) = logsumexp(neg) − logsumexp(all),
        −log P_i = softplus(z_i),

which stay accurate when P^α_i rounds to 1 (the positive's probability 1 − 1e-9 is 1 in float32,
and a naive 1 − P would cancel to 0 and make the weight 0/0). The weight is the ratio of the two
negative masses, exp(log σ(z^β) − log σ(z^α)): finite and well defined whenever the logits are
finite, exactly 1 for dt_m = 1, but it can exceed float32's range (e.g. τα = 0.01, positives at
cosine 1, negatives at −1: weight ≈ e^180). The loss therefore never multiplies the weight by the
(underflowing) cross-entropy; it evaluates each anchor's term as σ(z^β)·softplus(z^α)/σ(z^α),
which tends to 1 − P^β as P^α → 1, with the derivative σ(z^β) w.r.t. z^α that the stop-gradient
weight implies (see `_weighted_cross_entropy`).
"""

import jax
import jax.numpy as jnp

__all__ = [
    "anchor_statistics",
    "dual_temperature_infonce",
    "infonce",
    "negative_cosine",
    "normalized_mse",
]


def infonce(query, key, queue=None, *, temperature=0.1, negative_groups=1):
    """InfoNCE: mean over anchors of −log softmax(s_i / τ)[positive]. Returns a scalar.

    Args:
      query: (B, D) L2-normalised anchors q_i.
      key: (B, D) L2-normalised positives k_i (row i is q_i's positive). Not stop-gradient here.
      queue: optional (K, D) negatives shared by all anchors (no gradient flows into it). None:
        in-batch negatives k_j, j ≠ i.
      temperature: τ.
      negative_groups: G; with queue=None, negatives come only from the anchor's group of B/G.
    """
    # InfoNCE is the dual-temperature loss with τβ = τα: one code path, identical numbers.
    return dual_temperature_infonce(
        query, key, queue, temperature=temperature, dt_m=1.0, negative_groups=negative_groups
    )


def dual_temperature_infonce(
    query, key, queue=None, *, temperature=0.1, dt_m=10.0, negative_groups=1
):
    """Dual-temperature InfoNCE, L = mean_i sg[(1−P^β_i)/(1−P^α_i)]·(−log P^α_i). Returns a scalar.

    Args:
      query, key, queue, negative_groups: as in `infonce`.
      temperature: τα, the temperature inside the log-softmax (intra-anchor hardness-awareness).
      dt_m: τβ / τα (the official code's name); τβ sets the per-anchor weight (inter-anchor
        hardness-awareness). The paper's setting is τα = 0.1, dt_m = 10 (τβ = 1).
    """
    similarities = _similarities(query, key, queue, negative_groups)
    z_alpha, z_beta = _negative_log_odds(similarities, temperature, dt_m)
    return jnp.mean(_weighted_cross_entropy(z_alpha, z_beta))


def anchor_statistics(query, key, queue=None, *, temperature=0.1, dt_m=10.0, negative_groups=1):
    """Per-anchor quantities of the dual-temperature loss, for plotting hardness-awareness.

    Arguments as in `dual_temperature_infonce`. No gradient is meant to flow through these.

    Returns:
      dict of (B,) arrays (float32, or float64 for float64 inputs under x64):
        p_alpha: P^α_i, the positive's probability at τα.
        p_beta: P^β_i, the positive's probability at τβ.
        weight: (1 − P^β_i)/(1 − P^α_i), the stop-gradient weight, as the ratio of the two negative
          masses (computed in log space; exactly 1 for dt_m = 1; +inf only where the true ratio
          exceeds the dtype's range).
        grad_scale: (1 − P^β_i)/τα = −B·∂L/∂s_pos,i, how hard anchor i is pulled towards its
          positive (inter-anchor hardness-awareness); (1 − P^α_i)/τα for dt_m = 1.
        neg_mass_alpha: 1 − P^α_i, the softmax mass on the negatives at τα.
    """
    similarities = jax.lax.stop_gradient(_similarities(query, key, queue, negative_groups))
    z_alpha, z_beta = _negative_log_odds(similarities, temperature, dt_m)
    return {
        "p_alpha": jax.nn.sigmoid(-z_alpha),
        "p_beta": jax.nn.sigmoid(-z_beta),
        "weight": jnp.exp(jax.nn.log_sigmoid(z_beta) - jax.nn.log_sigmoid(z_alpha)),
        "grad_scale": jax.nn.sigmoid(z_beta) / temperature,
        "neg_mass_alpha": jax.nn.sigmoid(z_alpha),
    }


def normalized_mse(prediction, target):
    """BYOL's loss (Grill et al. 2020, eq. 2): mean_i ‖p̄_i − z̄_i‖² = mean_i (2 − 2·cos(p_i, z_i)).

    p̄, z̄ are the L2-normalised rows. No negatives: each anchor is pulled towards its target with
    the same strength, ∂L/∂cos_i = −2/B. The target carries gradient unless the caller stops it.
    """
    return jnp.mean(2.0 - 2.0 * _cosine(prediction, target))


def negative_cosine(prediction, target):
    """SimSiam's loss (Chen & He 2021, eq. 1): D(p, z) = −mean_i cos(p_i, z_i).

    ∂L/∂cos_i = −1/B for every anchor. The target carries gradient unless the caller stops it
    (SimSiam's stop-gradient).
    """
    return -jnp.mean(_cosine(prediction, target))


def _cosine(a, b):
    """Row-wise cosine similarity in at least float32, as torch's F.normalize (eps 1e-12)."""
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return jnp.sum(a * b, axis=-1)


def _similarities(query, key, queue, negative_groups):
    """(B, 1 + N) cosine similarities, positive in column 0, in at least float32.

    N = K with a queue, else B/G − 1 (the keys of the anchor's group, its own positive removed).
    """
    if query.ndim != 2 or query.shape != key.shape:
        raise ValueError(
            f"query and key must both be (B, D) with positives on matching rows; got "
            f"query {query.shape} and key {key.shape}"
        )
    batch_size = query.shape[0]
    operands = (query, key) if queue is None else (query, key, queue)
    # "At least float32": bf16/f16 are cast up, float64 (under x64) is kept.
    dtype = jnp.promote_types(jnp.result_type(*operands), jnp.float32)
    query, key = query.astype(dtype), key.astype(dtype)
    positives = jnp.sum(query * key, axis=-1, keepdims=True)

    if queue is not None:
        if negative_groups != 1:
            raise ValueError(
                f"negative_groups={negative_groups} only applies to in-batch negatives "
                f"(queue=None); a queue is shared by all anchors"
            )
        if queue.ndim != 2 or queue.shape[1] != query.shape[1]:
            raise ValueError(f"queue must be (K, {query.shape[1]}); got {queue.shape}")
        # The queue holds past keys, constants of this step.
        negatives = query @ jax.lax.stop_gradient(queue.astype(dtype)).T
        return jnp.concatenate([positives, negatives], axis=1)

    if negative_groups < 1 or batch_size % negative_groups:
        raise ValueError(
            f"negative_groups={negative_groups} must be a positive divisor of the batch size "
            f"{batch_size} (the batch is split into equal contiguous groups)"
        )
    group_size = batch_size // negative_groups
    if group_size < 2:
        raise ValueError(
            f"each of the {negative_groups} negative groups needs at least 2 samples so that "
            f"every anchor has a negative; batch size is {batch_size}"
        )
    grouped_query = query.reshape(negative_groups, group_size, -1)
    grouped_key = key.reshape(negative_groups, group_size, -1)
    group_similarities = jnp.einsum("gid,gjd->gij", grouped_query, grouped_key)
    # Row i keeps columns 0..i−1 and i+1..group_size−1: the diagonal (its positive) removed.
    rows = jnp.arange(group_size)[:, None]
    columns = jnp.arange(group_size - 1)[None, :]
    off_diagonal = columns + (columns >= rows)
    negatives = jnp.take_along_axis(group_similarities, off_diagonal[None], axis=2)
    return jnp.concatenate([positives, negatives.reshape(batch_size, group_size - 1)], axis=1)


def _negative_log_odds(similarities, temperature, dt_m):
    """z^α, z^β of each anchor: z = logsumexp(s_neg / τ) − s_pos / τ, at τ = τα and τβ.

    1 − P = σ(z) and −log P = softplus(z). z^β comes from the τα logits divided by dt_m, so that
    dt_m = 1 reproduces z^α bit for bit (weight exactly 1).
    """
    logits_alpha = similarities / temperature
    logits_beta = logits_alpha / dt_m

    def log_odds(logits):
        return jax.nn.logsumexp(logits[:, 1:], axis=1) - logits[:, 0]

    return log_odds(logits_alpha), log_odds(logits_beta)


@jax.custom_jvp
def _weighted_cross_entropy(z_alpha, z_beta):
    """sg[σ(z^β)/σ(z^α)] · softplus(z^α) = sg[(1−P^β)/(1−P^α)] · (−log P^α), elementwise.

    Written as σ(z^β) · softplus(z^α)/σ(z^α) so that neither the weight (which can overflow) nor
    the cross-entropy (which can underflow) is formed on its own. Its derivative (custom_jvp
    below) is that of the stop-gradient form: σ(z^β) w.r.t. z^α, nothing w.r.t. z^β.
    """
    return jax.nn.sigmoid(z_beta) * _softplus_over_sigmoid(z_alpha)


@_weighted_cross_entropy.defjvp
def _weighted_cross_entropy_jvp(primals, tangents):
    z_alpha, z_beta = primals
    z_alpha_dot, _ = tangents  # the weight is stop-gradient: z^β and σ(z^α) contribute nothing
    # sg[w]·d softplus(z^α) = sg[σ(z^β)/σ(z^α)]·σ(z^α)·dz^α = σ(z^β)·dz^α, always finite.
    slope = jax.lax.stop_gradient(jax.nn.sigmoid(z_beta))
    return _weighted_cross_entropy(z_alpha, z_beta), slope * z_alpha_dot


def _softplus_over_sigmoid(z):
    """softplus(z)/σ(z) = −log P / (1 − P), finite for all z; → 1 as z → −∞ (P → 1)."""
    # Below the cut, 1 + e^{−z} would overflow float32 while softplus(z) underflows; the series
    # 1 + e^z/2 − e^{2z}/6 + … is then exact to float64 precision with its first two terms.
    cut = -20.0
    clipped = jnp.maximum(z, cut)
    direct = jax.nn.softplus(clipped) * (1.0 + jnp.exp(-clipped))
    series = 1.0 + 0.5 * jnp.exp(jnp.minimum(z, cut))
    return jnp.where(z > cut, direct, series)
