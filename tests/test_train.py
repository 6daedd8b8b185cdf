"""The train step and the trainer: every framework trains, the parts do what the paper says."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FRAMEWORKS, framework_config, run_python
from test_progress import TRAIN_LINE

from simco_jax import checkpointing, data, methods, sources, train, train_step, writers


def _tiny(framework="simco", **overrides):
    return framework_config(framework, "smoke", **overrides)


def _setup(config):
    dataset = sources.load_dataset(config)
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    comps = train_step.build_components(config, dataset.num_classes, steps_per_epoch)
    state = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
    step = jax.jit(train_step.make_train_step(config, comps))
    batch = (
        jnp.asarray(dataset.train_images[: config.batch_size]),
        jnp.asarray(dataset.train_labels[: config.batch_size], jnp.int32),
    )
    return state, step, batch


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_smoke_run_through_launch_leaves_checkpoint_and_metrics(framework, tmp_path):
    workdir = tmp_path / framework
    result = run_python(
        ["launch.py", f"--config=configs/{framework}_cifar.py:smoke", f"--workdir={workdir}"]
    )
    records = writers.read_metrics(str(workdir))
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    # One convention: accuracies in percent; τ only for the frameworks with a momentum encoder.
    logged = [r for r in records if "loss" in r]
    assert all(0.0 <= r["probe_train_top1"] <= 100.0 and "probe_acc" not in r for r in logged)
    assert all(("tau" in r) == (framework != "simco") for r in logged)
    # Not a terminal: plain progress lines, at least at each epoch end, with the logged loss.
    lines = [m.groupdict() for m in map(TRAIN_LINE.search, result.stderr.splitlines()) if m]
    at_epoch_ends = {line["step"]: line for line in lines if line["step"] in ("8", "16")}
    assert sorted(at_epoch_ends) == ["16", "8"]
    for line in at_epoch_ends.values():
        assert line["total"] == "16" and line["speed"] != "?" and line["eta"] != "?"
        assert float(line["loss"]) == pytest.approx(
            [r["loss"] for r in logged if r["step"] == int(line["step"])][0], abs=1e-4
        )
    assert "eval at epoch 2: {" in result.stderr
    final = [r for r in records if "probe_top1" in r][-1]
    assert 0.0 <= final["probe_top1"] <= final["probe_top5"] <= 100.0
    assert "knn_top1" in final
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert steps and steps[-1] == 16  # 256 images / batch 32 × 2 epochs
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "synthetic"
    assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_loss_falls_on_a_fixed_batch(framework):
    # No augmentation randomness beyond the crop of the full image: the same two views each step.
    config = _tiny(
        framework,
        min_scale=1.0,
        color_jitter_prob=0.0,
        gray_scale_prob=0.0,
        horizontal_flip_prob=0.0,
        warmup_epochs=0,
        lr=0.5,
        queue_size=0 if framework != "mocov2" else 64,
        base_tau_momentum=0.9,
        final_tau_momentum=0.9,
    )
    state, step, (images, labels) = _setup(config)
    losses = []
    for _ in range(12):
        state, metrics = step(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses


@pytest.mark.parametrize("tau, expect", [(0.0, "online"), (1.0, "unchanged")])
def test_momentum_update_of_params_only(tau, expect):
    config = _tiny("simmoco", base_tau_momentum=tau, final_tau_momentum=tau)
    state, step, (images, labels) = _setup(config)
    new_state, _ = step(state, images, labels)
    target = new_state.params if expect == "online" else state.method_state["momentum_params"]
    momentum = new_state.method_state["momentum_params"]
    jax.tree.map(np.testing.assert_array_equal, momentum, target)
    # The online parameters did move, so the check above is not vacuous.
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, state.params)
    assert any(jax.tree.leaves(moved))
    # The key encoder's BatchNorm statistics come from its own forward passes, not from the EMA.
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)),
        new_state.method_state["momentum_batch_stats"],
        state.method_state["momentum_batch_stats"],
    )
    assert all(jax.tree.leaves(changed))


def test_queue_holds_the_last_k_keys_in_order():
    size, batch = 8, 2
    queue = jnp.zeros((size, 3))
    ptr = jnp.zeros((), jnp.int32)
    pushed = []
    for i in range(size // batch + 2):
        keys = jnp.full((batch, 3), float(i)) + jnp.arange(batch)[:, None] / 10
        pushed.append(keys)
        queue, ptr = methods.enqueue(queue, ptr, keys)
    last = np.concatenate(pushed)[-size:]
    # Read the ring from the oldest slot: exactly the last K keys, oldest first.
    np.testing.assert_array_equal(np.roll(np.asarray(queue), -int(ptr), axis=0), last)
    assert int(ptr) == (len(pushed) * batch) % size


def test_train_step_enqueues_this_steps_keys():
    config = _tiny("mocov2", queue_size=64)
    state, step, (images, labels) = _setup(config)
    steps = 64 // config.batch_size + 2
    history = [np.asarray(state.method_state["queue"])]
    for _ in range(steps):
        state, _ = step(state, images, labels)
        history.append(np.asarray(state.method_state["queue"]))
    b = config.batch_size
    assert int(state.method_state["queue_ptr"]) == (steps * b) % 64
    # Each step rewrote exactly one slot of B rows with unit-norm keys and left the rest alone.
    for i in range(1, steps + 1):
        slot = slice(((i - 1) * b) % 64, ((i - 1) * b) % 64 + b)
        rest = np.ones(64, bool)
        rest[slot] = False
        np.testing.assert_array_equal(history[i][rest], history[i - 1][rest])
        assert not np.array_equal(history[i][slot], history[i - 1][slot])
        np.testing.assert_allclose(np.linalg.norm(history[i][slot], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(momentum_encoder=True, queue_size=0, dt_m=10.0, symmetric=True),  # symmetric SimMoCo
        dict(momentum_encoder=True, queue_size=64, dt_m=10.0, symmetric=False),  # MoCo v2 + DT
        dict(momentum_encoder=True, queue_size=64, dt_m=1.0, symmetric=True),  # MoCo v2+
        dict(momentum_encoder=False, queue_size=64, dt_m=10.0, symmetric=True),  # SimCo + queue
        dict(momentum_encoder=False, queue_size=0, dt_m=1.0, symmetric=False),  # one-way InfoNCE
    ],
)
def test_every_mix_of_the_switches_trains(overrides):
    config = _tiny("simco", **overrides)
    state, step, (images, labels) = _setup(config)
    for _ in range(2):
        state, metrics = step(state, images, labels)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 2


def _run(config, workdir):
    summary = train.train_and_evaluate(config, str(workdir))
    return summary.pop("state"), summary


def test_resume_equals_uninterrupted(tmp_path):
    config = _tiny("simmoco", queue_size=64, max_epochs=2)
    full_state, _ = _run(config, tmp_path / "full")
    first = _tiny("simmoco", queue_size=64, max_epochs=2, max_steps=5)
    stopped, _ = _run(first, tmp_path / "resumed")
    assert int(stopped.step) == 5
    resumed_state, _ = _run(config, tmp_path / "resumed")
    assert int(resumed_state.step) == int(full_state.step) == 16
    jax.tree.map(np.testing.assert_array_equal, resumed_state, full_state)
    full = [r for r in writers.read_metrics(str(tmp_path / "full")) if "probe_top1" in r][-1]
    again = [r for r in writers.read_metrics(str(tmp_path / "resumed")) if "probe_top1" in r][-1]
    assert full["probe_top1"] == again["probe_top1"] and full["knn_top1"] == again["knn_top1"]


def test_npz_dataset_trains(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (96, 16, 16, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 5, 96).astype(np.int64),
        test_images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 5, 40).astype(np.int64),
    )
    config = _tiny("simco", dataset="npz", data_path=str(path), max_epochs=1)
    state, summary = _run(config, tmp_path / "run")
    assert int(state.step) == 96 // 32
    assert state.probe_params["linear"]["kernel"].shape[-1] == 5
    assert 0 <= summary["probe_top1"] <= 100


def test_tfds_dataset_trains_under_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    # mock_data leaves builders "unprepared" and makes the download a no-op; let it through.
    monkeypatch.setattr(data, "any_host_reachable", lambda *args, **kwargs: True)
    config = _tiny("simco", dataset="cifar10", max_epochs=1, crop_size=32)
    with tfds.testing.mock_data(num_examples=64):
        state, summary = _run(config, tmp_path / "run")
    assert int(state.step) == 64 // 32
    assert state.probe_params["linear"]["kernel"].shape[-1] == 10


def test_incompatible_checkpoint_is_refused(tmp_path):
    _run(_tiny("simmoco", max_steps=2), tmp_path / "run")
    with pytest.raises(checkpointing.CheckpointError, match="queue_size"):
        _run(_tiny("simmoco", queue_size=64, max_steps=4), tmp_path / "run")
