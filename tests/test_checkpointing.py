"""Checkpoints written in the train state's layout of earlier releases still restore."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import framework_config

from simco_jax import checkpointing, train_step


@flax.struct.dataclass
class TrainStateBeforeMethodState:
    """train_step.TrainState as earlier releases wrote it: the MoCo family's state at the top."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    momentum_params: Any
    momentum_batch_stats: Any
    queue: Any
    queue_ptr: Any
    probe_params: Any
    probe_opt_state: Any
    rng: Any


@pytest.mark.parametrize(
    "framework, overrides",
    [("mocov2", dict(queue_size=64)), ("simco", {}), ("byol", {})],  # queue; Nones; momentum
)
def test_a_checkpoint_before_method_state_restores_with_identical_values(
    framework, overrides, tmp_path
):
    config = framework_config(framework, **overrides)
    comps = train_step.build_components(config, 10, 8)
    state = train_step.create_train_state(config, comps, (16, 16, 3)).replace(step=jnp.int32(5))
    fields = {name: getattr(state, name) for name in state.__dataclass_fields__}
    old = TrainStateBeforeMethodState(**{**fields.pop("method_state"), **fields})
    record = checkpointing.compatibility_record(config, 10)
    writer = checkpointing.Checkpointer(str(tmp_path), record)
    writer.save(5, old)
    writer.close()

    template = jax.tree.map(jnp.zeros_like, state)  # shapes only: values come from the file
    reader = checkpointing.Checkpointer(str(tmp_path), record)
    restored = reader.restore_latest(template)
    reader.close()
    assert isinstance(restored, train_step.TrainState)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert set(restored.method_state) == set(train_step.LEGACY_METHOD_FIELDS)
    assert (restored.method_state["queue"] is None) == (not config.queue_size)
