"""population.py: member i of a population trains as the separate run of member i's config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import framework_config

from simco_jax import config as config_lib
from simco_jax import inputs, population, sources, train_step

# The comparison with the plain program stops after 4 steps on purpose: this tiny network's
# training is chaotic (scaling the initial parameters by 1 + 1e-6 moves a plain run's SimCo loss by
# 5e-5 at step 7 and 2e-3 at step 9, as far as a member drifts from its separate run), so the
# rounding that differs between the batched and the plain convolutions grows alike. The epoch
# boundary falls inside those 4 steps (2 steps per epoch), and each member's batches and views of
# a longer epoch are compared exactly below.
STEPS = 4
SMALL = dict(synthetic_num_train=96, backbone_width=8)


def _setup(config):
    dataset = sources.load_dataset(config)
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    data = (jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels, jnp.int32))

    def select(state, data, i):
        return inputs.gather_batch(
            state, data, steps_per_epoch=steps_per_epoch, batch=config.batch_size
        )

    return dataset, steps_per_epoch, data, select


def _train_population(config, steps=STEPS):
    """The population's state after `steps` and each step's per-member losses (P, steps)."""
    dataset, steps_per_epoch, data, select = _setup(config)
    pop = population.Population(config)
    shape = dataset.train_images.shape[1:]
    state = jax.jit(lambda: pop.init(dataset.num_classes, steps_per_epoch, shape))()
    chunk = jax.jit(
        pop.make_chunk(dataset.num_classes, steps_per_epoch, chunk_size=1, select=select)
    )
    losses = []
    for _ in range(steps):
        state, metrics = chunk(state, data, np.int32(steps))
        losses.append([float(metrics[f"loss_m{i}"][0]) for i in range(pop.size)])
    return pop, state, np.array(losses).T


def _train_separately(member_config, data_config, steps=STEPS):
    """Member's own run, today's code path, on the population's data (`data_config`: the
    synthetic set is generated from the population config's seed)."""
    dataset, steps_per_epoch, data, select = _setup(data_config)
    comps = train_step.build_components(member_config, dataset.num_classes, steps_per_epoch)
    state = train_step.create_train_state(member_config, comps, dataset.train_images.shape[1:])
    step = train_step.make_train_step(member_config, comps)
    chunk = jax.jit(
        train_step.make_train_chunk(member_config, comps, step, chunk_size=1, select=select)
    )
    losses = []
    for _ in range(steps):
        state, metrics = chunk(state, data, np.int32(steps))
        losses.append(float(metrics["loss"][0]))
    return state, np.array(losses)


def _assert_close(a, b, rtol, atol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


@pytest.mark.parametrize(
    "framework, overrides",
    [("simco", {}), ("mocov2", {"queue_size": 64}), ("byol", {})],
)
def test_each_member_is_its_separate_run(framework, overrides):
    # Worst relative difference seen in a loss: 6e-7 for SimCo and MoCo v2 on one host, 4.8e-6
    # on an AVX-512 host (its kernels round the batched convolution differently again); 3.8e-5
    # for BYOL at step 3 (after the epoch boundary, where its loss falls from 4.37 to 1.88 and
    # LARS's trust ratios amplify the batched convolution's different rounding).
    rtol = 1e-4 if framework == "byol" else 1e-5
    # 64 images / batch 32: 2 steps per epoch, so the 4 steps cross the epoch 0 → 1 boundary,
    # where each member reshuffles from its own seed.
    config = framework_config(framework, "smoke", synthetic_num_train=64, **overrides)
    config.members = {"seed": [0, 1]}
    pop, state, losses = _train_population(config)
    fresh = jax.jit(lambda: pop.init(10, 2, (16, 16, 3)))()
    for index, member_config in enumerate(config_lib.member_configs(config)):
        # The initial state: 1 ulp at most.
        alone, alone_losses = _train_separately(member_config, config)
        np.testing.assert_allclose(losses[index], alone_losses, rtol=rtol)
        comps = train_step.build_components(member_config, 10, 2)
        init_alone = train_step.create_train_state(member_config, comps, (16, 16, 3))
        assert _max_difference(pop.member(fresh, index), init_alone) < 1e-6
    assert int(state.step) == STEPS
    assert not np.allclose(losses[0], losses[1])  # the seeds really differ


def test_each_member_draws_its_own_batches_and_views_across_an_epoch():
    config = framework_config("simco", "smoke")
    config.members = {"seed": [0, 1]}
    pop = population.Population(config)
    _, steps_per_epoch, data, select = _setup(config)
    comps = train_step.build_components(pop.config, 10, steps_per_epoch)

    def views(state):
        images, labels = select(state, data, 0)
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, 1), state.step)
        return train_step.augment_views(jax.random.split(rng)[0], images, comps.aug, 2), labels

    stacked = jax.jit(lambda: pop.init(10, steps_per_epoch, (16, 16, 3)))()
    vmapped, plain = jax.jit(jax.vmap(views, in_axes=(pop.axes,))), jax.jit(views)
    for step in (steps_per_epoch - 1, steps_per_epoch, steps_per_epoch + 1):  # epoch 0 → 1
        (members_views, members_labels) = vmapped(stacked.replace(step=jnp.int32(step)))
        for index, member_config in enumerate(config_lib.member_configs(config)):
            alone = train_step.create_train_state(member_config, comps, (16, 16, 3))
            alone_views, alone_labels = plain(alone.replace(step=jnp.int32(step)))
            np.testing.assert_array_equal(members_labels[index], alone_labels)
            for view, alone_view in zip(members_views, alone_views, strict=True):
                np.testing.assert_array_equal(view[index], alone_view)
        assert not np.array_equal(members_labels[0], members_labels[1])


def test_members_differing_in_temperature_and_dt_m_give_the_separate_losses():
    config = framework_config("simco", "smoke", **SMALL)
    config.members = {"temperature": [0.1, 0.2], "dt_m": [1.0, 10.0]}
    _, _, losses = _train_population(config, steps=1)
    for index, member_config in enumerate(config_lib.member_configs(config)):
        _, alone = _train_separately(member_config, config, steps=1)
        np.testing.assert_allclose(losses[index], alone, rtol=1e-6)
    assert len({round(float(row[0]), 4) for row in losses}) == 4  # four objectives


# ------------------------------------------------------------------ through the trainer


def test_population_run_reports_each_member_and_resumes_exactly(tmp_path):
    from helpers import assert_trees_equal, metric_records

    from simco_jax import train, writers

    config = framework_config(
        "simco", "smoke", **SMALL, max_epochs=2, checkpoint_every_steps=2, keep_checkpoints=10
    )
    config.members = {"seed": [0, 1]}
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    records = writers.read_metrics(str(tmp_path / "whole"))
    logged = [r for r in records if "loss_m0" in r]
    assert logged and all("loss_m1" in r and "loss" not in r for r in logged)
    final = [r for r in records if "probe_top1_m0" in r][-1]
    assert "probe_top1_m1" in final and "knn_top1_m0" in final and "knn_top1_m1" in final
    assert whole["state"].rng.shape == (2, 2) and whole["state"].step.shape == ()  # stacked
    # Interrupted after step 4 (max_steps), then resumed: the same state, the same records.
    cut = config.copy_and_resolve_references()
    cut.max_steps = 4
    train.train_and_evaluate(cut, str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert_trees_equal(resumed["state"], whole["state"])
    # After the cut (whose last step also ran the final evaluations), the same records.
    after = lambda records: [r for r in records if r["step"] > 4]  # noqa: E731
    assert after(metric_records(tmp_path / "resumed")) == after(metric_records(tmp_path / "whole"))


def test_a_key_that_cannot_vary_is_refused_in_one_line(tmp_path):
    from helpers import run_python

    path = tmp_path / "members_config.py"
    path.write_text(
        "from configs import simco_cifar\n\n\n"
        "def get_config(arg=None):\n"
        "    config = simco_cifar.get_config(arg)\n"
        "    config.members = {'seed': [0, 1], 'batch_size': [32, 64]}\n"
        "    return config\n"
    )
    result = run_python(
        ["launch.py", f"--config={path}:smoke", f"--workdir={tmp_path / 'run'}"], check=False
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "members.batch_size: batch_size cannot vary" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_population_on_8_devices_is_the_population_on_1(tmp_path):
    """The member axis replicated, the batch axis sharded: the same members' losses."""
    import json

    from helpers import devices_env, run_python

    script = (
        "import json, sys; sys.path.insert(0, 'tests')\n"
        "from helpers import framework_config\n"
        "from simco_jax import train\n"
        "config = framework_config('mocov2', 'smoke', queue_size=64, max_steps=2)\n"
        "config.members = {'seed': [0, 1]}\n"
        "summary = train.train_and_evaluate(config, sys.argv[1])\n"
        "print(json.dumps({k: v for k, v in summary.items() if k.startswith('loss_m')}))\n"
    )
    losses = []
    for count in (1, 8):
        result = run_python(
            ["-c", script, str(tmp_path / str(count))],
            env_extra={"XLA_FLAGS": devices_env(count)["XLA_FLAGS"]},
        )
        losses.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert sorted(losses[0]) == ["loss_m0", "loss_m1"]
    for key, value in losses[0].items():  # two steps: before the chaos of tests above
        assert losses[1][key] == pytest.approx(value, rel=1e-5)


def test_the_linear_evaluation_and_the_export_take_one_member_of_a_population(tmp_path):
    import importlib
    import json

    from helpers import assert_trees_equal

    from simco_jax import checkpointing, export, linear_eval, train

    config = framework_config("simco", "smoke", **SMALL, max_steps=2)
    config.members = {"seed": [0, 1]}
    run = str(tmp_path / "run")
    state = train.train_and_evaluate(config, run)["state"]
    pop = population.Population(config)
    with pytest.raises(
        checkpointing.CheckpointError,
        match=r"population run of 2 members \(0: seed=0; 1: seed=1\); choose one with member=0..1$",
    ):
        checkpointing.restore_run(run)
    restored = checkpointing.restore_run(run, 1)
    assert restored.config.seed == 1 and not restored.config.members and restored.step == 2
    assert_trees_equal(restored.state, pop.member(state, 1))
    # The linear evaluation of member 1: its results named after it, beside the run's.
    linear = importlib.import_module("configs.linear_eval").get_config("smoke")
    linear.update(pretrained=run, member=1, mode="knn")
    results = linear_eval.evaluate_checkpoint(linear, str(tmp_path / "linear_m1"))
    saved = json.loads((tmp_path / "run" / "knn_eval_m1.json").read_text())
    assert saved["member"] == 1 and saved["top1"] == results["knn"]["top1"]
    # The export of member 0 is member 0's encoder.
    tensors = export.export_run(run, str(tmp_path / "m0.safetensors"), member=0)
    member0 = pop.member(state, 0)
    expected = export.export_torch_state_dict(
        jax.tree.map(np.asarray, member0.params),
        jax.tree.map(np.asarray, member0.batch_stats),
        str(tmp_path / "expected.safetensors"),
        backbone=config.backbone,
    )
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
