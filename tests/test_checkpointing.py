"""checkpointing.py: what a checkpoint must match to be resumed, corrupted and partial
checkpoints, and saves that cannot be written."""

import contextlib
import logging
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import (
    assert_trees_equal,
    checkpoint_steps,
    forbid_data_loading,
    reference_config,
    saved_state,
)

from simco_jax import checkpointing, train
from simco_jax import config as config_lib


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
