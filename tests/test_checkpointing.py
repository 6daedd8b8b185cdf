"""checkpointing: what a resume reads and prints, a `checkpoints` path that is not a directory,
the library noise that must not bury a checkpoint's one-line warning or error, and checkpoints
of earlier releases' train state layout."""

import asyncio
import contextlib
import gc
import logging
import os
import re
import shutil
import subprocess
import sys
import types
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_trees_equal,
    checkpoint_steps,
    forbid_data_loading,
    framework_config,
    reference_config,
    run_python,
    saved_state,
)

from simco_jax import checkpointing, train, train_step
from simco_jax import config as config_lib

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


def _abandon_a_failed_read():
    """A failed asyncio task whose error nobody retrieves, kept alive by a reference cycle until
    a garbage collection, as Orbax leaves each read of a damaged checkpoint after the first that
    fails: asyncio then logs "Task exception was never retrieved" with its traceback."""

    async def read():
        raise ValueError("DATA_LOSS: checksum verification failed")

    async def main():
        task = asyncio.ensure_future(read())
        await asyncio.sleep(0)
        cycle = [task]
        cycle.append(cycle)

    asyncio.run(main())


def _unretrieved_reports(caplog):
    return [r for r in caplog.records if "exception was never retrieved" in r.getMessage()]


def test_reads_abandoned_by_a_failed_restore_are_not_reported(caplog):
    gc.disable()  # the collection at the end of the block is what must report them, unheard
    try:
        with checkpointing._abandoned_reads_unreported(failed=["a read"]):
            _abandon_a_failed_read()
        gc.collect()
        assert _unretrieved_reports(caplog) == []
        # Outside the block, asyncio reports them as before.
        _abandon_a_failed_read()
        gc.collect()
        assert len(_unretrieved_reports(caplog)) == 1
    finally:
        gc.enable()


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


# ------------------------------------------------------------ checkpointing.py: what a check
def test_checkpoint_of_another_model_is_refused(reference_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0] / "checkpoints", workdir / "checkpoints")
    config = reference_config(backbone_width=8, queue_size=64)
    expected = (
        r"step 32\) of an incompatible config \(backbone_width: 4 in the checkpoint, 8 now, "
        r"queue_size: 0 in the checkpoint, 64 now\). Use a fresh --workdir"
    )
    with pytest.raises(checkpointing.CheckpointError, match=expected):
        train.train_and_evaluate(config, str(workdir))
    assert checkpoint_steps(workdir) == list(range(4, 33, 4))  # nothing was overwritten


def _truncate_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)


def _flip_a_byte_in_the_data(directory):
    flipped = 0
    for root, _, files in os.walk(directory):
        if os.path.basename(root) != "d":  # OCDBT data files; the metadata stays readable
            continue
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.seek(os.path.getsize(f.name) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
                flipped += 1
    assert flipped


# Orbax's failed async reads leave an asyncio callback on a closed loop: noise, not an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupted_and_partial_checkpoints_fall_back_with_a_warning(
    reference_run, tmp_path, caplog
):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    ckpts = workdir / "checkpoints"
    # A crash while saving step 28 leaves Orbax's temporary dir; step 32 was never written.
    shutil.rmtree(ckpts / "32")
    os.rename(ckpts / "28", ckpts / "28.orbax-checkpoint-tmp")
    _truncate_files(ckpts / "24" / "state")  # a truncated checkpoint
    _flip_a_byte_in_the_data(ckpts / "20" / "state")  # silent bit rot, caught by checksums

    caplog.set_level(logging.INFO, logger="simco_jax")
    summary = train.train_and_evaluate(reference_config(), str(workdir))

    for step in (24, 20):
        assert re.search(
            rf"checkpoint at step {step} in .* cannot be read .* falling back to the previous",
            caplog.text,
        )
    assert "resumed at step 16" in caplog.text
    assert sorted(os.listdir(workdir / "unreadable_checkpoints"))[0].startswith("20_")
    assert len(os.listdir(workdir / "unreadable_checkpoints")) == 2  # set aside, not deleted
    assert sorted(os.listdir(ckpts), key=int) == [str(s) for s in range(4, 33, 4)]
    assert_trees_equal(summary["state"], reference_run[1])
    assert_trees_equal(saved_state(workdir), saved_state(reference_run[0]))


def test_preemption_right_after_a_periodic_checkpoint_saves_once(tmp_path):
    # SIGTERM arriving in a chunk that ends on a checkpoint step asks for the same step twice;
    # Orbax alone would raise StepAlreadyExistsError on the way out and lose the exit code.
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), {"queue_size": 0})
    ckpt.save(4, {"w": np.ones(3, np.float32)})
    ckpt.save(4, {"w": np.zeros(3, np.float32)})
    ckpt.close()
    assert checkpoint_steps(tmp_path) == [4]
    np.testing.assert_array_equal(saved_state(tmp_path)["w"], np.ones(3, np.float32))


def test_resume_with_a_changed_batch_is_refused_before_any_data_and_touches_nothing(
    reference_run, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "32")  # a run with its schedule left to run
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    forbid_data_loading(monkeypatch)
    for overrides, expected in [
        (
            dict(batch_size=64, seed=99),
            r"batch_size: 32 in the checkpoint, 64 now, seed: 15 in the checkpoint, 99 now",
        ),
        (dict(max_epochs=8), "max_epochs: 4 in the checkpoint, 8 now"),  # the cosine's span
        (dict(lr=0.1, temperature=0.2), "temperature: 0.1 in the checkpoint, 0.2 now, lr: "),
        (dict(dataset="cifar10"), "dataset: 'synthetic' in the checkpoint, 'cifar10' now"),
    ]:
        with pytest.raises(checkpointing.CheckpointError) as raised:
            train.train_and_evaluate(reference_config(**overrides), str(workdir))
        message = str(raised.value)
        assert "\n" not in message and re.search(expected, message), message
        assert message.startswith(f"{workdir}/checkpoints holds a checkpoint (step 28) of an ")
    # config.json, configs/, checkpoints, metrics: byte for byte as they were; no lock left.
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_checkpoint_record_names_the_data_and_accepts_a_moved_file(tmp_path):
    saved = {"batch_size": 32, "data_path": "/old/a.npz", "train_data": "64 images, crc32 1"}
    refused, accepted = checkpointing.changes(
        saved, {"batch_size": 32, "data_path": "/new/a.npz", "train_data": "64 images, crc32 1"}
    )
    assert refused == {} and accepted == {"data_path": ("/old/a.npz", "/new/a.npz")}
    refused, _ = checkpointing.changes(saved, {**saved, "train_data": "64 images, crc32 2"})
    assert refused == {"train_data": ("64 images, crc32 1", "64 images, crc32 2")}
    images = np.zeros((64, 4, 4, 3), np.uint8)
    labels = np.arange(64) % 4
    same = checkpointing.data_identity(images, labels)
    assert same == checkpointing.data_identity(images.copy(), labels.copy())
    assert same != checkpointing.data_identity(images, np.roll(labels, 1))
    # Every config key is compared unless it is declared resumable.
    resumable = checkpointing.RESUMABLE_KEYS
    assert resumable <= set(config_lib.base_config().keys())
    assert {"batch_size", "seed", "max_epochs", "lr", "dataset"}.isdisjoint(resumable)


def test_full_disk_fails_the_save_that_does_not_fit(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    ckpt = checkpointing.Checkpointer(str(directory), {"queue_size": 0})
    ckpt.save(4, {"w": np.ones(3, np.float32)})
    free = os.statvfs(str(directory))

    class Full:
        f_frsize, f_bavail = free.f_frsize, 1  # one block left

    monkeypatch.setattr(checkpointing.os, "statvfs", lambda path: Full)
    with pytest.raises(checkpointing.CheckpointSaveError) as raised:
        ckpt.save(8, {"w": np.zeros(3, np.float32)})
    assert str(raised.value) == (
        f"cannot write the checkpoint of step 8 to {directory}: No space left on device. The "
        "checkpoints already there are intact; free space or fix the permissions, then rerun the "
        "same command to resume."
    )
    ckpt.close()
    assert checkpoint_steps(tmp_path) == [4]
    np.testing.assert_array_equal(saved_state(tmp_path)["w"], np.ones(3, np.float32))


@contextlib.contextmanager
def _read_only(directory):
    """`directory` made read-only for this process: chmod, or for root a read-only bind mount."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        try:
            yield
        finally:
            os.chmod(directory, 0o755)
        return
    mount = subprocess.run(
        f"mount --bind {directory} {directory} && mount -o remount,ro,bind {directory}",
        shell=True,
        capture_output=True,
    )
    if mount.returncode:
        subprocess.run(["umount", str(directory)], capture_output=True)
        pytest.skip(f"root cannot make a read-only directory here: {mount.stderr!r}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("fs_full", [False, True], ids=["read-only", "disk-full"])
def test_unwritable_checkpoint_directory_fails_the_save_in_one_line(tmp_path, fs_full):
    directory = tmp_path / "checkpoints"
    ckpt = checkpointing.Checkpointer(str(directory), {"queue_size": 0})
    ckpt.save(4, {"w": np.ones(3, np.float32)})
    ckpt.manager.wait_until_finished()
    if fs_full:  # a real full filesystem: a small tmpfs (root only)
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        small = tmp_path / "small"
        small.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]
        ).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            full = checkpointing.Checkpointer(str(small / "checkpoints"), {"queue_size": 0})
            with pytest.raises(checkpointing.CheckpointSaveError) as raised:
                full.save(4, {"w": np.ones(1 << 16, np.float32)})  # 256 KiB into 64 KiB
            assert re.fullmatch(
                rf"cannot write the checkpoint of step 4 to {small}/checkpoints: No space left on "
                r"device\. The checkpoints already there are intact; .*",
                str(raised.value),
            )
            full.close()
        finally:
            subprocess.run(["umount", str(small)], check=True)
        ckpt.close()
        return
    with _read_only(directory):
        with pytest.raises(checkpointing.CheckpointSaveError) as raised:
            ckpt.save(8, {"w": np.zeros(3, np.float32)})
        assert re.fullmatch(
            rf"cannot write the checkpoint of step 8 to {directory}: (Read-only file system|"
            r"Permission denied)\. The checkpoints already there are intact; .*",
            str(raised.value),
        )
        ckpt.close()  # no second error on the way out
    assert checkpoint_steps(tmp_path) == [4]
