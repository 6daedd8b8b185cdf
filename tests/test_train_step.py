"""train_step.py: the step under float64, and against the official code."""

import jax
import numpy as np
from helpers import first_batch_setup, framework_config


def test_the_whole_step_runs_under_x64():
    # The losses support float64; so must the step, the queue's ring buffer included (an int32
    # pointer met an int64 literal in dynamic_update_slice).
    from simco_jax import train_step

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        config = framework_config("mocov2", "smoke", queue_size=64)
        comps, state, _, images, labels = first_batch_setup(config)
        new_state, metrics = jax.jit(train_step.make_train_step(config, comps))(
            state, images, labels
        )
        assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
        new, old = new_state.method_state, state.method_state
        assert int(new["queue_ptr"]) == config.batch_size
        assert not np.array_equal(new["queue"][:32], old["queue"][:32])
        np.testing.assert_array_equal(new["queue"][32:], old["queue"][32:])
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_one_way_key_encoder_sees_both_views_as_the_official_code():
    # MoCo v2 / SimMoCo read only k2, but the official code runs the key encoder on both views:
    # its BatchNorm running statistics are those of view 1's pass followed by view 2's.
    from simco_jax import augment, methods, train_step

    config = framework_config("simmoco", "smoke")
    comps, state, step, images, labels = first_batch_setup(config)
    new_state, _ = step(state, images, labels)

    @jax.jit  # one program, not hundreds of eagerly compiled operations
    def key_encoder_stats(state, images):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, train_step._STEP_STREAM), state.step)
        view1, view2 = augment.two_views(jax.random.split(rng)[0], images, comps.aug)
        stats = state.method_state["momentum_batch_stats"]
        for view in (view1, view2):
            _, _, stats = methods.encode(
                comps.model, state.method_state["momentum_params"], stats, view
            )
        return stats

    stats = key_encoder_stats(state, images)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new_state.method_state["momentum_batch_stats"],
        stats,
    )
