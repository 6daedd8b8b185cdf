"""checkpointing: what a resume reads and prints, a `checkpoints` path that is not a directory,
the library noise that must not bury a checkpoint's one-line warning or error, and checkpoints
of earlier releases' train state layout."""

import asyncio
import logging
import os
import sys
import types
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import framework_config, run_python

from simco_jax import checkpointing, train_step

# What Orbax logs for a read-only manager: it reads like a permissions problem on every resume.
READ_ONLY_WARNINGS = (
    "setting save_interval_steps=0",
    "setting create=False",
    "Given directory is read only",
)


def _saved(directory, steps=(4,)):
    ckpt = checkpointing.Checkpointer(str(directory), {"queue_size": 0})
    for step in steps:
        ckpt.save(step, {"w": np.full(3, step, np.float32)})
    ckpt.close()


def test_reading_the_latest_record_logs_no_read_only_warnings(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    _saved(directory, steps=(4, 8))
    caplog.set_level(logging.DEBUG)
    assert checkpointing.latest_record(str(directory)) == (8, {"queue_size": 0})
    assert not [m for m in READ_ONLY_WARNINGS if m in caplog.text], caplog.text
    assert sorted(os.listdir(directory)) == ["4", "8"]  # read only: nothing written


@pytest.mark.parametrize("kind", ["file", "dangling link", "link to a file"])
def test_a_checkpoints_path_that_is_not_a_directory_is_refused_before_anything_runs(tmp_path, kind):
    path = tmp_path / "checkpoints"
    if kind == "file":
        path.write_text("not a directory")
        what = "not a directory"
    elif kind == "dangling link":
        os.symlink(tmp_path / "gone", path)
        what = f"a link to '{tmp_path / 'gone'}', which is not a directory"
    else:
        (tmp_path / "file").write_text("x")
        os.symlink(tmp_path / "file", path)
        what = f"a link to '{tmp_path / 'file'}', which is not a directory"
    before = sorted(os.listdir(tmp_path))
    expected = (
        f"{path} is {what}; the checkpoints go there. Move it away, or use another --workdir."
    )
    with pytest.raises(checkpointing.CheckpointError) as raised:
        checkpointing.latest_record(str(path))
    assert str(raised.value) == expected
    with pytest.raises(checkpointing.CheckpointError) as raised:
        checkpointing.Checkpointer(str(path), {})
    assert str(raised.value) == expected
    assert sorted(os.listdir(tmp_path)) == before  # nothing created or moved


def test_an_error_right_after_opening_the_checkpoints_exits_without_a_thread_traceback(tmp_path):
    # Orbax cleans up temporary steps in a background thread; an error that ends the process
    # right after the manager opens (no readable checkpoint) used to leave that thread to fail
    # at interpreter shutdown with a traceback after the one-line error.
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    script = (
        "import asyncio, sys\n"
        "from orbax.checkpoint._src.path import async_path\n"
        "from simco_jax import checkpointing\n"
        "exists = async_path.exists\n"
        "async def slow_exists(path):  # the clean-up still running when the error comes\n"
        "    await asyncio.sleep(1)\n"
        "    return await exists(path)\n"
        "async_path.exists = slow_exists\n"
        f"ckpt = checkpointing.Checkpointer({str(directory)!r}, {{}})\n"
        "ckpt.close()\n"
        "sys.exit('error: no readable checkpoint')\n"
    )
    result = run_python(["-c", script], check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: no readable checkpoint", result.stderr


def _closed_loop_callback():
    """The unraisable report of a callback into a closed asyncio loop, as tensorstore makes it."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as error:
        return types.SimpleNamespace(
            exc_type=RuntimeError,
            exc_value=error,
            exc_traceback=error.__traceback__,
            err_msg=None,
            object=None,
        )
    raise AssertionError("a closed loop accepted a callback")


def _other_unraisable(message):
    try:
        raise RuntimeError(message)
    except RuntimeError as error:
        return types.SimpleNamespace(
            exc_type=RuntimeError,
            exc_value=error,
            exc_traceback=error.__traceback__,
            err_msg=None,
            object=None,
        )


def test_callbacks_into_a_closed_loop_are_silenced_and_nothing_else(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    checkpointing._quiet_closed_loop_callbacks()
    checkpointing._quiet_closed_loop_callbacks()  # installed once
    sys.unraisablehook(_closed_loop_callback())
    assert reported == []
    # The same message from anywhere else, and any other error, is still reported.
    for other in (_other_unraisable("Event loop is closed"), _other_unraisable("real")):
        sys.unraisablehook(other)
    assert [str(u.exc_value) for u in reported] == ["Event loop is closed", "real"]


# ---------------------------------- checkpoints of earlier releases' train state still restore


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
