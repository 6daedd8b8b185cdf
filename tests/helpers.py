"""Shared helpers for the tests: configs of the shipped files at tiny settings, subprocesses,
checkpoints and metrics read back."""

import contextlib
import importlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("simco", "simmoco", "mocov2")
# How long a test waits for a subprocess or a condition before it gives up. Only a hang should
# ever reach it: a cold XLA cache on a loaded 2-core machine makes a smoke run take minutes, so it
# is generous, and it can be raised further on slower machines.
DEADLINE_S = float(os.environ.get("SIMCO_TEST_DEADLINE_S", "1800"))


def framework_config(framework: str, variant: str = "smoke", **overrides):
    config = importlib.import_module(f"configs.{framework}_cifar").get_config(variant)
    config.update(overrides)
    return config


# The reference run (tests/conftest.py's `reference_run`) that every fault must end equal to:
# 256 images / batch 32 = 8 steps per epoch, 32 steps; a checkpoint every 4 steps, all kept.
REFERENCE_OVERRIDES = dict(max_epochs=4, checkpoint_every_steps=4, keep_checkpoints=100)
REFERENCE_STEPS = 32
TIMING_KEYS = ("images_per_s", "eta_s")  # wall-clock measurements: the only metrics that differ


def reference_config(**overrides):
    """The reference run's config (SimCo smoke), with `overrides`."""
    return framework_config("simco", "smoke", **{**REFERENCE_OVERRIDES, **overrides})


def reference_launch_args(workdir, **overrides):
    """launch.py's arguments for the reference run's config, with `overrides` as flags."""
    flags = [f"--config.{k}={v}" for k, v in {**REFERENCE_OVERRIDES, **overrides}.items()]
    return ["launch.py", "--config=configs/simco_cifar.py:smoke", f"--workdir={workdir}", *flags]


def checkpoint_steps(workdir):
    """The steps of the complete checkpoints in `workdir`, ascending."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def saved_state(workdir, step=None):
    """A checkpoint's state as a tree of NumPy arrays, read with plain Orbax (no template)."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), item_names=("state", "record")
    )
    try:
        step = manager.latest_step() if step is None else step
        args = ocp.args.Composite(state=ocp.args.StandardRestore())
        return manager.restore(step, args=args)["state"]
    finally:
        manager.close()


def assert_trees_equal(a, b):
    """Same structure, bit-identical leaves."""
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# Float32 results are bit-reproducible on one kind of CPU, not across kinds: XLA's and Eigen's
# kernels vectorise and block their reductions by the host's instruction set and cache sizes, so
# the last bits differ (and a smoke run's accuracy over 64 images by an image or two). Values
# pinned to show that a change moved no number are therefore recorded once per kind of host, and
# a result must equal one record exactly: a changed computation matches none.
HOST_A = "x86-64 host A"
HOST_AVX512 = "AMD EPYC host with AVX-512"


def assert_equals_a_recorded_host(got, recorded: dict, what: str):
    """`got` equals, bit for bit, one host's value in `recorded` ({host: value}; HOST_A)."""
    if not any(got == value for value in recorded.values()):
        hosts = "; ".join(f"{host}: {value!r}" for host, value in recorded.items())
        raise AssertionError(f"{what} {got!r} equals none of the values recorded ({hosts})")


def metric_records(workdir):
    """The run's metrics without the wall-clock ones, for comparisons bit for bit."""
    from simco_jax import writers

    records = writers.read_metrics(str(workdir))
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def forbid_data_loading(monkeypatch):
    """Makes any loading of the dataset fail the test."""
    from simco_jax import sources

    def load_dataset(config):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(sources, "load_dataset", load_dataset)


def first_batch_setup(config):
    """(components, fresh state, jitted train step, first batch's images, labels) of `config`."""
    import jax
    import jax.numpy as jnp

    from simco_jax import sources, train_step

    dataset = sources.load_dataset(config)
    steps_per_epoch = len(dataset.train_labels) // config.batch_size
    comps = train_step.build_components(config, dataset.num_classes, steps_per_epoch)
    state = train_step.create_train_state(config, comps, dataset.train_images.shape[1:])
    step = jax.jit(train_step.make_train_step(config, comps))
    images = jnp.asarray(dataset.train_images[: config.batch_size])
    labels = jnp.asarray(dataset.train_labels[: config.batch_size], jnp.int32)
    return comps, state, step, images, labels


def devices_env(count: int) -> dict:
    """This environment with `count` simulated CPU devices (for a fresh interpreter), its output
    unbuffered (a log read after a timeout shows how far it got)."""
    return dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
    )


def load_npz(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def tail(text_or_path, chars=4000) -> str:
    """The end of a log (a path) or of captured output (a str or bytes)."""
    if isinstance(text_or_path, str | os.PathLike) and os.path.isfile(text_or_path):
        with open(text_or_path, errors="replace") as f:
            text = f.read()
    elif isinstance(text_or_path, bytes):
        text = text_or_path.decode(errors="replace")
    else:
        text = text_or_path or ""
    return text[-chars:] if text.strip() else "(no output)"


def run_python(args, *, env_extra=None, timeout=None, check=True, **kwargs):
    """Runs `python args...` from the repo root in a fresh interpreter (own XLA flags, signals)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    timeout = DEADLINE_S if timeout is None else timeout
    try:
        result = subprocess.run(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
    except subprocess.TimeoutExpired as error:  # killed; what it printed until then is kept
        pytest.fail(
            f"{args} still running after {timeout:.0f} s (SIMCO_TEST_DEADLINE_S):\n"
            f"{tail(error.stdout)}\n{tail(error.stderr)}",
            pytrace=False,
        )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@contextlib.contextmanager
def launched(args, log_path):
    """A `python args...` child (from the repo root) writing to `log_path`; always killed and
    reaped on the way out."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)


def wait(process, log_path, timeout=None) -> int:
    """The exit status of a subprocess writing to `log_path`; fails with the log's tail if the
    process is still running after `timeout` (default DEADLINE_S)."""
    timeout = DEADLINE_S if timeout is None else timeout
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{process.args} still running after {timeout:.0f} s (SIMCO_TEST_DEADLINE_S):\n"
            f"{tail(log_path)}",
            pytrace=False,
        )


def wait_until(condition, processes, what, timeout=None) -> None:
    """Polls `condition()` until it holds. `processes` are (process, log_path) pairs that must keep
    running meanwhile: one that exits first fails the test with its log's tail."""
    timeout = DEADLINE_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for process, log_path in processes:
            if process.poll() is not None:
                pytest.fail(
                    f"{process.args} exited ({process.returncode}) before {what}:\n"
                    f"{tail(log_path)}",
                    pytrace=False,
                )
        time.sleep(0.05)
    logs = "\n".join(tail(log_path) for _, log_path in processes)
    pytest.fail(f"no {what} within {timeout:.0f} s (SIMCO_TEST_DEADLINE_S):\n{logs}", pytrace=False)
