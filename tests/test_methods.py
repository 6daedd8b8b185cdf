"""The method seam, BYOL and SimSiam, the evaluator registry and the period units."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    HOST_A,
    HOST_AVX512,
    assert_equals_a_recorded_host,
    first_batch_setup,
    framework_config,
    run_python,
)

from simco_jax import (
    augment,
    checkpointing,
    losses,
    methods,
    models,
    optimizers,
    sources,
    train,
    train_step,
    writers,
)
from simco_jax import config as config_lib

# ---------------------------------------------------------------------------------------------
# The refactor changed no number: values recorded before the method seam existed.
# ---------------------------------------------------------------------------------------------

# Smoke config, max_steps=8 (one epoch), through train.train_and_evaluate on CPU float32; recorded
# with the train step from before `simco_jax.methods` existed, on each kind of host
# (helpers.HOST_A).
PINNED_RUNS = {
    "simco": {
        HOST_A: dict(
            losses=[3.514998435974121, 3.4612197875976562],
            probe_losses=[2.451085329055786, 2.3845059871673584],
            final=dict(probe_top1=9.375, probe_top5=59.375, knn_top1=71.875, knn_top5=100.0),
            params_sum=329.00202626937903,
            probe_sum=1.7063605626681237,
        ),
        HOST_AVX512: dict(
            losses=[3.5149431228637695, 3.4617063999176025],
            probe_losses=[2.4510717391967773, 2.386296033859253],
            final=dict(probe_top1=9.375, probe_top5=62.5, knn_top1=75.0, knn_top5=98.4375),
            params_sum=329.11589232706547,
            probe_sum=1.7063607225791202,
        ),
    },
    "simmoco": {
        HOST_A: dict(
            losses=[3.5279839038848877, 3.490118980407715],
            probe_losses=[2.44537353515625, 2.3804192543029785],
            final=dict(probe_top1=9.375, probe_top5=57.8125, knn_top1=62.5, knn_top5=96.875),
            params_sum=327.8014815701407,
            probe_sum=1.7063605640432797,
        ),
        HOST_AVX512: dict(
            losses=[3.5279839038848877, 3.490118980407715],
            probe_losses=[2.44537353515625, 2.3804194927215576],
            final=dict(probe_top1=9.375, probe_top5=57.8125, knn_top1=62.5, knn_top5=96.875),
            params_sum=327.80148364386696,
            probe_sum=1.7063606264418922,
        ),
    },
    "mocov2": {
        HOST_A: dict(
            losses=[5.022121429443359, 5.594769477844238],
            probe_losses=[2.442625045776367, 2.405014991760254],
            final=dict(probe_top1=9.375, probe_top5=50.0, knn_top1=35.9375, knn_top5=90.625),
            params_sum=328.5283619820581,
            probe_sum=1.7063608129683416,
        ),
        HOST_AVX512: dict(
            losses=[5.022121429443359, 5.594769477844238],
            probe_losses=[2.442625045776367, 2.405014991760254],
            final=dict(probe_top1=9.375, probe_top5=50.0, knn_top1=35.9375, knn_top5=90.625),
            params_sum=328.5283652789811,
            probe_sum=1.7063607798190787,
        ),
    },
}

# Two jitted steps on the first batch (mocov2 with a 64-key queue), recorded as above: the losses,
# and float64 sums of the online params and BatchNorm statistics, the momentum params (None
# without a momentum encoder) and the queue (None without one).
PINNED_STEPS = {
    "simco": {
        HOST_A: (
            [3.5905263423919678, 3.5121545791625977],
            328.0767939596428,
            288.3641599373368,
            None,
            None,
        ),
        HOST_AVX512: (
            [3.590526580810547, 3.512155294418335],
            328.0767935868363,
            288.36415760492673,
            None,
            None,
        ),
    },
    "simmoco": {
        HOST_A: (
            [3.604640007019043, 3.548600673675537],
            328.0841629961346,
            288.09763724049844,
            328.24802378269885,
            None,
        ),
        HOST_AVX512: (
            [3.604640007019043, 3.548600435256958],
            328.0841626463848,
            288.0976364786766,
            328.2480237412355,
            None,
        ),
    },
    "mocov2": {
        HOST_A: (
            [0.205792635679245, 3.5694680213928223],
            328.30497367707426,
            288.1768110952398,
            328.25108124528765,
            3.5287625499186106,
        ),
        HOST_AVX512: (
            [0.20579272508621216, 3.5694680213928223],
            328.304973924161,
            288.1768091098493,
            328.2510812648434,
            3.5287577068665996,
        ),
    },
}

# BYOL and SimSiam, the same two steps, recorded once they followed solo-learn, which changed
# their numbers: the classifier's lr is scaled by batch/256 (0.1 becomes 0.0125 at the smoke batch
# of 32), BYOL's classifier trains inside LARS, SimSiam's predictor lost the bias of its first
# Linear. (losses, probe losses, sums of params, batch_stats, probe, momentum params)
PINNED_SOLO_LEARN_STEPS = {
    "byol": {
        HOST_A: (
            [3.6171202659606934, 3.7399964332580566],
            [2.5093188285827637, 2.491739273071289],
            359.3480876347079,
            309.77243205183186,
            1.7063603708229493,
            344.2517306413012,
        ),
        HOST_AVX512: (
            [3.6171202659606934, 3.739996910095215],
            [2.5093183517456055, 2.491739273071289],
            359.3480860170928,
            309.77242998786096,
            1.7063603800052078,
            344.2517306094594,
        ),
    },
    "simsiam": {
        HOST_A: (
            [-0.05739402398467064, -0.04052235931158066],
            [2.5093188285827637, 2.47802996635437],
            376.35609605766496,
            333.31902490545923,
            1.7063605307921534,
            None,
        ),
        HOST_AVX512: (
            [-0.05739407241344452, -0.04052247107028961],
            [2.5093183517456055, 2.47802996635437],
            376.35570932455767,
            333.3190232933925,
            1.706360488802602,
            None,
        ),
    },
}


def _sum(tree):
    return float(sum(np.sum(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("framework", sorted(PINNED_STEPS))
def test_old_frameworks_take_bit_identical_steps(framework):
    config = framework_config(framework, queue_size=64 if framework == "mocov2" else 0)
    _, state, step, images, labels = first_batch_setup(config)
    losses_seen = []
    for _ in range(2):
        state, metrics = step(state, images, labels)
        losses_seen.append(float(metrics["loss"]))
    momentum, queue = state.method_state["momentum_params"], state.method_state["queue"]
    got = (
        losses_seen,
        _sum(state.params),
        _sum(state.batch_stats),
        None if momentum is None else _sum(momentum),
        None if queue is None else _sum(queue),
    )
    assert_equals_a_recorded_host(got, PINNED_STEPS[framework], framework)


@pytest.mark.parametrize("framework", sorted(PINNED_SOLO_LEARN_STEPS))
def test_byol_and_simsiam_take_pinned_steps(framework):
    _, state, step, images, labels = first_batch_setup(framework_config(framework))
    losses_seen, probe_losses = [], []
    for _ in range(2):
        state, metrics = step(state, images, labels)
        losses_seen.append(float(metrics["loss"]))
        probe_losses.append(float(metrics["probe_loss"]))
    momentum = state.method_state["momentum_params"]
    got = (
        losses_seen,
        probe_losses,
        _sum(state.params),
        _sum(state.batch_stats),
        _sum(state.probe_params),
        None if momentum is None else _sum(momentum),
    )
    assert_equals_a_recorded_host(got, PINNED_SOLO_LEARN_STEPS[framework], framework)


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(PINNED_RUNS))
def test_old_frameworks_give_bit_identical_smoke_metrics(framework, tmp_path):
    config = framework_config(framework, max_steps=8)
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = writers.read_metrics(str(tmp_path))
    final = [r for r in records if "probe_top1" in r][-1]
    got = dict(
        losses=[r["loss"] for r in records if "loss" in r],
        probe_losses=[r["probe_loss"] for r in records if "loss" in r],
        final={k: final[k] for k in ("probe_top1", "probe_top5", "knn_top1", "knn_top5")},
        params_sum=_sum(summary["state"].params),
        probe_sum=_sum(summary["state"].probe_params),
    )
    assert_equals_a_recorded_host(got, PINNED_RUNS[framework], framework)


# ---------------------------------------------------------------------------------------------
# BYOL and SimSiam.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["byol", "simsiam"])
def test_new_framework_trains_through_launch(framework, tmp_path):
    workdir = tmp_path / framework
    run_python(
        [
            "launch.py",
            f"--config=configs/{framework}_cifar.py:smoke",
            f"--workdir={workdir}",
            "--config.max_steps=4",
        ],
        timeout=3600,
    )
    records = writers.read_metrics(str(workdir))
    losses_seen = [r["loss"] for r in records if "loss" in r]
    assert losses_seen and np.all(np.isfinite(losses_seen))
    final = [r for r in records if "probe_top1" in r][-1]
    assert 0.0 <= final["probe_top1"] <= final["probe_top5"] <= 100.0 and "knn_top1" in final
    # BYOL's summed normalised MSE lies in [0, 8]; SimSiam's mean negative cosine in [-1, 1].
    low, high = (0.0, 8.0) if framework == "byol" else (-1.0, 1.0)
    assert all(low <= v <= high for v in losses_seen)


def _cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def _cosine_grad(a, b):
    """d cos(a_i, b_i) / d a_i = (b̄ − cos·ā) / ‖a‖, row by row."""
    na = np.linalg.norm(a, axis=-1, keepdims=True)
    nb = np.linalg.norm(b, axis=-1, keepdims=True)
    cos = _cosine(a, b)[:, None]
    return (b / nb - cos * a / na) / na


@pytest.mark.parametrize(
    "framework, loss, direction_weight, scale, offset",
    [
        # BYOL: L + L̃ with L = mean(2 − 2 cos) (Grill et al. 2020, eq. 2; solo-learn sums both).
        ("byol", "normalized_mse", 1.0, -2.0, 2.0),
        # SimSiam: ½(D(p1, z2) + D(p2, z1)), D = −mean(cos) (Chen & He 2021, eq. 2).
        ("simsiam", "negative_cosine", 0.5, -1.0, 0.0),
    ],
)
def test_negative_free_losses_match_numpy(framework, loss, direction_weight, scale, offset):
    config = framework_config(framework)
    assert config.loss == loss and config.symmetric
    method = methods.make_method(config, model=None, total_steps=10)
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.normal(size=(6, 5)).astype(np.float64) for _ in range(4))

    def total(p1, p2, z1, z2):
        return method.loss((p1, p2), (z1, z2), None)

    value, grads = jax.value_and_grad(total, argnums=(0, 1, 2, 3))(
        *(jnp.asarray(x, jnp.float32) for x in (p1, p2, z1, z2))
    )
    batch = p1.shape[0]
    term = lambda p, z: np.mean(offset + scale * _cosine(p, z))
    expected = direction_weight * (term(p1, z2) + term(p2, z1))
    np.testing.assert_allclose(float(value), expected, rtol=1e-6, atol=1e-7)
    c = direction_weight * scale / batch
    expected_grads = (
        c * _cosine_grad(p1, z2),
        c * _cosine_grad(p2, z1),
        c * _cosine_grad(z1, p2),
        c * _cosine_grad(z2, p1),
    )
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    # The one-way loss is a single direction.
    one_way = methods.make_method(framework_config(framework, symmetric=False), None, 10)
    np.testing.assert_allclose(
        float(one_way.loss((p1, p2), (z1, z2), None)), term(p1, z2), rtol=1e-6, atol=1e-7
    )


def test_loss_functions_match_numpy_per_pair():
    rng = np.random.default_rng(1)
    p, z = rng.normal(size=(2, 7, 4))
    np.testing.assert_allclose(
        float(losses.normalized_mse(p, z)),
        np.mean(
            np.sum(
                (
                    p / np.linalg.norm(p, axis=-1, keepdims=True)
                    - z / np.linalg.norm(z, axis=-1, keepdims=True)
                )
                ** 2,
                -1,
            )
        ),  # noqa: E501
        rtol=1e-6,
    )
    np.testing.assert_allclose(float(losses.negative_cosine(p, z)), -np.mean(_cosine(p, z)), 1e-6)


@pytest.mark.parametrize(
    "framework, gradient_reaches_targets",
    [("simco", True), ("simsiam", False), ("byol", False), ("simmoco", False)],
)
def test_who_gets_gradient_through_the_targets(framework, gradient_reaches_targets):
    """SimCo's keys are the online projections with gradient; SimSiam stops it; a momentum
    encoder's keys never carry any."""
    method = methods.make_method(framework_config(framework), None, 10)
    z = jnp.ones((4, 3))
    momentum_keys = (jnp.full((4, 3), 2.0), jnp.full((4, 3), 3.0))

    def through_targets(z):
        k1, k2 = method.targets((z, 2 * z), momentum_keys)
        return jnp.sum(k1) + jnp.sum(k2)

    grad = jax.grad(through_targets)(z)
    assert bool(jnp.all(grad != 0)) == gradient_reaches_targets


def test_byol_state_momentum_encoder_without_predictor_and_a_step_moves_it():
    config = framework_config("byol", base_tau_momentum=0.5, final_tau_momentum=0.5)
    comps, state, step, images, labels = first_batch_setup(config)
    assert "predictor" in state.params and "predictor" in state.batch_stats
    assert sorted(state.method_state["momentum_params"]) == ["backbone", "projector"]
    assert "hidden_bn" in state.batch_stats["projector"]  # BYOL's projector has BatchNorm
    new_state, metrics = step(state, images, labels)
    assert np.isfinite(float(metrics["loss"]))
    # EMA with τ = 0.5 of the old target and the new online weights.
    old = state.method_state["momentum_params"]["projector"]
    new = new_state.method_state["momentum_params"]["projector"]
    online = new_state.params["projector"]
    jax.tree.map(
        lambda m, o, n: np.testing.assert_allclose(n, 0.5 * m + 0.5 * o, rtol=1e-6),
        old,
        online,
        new,
    )
    # The predictor is trained (its first bias is not: the BatchNorm after it cancels it).
    old_pred, new_pred = state.params["predictor"], new_state.params["predictor"]
    for layer in ("hidden", "output"):
        assert bool(jnp.any(old_pred[layer]["kernel"] != new_pred[layer]["kernel"]))


def test_simsiam_projector_ends_in_batch_norm_without_affine():
    config = framework_config("simsiam")
    comps, state, *_ = first_batch_setup(config)
    projector = state.params["projector"]
    assert sorted(projector) == ["hidden", "hidden2", "hidden2_bn", "hidden_bn", "output"]
    assert "bias" not in projector["hidden"] and "bias" not in projector["output"]
    # solo-learn's predictor: Linear(bias=False) → BN → ReLU → Linear (with bias).
    assert sorted(state.params["predictor"]["hidden"]) == ["kernel"]
    assert sorted(state.params["predictor"]["output"]) == ["bias", "kernel"]
    assert "output_bn" in state.batch_stats["projector"]  # statistics only, no scale/bias
    assert state.method_state["momentum_params"] is None and state.method_state["queue"] is None


@pytest.mark.parametrize(
    "framework, overrides",
    [
        ("mocov2", dict(queue_size=64, predictor=True)),  # MoCo with a predictor (as MoCo v3)
        ("simco", dict(optimizer="lars")),
        ("simsiam", dict(momentum_encoder=True, loss="normalized_mse")),  # BYOL-like SimSiam
    ],
)
def test_mixes_of_parts_train(framework, overrides):
    config = framework_config(framework, **overrides)
    config_lib.validate(config)
    _, state, step, images, labels = first_batch_setup(config)
    for _ in range(2):
        new_state, metrics = step(state, images, labels)
        assert np.isfinite(float(metrics["loss"]))
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
        assert any(jax.tree.leaves(changed))
        state = new_state


# ---------------------------------------------------------------------------------------------
# Evaluator registry and periods.
# ---------------------------------------------------------------------------------------------


def test_registry_runs_a_user_defined_evaluator_from_a_config_entry(tmp_path):
    config = framework_config("simco", max_steps=3, log_every_steps=1)
    config.evals.feature_norm = dict(type="feature_norm_evaluator", every_steps=2)
    config.evals.knn.every_steps = 0  # disabled: not even at the end
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = writers.read_metrics(str(tmp_path))
    norms = {r["step"]: r["feature_norm_mean"] for r in records if "feature_norm_mean" in r}
    assert sorted(norms) == [2, 3]  # every 2 steps, and after the last one
    assert not any("knn_top1" in r for r in records)
    assert [r["step"] for r in records if "probe_top1" in r] == [3]  # eval_every_epochs=1
    # The value is the mean norm of the clean test features of the final state.
    dataset = sources.load_dataset(config)
    comps = train_step.build_components(config, dataset.num_classes, 8)
    state = summary["state"]
    x = augment.normalize(jnp.asarray(dataset.test_images), comps.aug)
    features, _ = comps.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, x, train=False
    )
    expected = float(jnp.mean(jnp.linalg.norm(features, axis=-1)))
    np.testing.assert_allclose(norms[3], expected, rtol=1e-5)


def test_unknown_evaluator_type_is_refused_before_compiling():
    config = framework_config("simco")
    config.evals.mine = dict(type="no_such_module_anywhere")
    with pytest.raises(config_lib.ConfigError, match="evals.mine.type='no_such_module_anywhere'"):
        config_lib.validate(config)


def test_periods_in_steps_or_epochs_resolve_in_one_helper():
    c = config_lib.base_config()
    assert config_lib.period_steps(c, "log_every", 10) == 50
    assert config_lib.period_steps(c, "checkpoint_every", 10) == 1000
    c.log_every_epochs = 0.5  # replaces the default log_every_steps
    assert config_lib.period_steps(c, "log_every", 10) == 5
    c.log_every_steps = 7  # both set explicitly: refused
    with pytest.raises(config_lib.ConfigError, match="both set"):
        config_lib.period_steps(c, "log_every", 10)
    c.checkpoint_every_epochs = 2.0
    assert config_lib.period_steps(c, "checkpoint_every", 10) == 20
    # Evaluators: the old keys give the built-ins' periods; an entry's own period wins.
    c = config_lib.base_config()
    assert config_lib.eval_periods(c, 10) == {"probe": 10, "knn": 100}
    c.eval_every_epochs, c.knn_every_epochs = 2, 0
    assert config_lib.eval_periods(c, 10) == {"probe": 20, "knn": 0}
    c.evals.knn.every_steps = 15
    c.evals.probe.every_epochs = 0.3
    assert config_lib.eval_periods(c, 10) == {"probe": 3, "knn": 15}
    c.evals.probe.every_steps = 4
    with pytest.raises(config_lib.ConfigError, match="every_steps=4 and every_epochs=0.3"):
        config_lib.eval_periods(c, 10)


def test_the_seams_choices_are_the_schemas():
    assert config_lib.PROJECTORS == models.PROJECTORS
    assert config_lib.LOSSES == tuple(methods.LOSSES)
    assert config_lib.OPTIMIZERS == optimizers.OPTIMIZERS
    negative_free = tuple(k for k, v in methods.LOSSES.items() if not v.uses_negatives)
    assert config_lib.NEGATIVE_FREE_LOSSES == negative_free


def test_new_keys_are_checked():
    for overrides, message in (
        (dict(loss="mse"), "loss must be one of"),
        (dict(projector="mlp4"), "projector must be one of"),
        (dict(optimizer="adam"), "optimizer must be one of"),
        (dict(loss="negative_cosine", queue_size=64), "uses no negatives; set queue_size=0"),
        (dict(predictor=True, pred_hidden_dim=0), "pred_hidden_dim must be an integer"),
    ):
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(framework_config("simco", **overrides))
    for framework in ("byol", "simsiam"):
        config_lib.validate(framework_config(framework, variant=""))


def test_checkpoints_from_before_the_seam_resume_and_other_methods_are_refused():
    """A checkpoint's record is its config: keys it lacks (added since) are not compared, a
    different method is refused, and periods and evaluators may change on resume."""
    new_keys = {"projector", "predictor", "pred_hidden_dim", "pred_fixed_lr", "loss"}
    new_keys |= {"optimizer", "lars_eta", "lars_clip_lr", "lars_exclude_bias_n_norm", "evals"}
    new_keys |= {"log_every_epochs", "checkpoint_every_epochs"}
    now = checkpointing.compatibility_record(framework_config("simco"), 10)
    old = {k: v for k, v in now.items() if k not in new_keys}
    assert checkpointing.changes(old, now) == ({}, {})
    refused, _ = checkpointing.changes(
        now, checkpointing.compatibility_record(framework_config("byol"), 10)
    )
    assert {"loss", "predictor", "projector", "optimizer", "momentum_encoder"} <= set(refused)
    changed = framework_config("simco", log_every_epochs=0.5)
    changed.evals.knn.every_steps = 3
    refused, accepted = checkpointing.changes(now, checkpointing.compatibility_record(changed, 10))
    assert refused == {} and set(accepted) == {"log_every_epochs", "evals"}


# ---------------------------------------------------------------------------------------------
# The seam holds a method outside the MoCo family.
# ---------------------------------------------------------------------------------------------


def _vicreg_loss(projections):
    """VICReg (Bardes et al. 2022) on raw projections: invariance between consecutive views,
    variance hinge and covariance penalty per view, weights 25, 25, 1."""

    def variance(z):
        return jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(jnp.var(z, axis=0) + 1e-4)))

    def covariance(z):
        z = z - z.mean(axis=0)
        c = z.T @ z / (z.shape[0] - 1)
        return jnp.sum((c - jnp.diag(jnp.diag(c))) ** 2) / z.shape[1]

    pairs = zip(projections[:-1], projections[1:], strict=True)
    invariance = jnp.mean(jnp.stack([jnp.mean((a - b) ** 2) for a, b in pairs]))
    regular = jnp.mean(jnp.stack([25.0 * variance(z) + covariance(z) for z in projections]))
    return 25.0 * invariance + regular


def _vicreg_method(dim: int) -> methods.Method:
    """A test-only method the MoCo-shaped seam could not hold: three views, un-normalised heads
    and a state of its own (an EMA of view 1's per-dimension std, a collapse monitor)."""

    def post_update(method_state, step, params, targets):
        std = jnp.std(targets[0], axis=0)
        return dict(std_ema=0.9 * method_state["std_ema"] + 0.1 * std, updates=step + 1)

    return methods.Method(
        num_views=3,
        normalize_heads=False,
        backward_views=(0, 1, 2),
        init_state=lambda rng, params, batch_stats: dict(
            std_ema=jnp.ones((dim,)), updates=jnp.zeros((), jnp.int32)
        ),
        momentum_keys=lambda method_state, views, rng: (None, method_state),
        targets=lambda projections, momentum_keys: projections,
        negatives=lambda method_state: None,
        loss=lambda queries, targets, negatives: _vicreg_loss(queries),
        metrics=lambda step: {},
        post_update=post_update,
    )


def test_a_vicreg_style_method_trains_through_the_real_step():
    config = framework_config("simco")
    dataset = sources.load_dataset(config)
    comps = train_step.build_components(config, dataset.num_classes, 8)
    comps = comps._replace(method=_vicreg_method(config.proj_output_dim))
    state = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
    assert sorted(state.method_state) == ["std_ema", "updates"]
    step = jax.jit(train_step.make_train_step(config, comps))
    images = jnp.asarray(dataset.train_images[: config.batch_size])
    labels = jnp.asarray(dataset.train_labels[: config.batch_size], jnp.int32)

    # The first step's loss is VICReg's on the raw projections of three views.
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, train_step._STEP_STREAM), 0)
    views = train_step.augment_views(jax.random.split(rng)[0], images, comps.aug, 3)
    stats, raw = state.batch_stats, []
    for view in views:
        _, z, stats = methods.encode(comps.model, state.params, stats, view, normalize=False)
        raw.append(z)
    assert not np.allclose(jnp.linalg.norm(raw[0], axis=-1), 1.0, atol=0.05)  # not unit rows

    first = state
    seen = []
    for _ in range(3):
        new_state, metrics = step(state, images, labels)
        seen.append(float(metrics["loss"]))
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
        assert all(jax.tree.leaves(changed))
        state = new_state
    np.testing.assert_allclose(seen[0], float(_vicreg_loss(raw)), rtol=1e-5)
    assert np.all(np.isfinite(seen)) and int(state.method_state["updates"]) == 3
    # The method's own state moved as its post_update says (step 1: from view 1's raw heads).
    one_step, _ = step(first, images, labels)
    np.testing.assert_allclose(
        one_step.method_state["std_ema"], 0.9 + 0.1 * np.std(raw[0], axis=0), rtol=1e-5
    )
    # The probe saw all three views' features.
    assert float(metrics["probe_loss"]) > 0


@pytest.mark.parametrize(
    "framework, overrides, views",
    [
        ("mocov2", {}, (0,)),  # one-way, momentum keys
        ("simmoco", {}, (0,)),
        ("simco", {}, (0, 1)),  # symmetric
        ("simco", dict(symmetric=False), (0, 1)),  # one-way SimCo: its target has gradient
        ("simsiam", dict(symmetric=False), (0,)),  # one-way with stop-gradient targets
        ("byol", {}, (0, 1)),
        ("simsiam", {}, (0, 1)),
    ],
)
def test_backward_views_are_the_views_the_loss_differentiates(framework, overrides, views):
    """The method's declaration (what memory.py and the throughput benchmark count) is the
    gradient's own answer: a view outside it gets no gradient through its query or target."""
    config = framework_config(framework, **overrides)
    method = methods.make_method(config, None, 10)
    assert method.backward_views == views and method.num_views == 2 and method.normalize_heads
    rng = np.random.default_rng(0)
    unit = lambda *shape: methods._l2_normalize(jnp.asarray(rng.normal(size=shape), jnp.float32))
    q1, q2, z1, z2, k1, k2 = (unit(6, 5) for _ in range(6))
    negatives = unit(8, 5) if config.queue_size else None

    def loss(q1, q2, z1, z2):
        return method.loss((q1, q2), method.targets((z1, z2), (k1, k2)), negatives)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q1, q2, z1, z2)
    for view in (0, 1):
        reached = any(bool(jnp.any(g != 0)) for g in (grads[view], grads[2 + view]))
        assert reached == (view in views), view
