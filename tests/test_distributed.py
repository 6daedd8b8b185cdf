"""Scale-out: one math on any number of devices and processes; a dead process stops the run;
bfloat16 tracks float32; per-device (multi-GPU PyTorch) semantics match a direct computation.

Simulated devices need XLA_FLAGS before JAX starts, so the multi-device runs are subprocesses:
this file doubles as their worker (`python tests/test_distributed.py OUT_DIR FRAMEWORK...`).
SimCo on 1 vs 8 devices runs by default; the other frameworks and the two-process runs are
`slow` (`python -m pytest -m slow`).
"""

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np

# One smoke run per framework: 3 logged steps (one per dispatch), the final probe evaluation, one
# checkpoint at the end. Every run in this file uses it, so each program compiles once.
OVERRIDES = dict(
    max_steps=3,
    steps_per_dispatch=1,
    log_every_steps=1,
    knn_every_epochs=0,
    checkpoint_every_steps=1000,
)
STEPS = OVERRIDES["max_steps"]
# Float32 reductions (BatchNorm statistics, gradients) are summed in another order when split over
# devices: the first step's loss and gradients agree to ~1e-6 relative. The tiny smoke network
# amplifies such rounding differences step by step (so does rounding its initial parameters), so
# the state is compared by how far training moved it: |Δ8 − Δ1| / |Δ1| per part of the state
# (global norm). After 3 steps that is ~1e-5 for SimMoCo and MoCo v2 but ~5e-3 for SimCo, whose
# symmetric loss with gradient through both branches amplifies fastest; a real error (a wrong
# BatchNorm reduction, a mis-gathered batch) moves it by O(1).
RTOL, ATOL = 2e-4, 2e-5
STATE_PARTS = (
    "params",
    "batch_stats",
    "method_state/momentum_params",
    "method_state/momentum_batch_stats",
    "probe_params",
)
MOVED_RTOL = 2e-2


def _flat(tree) -> dict:
    """Nested dicts of arrays → {'params/backbone/.../kernel': array}; None leaves dropped."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
        for path, v in leaves
    }


def _worker(out_dir: str, frameworks) -> None:
    """Trains each framework with OVERRIDES on this process's devices; dumps losses and state."""
    import flax
    import jax
    from helpers import framework_config

    from simco_jax import parallel, sources, train, train_step, writers

    logging.basicConfig(format="%(asctime)s %(message)s")  # progress in the log a timeout shows
    logging.getLogger("simco_jax").setLevel(logging.INFO)
    for framework in frameworks:
        workdir = os.path.join(out_dir, framework)
        config = framework_config(framework, **OVERRIDES)
        summary = train.train_and_evaluate(config, workdir)
        records = writers.read_metrics(workdir)
        state = flax.serialization.to_state_dict(parallel.to_host(summary["state"]))
        dataset = sources.load_dataset(config)
        comps = train_step.build_components(config, dataset.num_classes, 8)
        init = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
        init = {f"init/{k}": v for k, v in _flat(flax.serialization.to_state_dict(init)).items()}
        np.savez(
            os.path.join(out_dir, f"{framework}.npz"),
            losses=np.array([r["loss"] for r in records if "loss" in r]),
            probe_top1=summary["probe_top1"],
            devices=jax.device_count(),
            **_flat(state),
            **init,
        )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(sys.argv[1], sys.argv[2:])
    sys.exit(0)


import jax  # noqa: E402 - the worker above must not import JAX before its XLA_FLAGS apply
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from helpers import (  # noqa: E402
    DEADLINE_S,
    FRAMEWORKS,
    REPO,
    devices_env,
    framework_config,
    load_npz,
    tail,
    wait,
    wait_until,
)

from simco_jax import augment, methods, models, sources, train_step, writers  # noqa: E402
from simco_jax import config as config_lib  # noqa: E402


@contextlib.contextmanager
def _processes(commands, log_dir, name):
    """Starts each (args, env) in the repo root, output to log files; always kills leftovers."""
    started = []
    try:
        for i, (args, env) in enumerate(commands):
            log_path = os.path.join(log_dir, f"{name}{i}.log")
            with open(log_path, "w") as log:
                process = subprocess.Popen(
                    [sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=log
                )
            started.append((process, log_path))
        yield started
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.kill()
        for process, _ in started:
            process.wait(timeout=60)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(framework) → {1: the run on one device, 8: on eight}, each {losses, probe_top1,
    state leaves}; computed on first use, so the default suite trains SimCo only."""
    runs = {}

    def get(framework):
        if framework not in runs:
            runs[framework] = f"the {framework} reference run failed: see the first failure"
            root = tmp_path_factory.mktemp(f"devices_{framework}")
            commands = []
            for count in (1, 8):
                os.makedirs(root / str(count))
                args = [__file__, str(root / str(count)), framework]
                commands.append((args, devices_env(count)))
            with _processes(commands, str(root), "devices") as started:  # both at once: 2 cores
                for process, log_path in started:
                    if wait(process, log_path) != 0:
                        pytest.fail(f"{process.args} failed:\n{tail(log_path)}", pytrace=False)
            runs[framework] = {c: load_npz(root / str(c) / f"{framework}.npz") for c in (1, 8)}
        if isinstance(runs[framework], str):  # failed once: report it once, briefly after
            pytest.fail(runs[framework], pytrace=False)
        return runs[framework]

    return get


def _assert_moved_alike(actual: dict, expected: dict):
    """Each part of the state moved from its initial value as the expected one did."""
    compared = 0
    for part in STATE_PARTS:
        keys = [k for k in expected if k.startswith(f"{part}/")]
        if not keys:
            continue
        moved = np.sqrt(sum(np.sum((expected[k] - expected[f"init/{k}"]) ** 2) for k in keys))
        apart = np.sqrt(sum(np.sum((actual[k] - expected[k]) ** 2) for k in keys))
        assert moved > 0, part
        assert apart <= MOVED_RTOL * moved, (part, apart / moved)
        compared += 1
    return compared


@pytest.mark.parametrize(
    "framework",
    [fw if fw == "simco" else pytest.param(fw, marks=pytest.mark.slow) for fw in FRAMEWORKS],
)
def test_one_and_eight_devices_train_the_same(reference, framework):
    one, eight = reference(framework)[1], reference(framework)[8]
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    assert one["losses"].shape == (STEPS,) and np.all(np.isfinite(one["losses"]))
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(eight["probe_top1"], one["probe_top1"])
    assert int(eight["step"]) == int(one["step"]) == STEPS
    # Every part of the state, the momentum encoder's included; MoCo v2's queue holds the keys.
    parts = _assert_moved_alike(eight, one)
    assert parts == (3 if framework == "simco" else 5)
    if framework == "mocov2":
        np.testing.assert_allclose(
            eight["method_state/queue"], one["method_state/queue"], rtol=RTOL, atol=ATOL
        )


# ------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_commands(workdir, *, max_steps=STEPS, heartbeat_s=None):
    overrides = {**OVERRIDES, "max_steps": max_steps}
    port = _free_port()
    base = [
        "launch.py",
        "--config=configs/simco_cifar.py:smoke",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in overrides.items()),
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--initialization_timeout_s={DEADLINE_S:.0f}",  # one process may start minutes late
        *([f"--heartbeat_timeout_s={heartbeat_s}"] if heartbeat_s else []),
    ]
    return [([*base, f"--process_id={i}"], devices_env(4)) for i in range(2)]


def _wait_for_first_loss(workdir, started):
    metrics = os.path.join(workdir, "metrics.jsonl")
    wait_until(
        lambda: os.path.exists(metrics) and os.path.getsize(metrics), started, "the first loss"
    )


def _checkpoint(workdir):
    """(saved steps, the latest state as flat NumPy leaves). The checkpoint records its 8-device
    sharding, which this 1-device process lacks: the target puts every leaf on this device."""
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
    path = os.path.abspath(os.path.join(directory, str(steps[-1]), "state"))
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        metadata,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )
    return steps, _flat(checkpointer.restore(path, target))


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_after_a_preemption(reference, tmp_path):
    """2 processes × 4 CPU devices: SIGTERM to process 1 alone stops both at the same step with a
    checkpoint; the relaunch resumes; the whole run equals the single-process 8-device run."""
    workdir = str(tmp_path / "run")
    expected = reference("simco")[8]

    # Leg 1: preempt process 1 only, once training runs. Both must agree on the step and save.
    with _processes(_two_process_commands(workdir), str(tmp_path), "leg1_") as started:
        _wait_for_first_loss(workdir, started)
        started[1][0].send_signal(signal.SIGTERM)
        for process, log_path in started:
            assert wait(process, log_path) == 143, tail(log_path)
    log0, log1 = (tail(tmp_path / f"leg1_{i}.log", 10**6) for i in range(2))
    assert "on 8 devices; fresh start" in log0
    stopped = int(re.search(rf"preempted: saved the checkpoint of step (\d+)/{STEPS}", log0)[1])
    assert 1 <= stopped < STEPS
    assert _checkpoint(workdir)[0] == [stopped]

    # Leg 2: the same command resumes from that checkpoint and finishes.
    with _processes(_two_process_commands(workdir), str(tmp_path), "leg2_") as started:
        for process, log_path in started:
            assert wait(process, log_path) == 0, tail(log_path)
    log0, log1 = (tail(tmp_path / f"leg2_{i}.log", 10**6) for i in range(2))
    assert f"resumed at step {stopped}" in log0

    # Only process 0 writes: one metrics record per step over both legs, no progress lines on 1.
    records = writers.read_metrics(workdir)
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert loss_steps == list(range(1, STEPS + 1))
    progress_line = r"train \d+/\d+ epoch [\d.]+/\d+ \||eval at epoch"
    assert re.search(progress_line, log0) and not re.search(progress_line, log1)
    losses = np.array([r["loss"] for r in records if "loss" in r])
    np.testing.assert_allclose(losses, expected["losses"], rtol=RTOL, atol=ATOL)
    # Evaluation gathered over both processes' devices gives the single-process accuracy.
    final_eval = [r for r in records if "probe_top1" in r][-1]
    assert final_eval["step"] == STEPS
    np.testing.assert_allclose(final_eval["probe_top1"], expected["probe_top1"])
    # The checkpoint both processes wrote holds the single-process final state.
    steps, state = _checkpoint(workdir)
    assert steps[-1] == STEPS
    assert _assert_moved_alike(state, expected) == 3


@pytest.mark.slow
def test_a_dead_process_stops_the_other_with_an_error(tmp_path):
    """kill -9 of process 1 mid-run: process 0 exits non-zero, saying why, instead of hanging.

    With a 5 s heartbeat it stops within seconds on an idle machine; the test waits up to
    DEADLINE_S (a hang fails it), and asserts no wall-clock bound that load could break."""
    workdir = str(tmp_path / "run")
    commands = _two_process_commands(workdir, max_steps=64, heartbeat_s=5)
    with _processes(commands, str(tmp_path), "kill_") as started:
        _wait_for_first_loss(workdir, started)
        (survivor, survivor_log), (victim, _) = started
        victim.send_signal(signal.SIGKILL)
        returncode = wait(survivor, survivor_log)
    output = tail(survivor_log, 20000)
    assert returncode != 0, output
    # Ours when the failure surfaces in a collective; JAX's when the heartbeat times out first.
    assert re.search(r"one of them died|another task died", output), output


# ------------------------------------------------------------------------------ mixed precision


def _training(dtype):
    """(initial state, jitted step, components, batches) of the smoke SimCo run in `dtype`."""
    config = framework_config("simco", dtype=dtype)
    dataset = sources.load_dataset(config)
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    comps = train_step.build_components(config, dataset.num_classes, steps_per_epoch)
    state = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
    batches = [
        (jnp.asarray(images), jnp.asarray(labels, jnp.int32))
        for images, labels in zip(
            np.split(dataset.train_images, steps_per_epoch),
            np.split(dataset.train_labels, steps_per_epoch),
            strict=True,
        )
    ]
    return state, jax.jit(train_step.make_train_step(config, comps)), comps, batches


def _losses(state, step, batches):
    losses = []
    for images, labels in batches:
        state, metrics = step(state, images, labels)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_bfloat16_training_stays_finite_and_tracks_float32():
    """One epoch (8 steps) of smoke SimCo in bfloat16 against float32.

    A few steps of this tiny network amplify any perturbation: rounding only the *initial*
    parameters to bfloat16 already moves the float32 losses of later steps by ~0.03 (while step 1
    moves by ~0.002). So "tracks" is measured against that yardstick: computing every step in
    bfloat16 may perturb the losses by at most 3× what bfloat16 rounding of the start does.
    """
    f32_state, f32_step, _, batches = _training("float32")
    f32, _ = _losses(f32_state, f32_step, batches)
    rounded = f32_state.replace(
        params=jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), f32_state.params)
    )
    yardstick, _ = _losses(rounded, f32_step, batches)
    bf16_state, bf16_step, comps, _ = _training("bfloat16")
    bf16, state = _losses(bf16_state, bf16_step, batches)

    assert np.all(np.isfinite(bf16))
    # Step 1 sees identical parameters: only the forward pass's rounding differs. bfloat16 keeps
    # 8 significant bits (relative error 2^-9 per op); the cosine logits carry ~1e-3 absolute
    # error after normalisation, and a loss of ~3.6 then moves by ~1e-3: 0.01 leaves 10×.
    assert abs(bf16[0] - f32[0]) < 0.01
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    assert rms(bf16 - f32) <= 3 * rms(yardstick - f32), (bf16 - f32, yardstick - f32)
    assert abs(bf16.mean() - f32.mean()) < 0.05  # the epoch's mean loss: the training level
    # Compute in bfloat16, but parameters and optimizer state stay float32.
    leaves = jax.tree.leaves((state.params, state.opt_state, state.batch_stats))
    floats = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    # ... and the network computes in bfloat16: its outputs (cast up to float32 at the end) are
    # bfloat16 numbers, which float32 compute would essentially never produce.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    for model, expect_bf16 in ((comps.model, True), (comps.model.clone(dtype=jnp.float32), False)):
        projections = model.apply(variables, images, train=False)[1]
        exact = projections == projections.astype(jnp.bfloat16).astype(projections.dtype)
        assert bool(jnp.all(exact)) == expect_bf16


def test_dtype_auto_is_float32_on_cpu():
    assert train_step.resolve_dtype("auto") == (
        jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    )


# --------------------------------------------------------------------------- per-device semantics

TINY = dict(crop_size=8, synthetic_image_size=8, backbone_width=4, proj_hidden_dim=8)


def _tiny_model(**overrides):
    config = framework_config("simco", **TINY, **overrides)
    model = models.create_encoder(config)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)), train=False)
    return model, variables["params"], variables["batch_stats"]


def _images(batch, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, 8, 8, 3))


def _direct_group_bn(model, params, batch_stats, images, groups):
    """Each sub-batch through the model on its own; running statistics averaged."""
    feats, projs, stats = [], [], []
    for chunk in jnp.split(images, groups):
        (f, p), updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, chunk, train=True, mutable="batch_stats"
        )
        feats.append(f)
        projs.append(p / jnp.linalg.norm(p, axis=-1, keepdims=True))
        stats.append(updates["batch_stats"])
    mean_stats = jax.tree.map(lambda *s: sum(s) / groups, *stats)
    return jnp.concatenate(feats), jnp.concatenate(projs), mean_stats


def _assert_trees_close(a, b, **tolerances):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tolerances)


def test_group_batchnorm_equals_separate_sub_batches():
    model, params, batch_stats = _tiny_model()
    images = _images(8)
    got = methods.encode(model, params, batch_stats, images, groups=4)
    _assert_trees_close(got, _direct_group_bn(model, params, batch_stats, images, 4), atol=1e-5)
    # The default is one group: statistics over the global batch, which differ.
    global_features = methods.encode(model, params, batch_stats, images)[0]
    assert not np.allclose(global_features, got[0], atol=1e-3)


def test_shuffle_bn_equals_group_bn_of_the_permuted_batch_in_the_original_order():
    model, params, batch_stats = _tiny_model()
    images = _images(8)
    perm = jnp.array([5, 2, 7, 0, 3, 6, 1, 4])
    keys, stats = methods.shuffled_encode(model, params, batch_stats, images, perm, groups=2)
    # Direct: sub-batch 0 is images 5, 2, 7, 0; sub-batch 1 is images 3, 6, 1, 4.
    _, permuted_keys, direct_stats = _direct_group_bn(model, params, batch_stats, images[perm], 2)
    direct = np.zeros_like(permuted_keys)
    direct[np.asarray(perm)] = permuted_keys  # image perm[i]'s key is row i of the permuted run
    np.testing.assert_allclose(keys, direct, atol=1e-5)
    _assert_trees_close(stats, direct_stats, atol=1e-5)
    unshuffled = methods.encode(model, params, batch_stats, images, groups=2)[1]
    assert not np.allclose(keys, unshuffled, atol=1e-3)  # the shuffle changes the statistics


def _fixed_views(key, images, params):
    """Deterministic per-image views: each image's views do not depend on its batch."""
    del key
    x = augment.normalize(images, params)
    return x, x[:, :, ::-1] * 0.9


def test_step_keys_under_shuffle_bn_are_the_direct_computation(monkeypatch):
    """MoCo v2 with ShuffleBN: the queued keys are group-BN keys of the step's own permutation."""
    monkeypatch.setattr(augment, "two_views", _fixed_views)
    config = framework_config(
        "mocov2", **TINY, batch_size=8, queue_size=16, bn_groups=2, shuffle_bn=True
    )
    config_lib.validate(config)
    comps = train_step.build_components(config, 10, 4)
    state = train_step.create_train_state(config, comps, (8, 8, 3))
    used = []

    def spy(model, params, batch_stats, images, perm, *, groups):
        jax.debug.callback(lambda p: used.append(np.asarray(p)), perm)
        return original(model, params, batch_stats, images, perm, groups=groups)

    original = methods.shuffled_encode
    monkeypatch.setattr(methods, "shuffled_encode", spy)
    images = (np.arange(8 * 8 * 8 * 3).reshape(8, 8, 8, 3) * 37 % 256).astype(np.uint8)
    new_state, _ = jax.jit(train_step.make_train_step(config, comps))(
        state, images, jnp.zeros(8, jnp.int32)
    )
    jax.effects_barrier()
    # Both views pass the key encoder (as the official code), each with its own permutation;
    # view 2's keys are the queued ones. (Callbacks need not run in program order: try both.)
    assert len(used) == 2 and not np.array_equal(used[0], used[1])
    view2 = _fixed_views(None, jnp.asarray(images), comps.aug)[1]
    errors = []
    for perm in used:
        assert sorted(perm) == list(range(8)) and list(perm) != list(range(8))
        _, permuted_keys, _ = _direct_group_bn(
            comps.model,
            state.method_state["momentum_params"],
            state.method_state["momentum_batch_stats"],
            view2[perm],
            2,
        )
        direct = np.zeros_like(permuted_keys)
        direct[perm] = permuted_keys
        errors.append(np.abs(np.asarray(new_state.method_state["queue"][:8]) - direct).max())
    assert min(errors) < 1e-5 < max(errors), errors


def _first_step_losses(config, *batches):
    """The loss of one train step from the initial state, for each batch (one compilation)."""
    comps = train_step.build_components(config, 10, 4)
    state = train_step.create_train_state(config, comps, batches[0].shape[1:])
    step = jax.jit(train_step.make_train_step(config, comps))
    labels = jnp.zeros(len(batches[0]), jnp.int32)
    return [float(step(state, images, labels)[1]["loss"]) for images in batches]


def test_per_device_negatives_and_bn_equal_the_mean_of_separate_sub_batch_steps(monkeypatch):
    """SimCo with bn_groups = negative_groups = 2 on 16 images is two 8-image SimCo steps."""
    monkeypatch.setattr(augment, "two_views", _fixed_views)
    images = (np.arange(16 * 8 * 8 * 3).reshape(16, 8, 8, 3) * 53 % 256).astype(np.uint8)
    (grouped,) = _first_step_losses(
        framework_config("simco", **TINY, batch_size=16, bn_groups=2, negative_groups=2), images
    )
    ungrouped = framework_config("simco", **TINY, batch_size=8)
    halves = _first_step_losses(ungrouped, *np.split(images, 2))
    np.testing.assert_allclose(grouped, np.mean(halves), rtol=1e-5)
    # The default is global-batch semantics (global BatchNorm and negatives: the encode test and
    # tests/test_losses.py show that they differ from the grouped ones).
    base = config_lib.base_config()
    assert (base.bn_groups, base.negative_groups, base.shuffle_bn) == (1, 1, False)
