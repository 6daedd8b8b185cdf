"""Population training: the members of `config.members` as one train state, one vmapped step.

`config.members = {"seed": [0, 1, 2]}` (or a grid of several `config.MEMBER_KEYS`) trains every
member in one compiled program: the train state gains a leading member axis on every leaf but
`step` (the members advance together), and the jitted chunk of steps is `jax.vmap` of the
ordinary one over that axis. What a member varies reaches the step as a per-member array in
place of a Python constant: the step is built inside the vmapped function from a view of the
config (`MemberConfig`) whose varying keys are traced values, so every key the step reads
(temperature, dt_m, lr, weight decay, τ schedule, the seed of the init and of the key streams)
becomes the member's own without a branch in the step. The mesh is unchanged: the member axis
is replicated like the state, the batch axis stays sharded.

Data: each member draws its own resident epoch order and augmentation from its own root key
(`inputs.gather_batch` under vmap gathers per member); a streamed batch is decoded once on the
host and shared by all members, each augmenting it on the device with its own key. Metrics and
evaluations are reported per member as `<metric>_m<i>`; a non-finite one stops the run naming
the member (`Loop`'s divergence guard: the last good checkpoint keeps every member intact).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import config as config_lib
from simco_jax import train_step


class MemberConfig:
    """A read-only view of `config` in which the keys of `values` read as the given values
    (traced per-member arrays inside vmap); the step builders read it as a config."""

    def __init__(self, config, values: dict):
        self._config, self._values = config, values

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        return self._values[key] if key in self._values else getattr(self._config, key)

    def __getitem__(self, key):
        return self._values[key] if key in self._values else self._config[key]

    def __contains__(self, key):
        return key in self._config

    def get(self, key, default=None):
        return self[key] if key in self._config else default


def member_suffix(index: int) -> str:
    return f"_m{index}"


def state_axes():
    """vmap's axes of a population's TrainState: every field on axis 0 but the shared step."""
    fields = {f.name: 0 for f in dataclasses.fields(train_step.TrainState)}
    return train_step.TrainState(**{**fields, "step": None})


class Population:
    """The members of `config.members`: their configs, per-member values, state and step."""

    def __init__(self, config):
        self.points = config_lib.member_points(config)
        self.configs = config_lib.member_configs(config)
        self.size = len(self.points)
        self.config = self.configs[0]  # what every member shares (shapes, structure)
        keys = list(config.members)
        self.values = {
            key: np.asarray(
                [p[key] for p in self.points], np.int32 if key == "seed" else np.float32
            )
            for key in keys
        }
        self.axes = state_axes()

    def names(self) -> list[str]:
        return [config_lib.member_name(p) for p in self.points]

    def describe(self) -> str:
        return "; ".join(f"m{i}: {name}" for i, name in enumerate(self.names()))

    def _member_config(self, values):
        return MemberConfig(self.config, values)

    def init(self, num_classes: int, steps_per_epoch: int, image_shape):
        """The stacked initial state: member i's is `create_train_state` of member i's config."""

        def one(values):
            config = self._member_config(values)
            comps = train_step.build_components(config, num_classes, steps_per_epoch)
            return train_step.create_train_state(config, comps, image_shape)

        return jax.vmap(one, out_axes=self.axes)(self._values())

    def _values(self):
        return {key: jnp.asarray(v) for key, v in self.values.items()}

    def make_chunk(self, num_classes: int, steps_per_epoch: int, *, chunk_size: int, select):
        """`chunk(state, data, stop_at)` of `train_step.make_train_chunk`, vmapped over the
        members; the data is shared (a resident set gathered per member, a streamed batch)."""

        def one(state, values, data, stop_at):
            config = self._member_config(values)
            comps = train_step.build_components(config, num_classes, steps_per_epoch)
            step = train_step.make_train_step(config, comps)
            chunk = train_step.make_train_chunk(
                config, comps, step, chunk_size=chunk_size, select=select
            )
            return chunk(state, data, stop_at)

        vmapped = jax.vmap(one, in_axes=(self.axes, 0, None, None), out_axes=(self.axes, 0))

        def chunk(state, data, stop_at):
            state, metrics = vmapped(state, self._values(), data, stop_at)
            active = metrics.pop("active")[0]
            per_member = {
                f"{key}{member_suffix(i)}": value[i]
                for key, value in metrics.items()
                for i in range(self.size)
            }
            return state, dict(per_member, active=active)

        return chunk

    def member(self, state, index: int):
        """Member `index`'s own TrainState (the shared step kept)."""
        return jax.tree.map(
            lambda axis, x: x if axis is None else _take(x, index),
            self.axes,
            state,
            is_leaf=lambda x: x is None,
        )

    def evaluators(self, evaluators: dict) -> dict:
        """Each evaluator run on every member, its metrics suffixed with the member."""
        return {name: _PerMember(evaluator, self) for name, evaluator in evaluators.items()}


def _take(tree, index: int):
    return jax.tree.map(lambda x: x[index], tree)


class _PerMember:
    def __init__(self, evaluator, population: Population):
        self.evaluator, self.population = evaluator, population
        self._member = jax.jit(population.member, static_argnums=1)

    def run(self, state, report=lambda done, total: None) -> dict:
        results = {}
        for index in range(self.population.size):
            values = self.evaluator.run(self._member(state, index), report)
            results.update({f"{k}{member_suffix(index)}": v for k, v in values.items()})
        return results
