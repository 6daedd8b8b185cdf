"""Orbax checkpoints of the train state, with a compatibility record and corruption fallback.

Each checkpoint holds the state pytree, a small JSON record: the config it was trained with
and what the data made of it (classes, steps per epoch, a fingerprint of the training set), and
the input stream's position (`inputs`: the next step, the epoch and the batch within it).
Resuming compares the record first, so a rerun that would change what the saved step or state
means (another batch size, seed, schedule, model, dataset, ...) fails with one line naming each
key, instead of a shape error or a silently different run; `RESUMABLE_KEYS` may change. A
latest checkpoint that cannot be read (truncated, corrupted) is skipped with a warning for the
one before it, and moved to `unreadable_checkpoints/` next to the checkpoint directory so that
its step can be saved again (one warning line each). A save that cannot be written (full disk,
read-only directory) raises `CheckpointSaveError` naming the path and the OS error; a
`checkpoints` path that is not a directory raises `CheckpointError` before anything is loaded.

`restore_run(workdir)` is the one place that rebuilds a training run's model and TrainState from
its workdir (config.json + checkpoints), the way the trainer does on resume; the linear
evaluation, the export and the notebooks use it."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
import zlib
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from simco_jax import config as config_lib
from simco_jax import parallel, train_step

log = logging.getLogger(__name__)

# Keys a resumed run may change: they alter neither what the saved step means nor the state's
# shapes. Every other config key (batch size, seed, schedule, method, model, augmentation,
# dataset, ...) must match the checkpoint's record: a changed batch size would reinterpret the
# saved step as another epoch and learning rate, and misalign the queue's ring buffer.
# `max_epochs` is not here: the cosine schedule spans it, and extending a schedule that has
# (partly) decayed is not defined.
RESUMABLE_KEYS = frozenset(
    {
        "max_steps",
        "log_every_steps",
        "log_every_epochs",
        "checkpoint_every_steps",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "evals",  # which evaluators run, and when
        "eval_every_epochs",
        "knn_every_epochs",
        "knn_k",
        "knn_temperature",
        "knn_bank_size",  # which training images the kNN monitor compares with
        "eval_batch_size",
        "steps_per_dispatch",  # execution only: the same steps, fused differently
        "dtype",  # 'auto' resolves per backend: a run may move between CPU and accelerators
        # Where the data lives; the data itself must match (`train_data` in the record).
        "data_path",
        "data_dir",
        "tfds_download",
        "eval_dataset",  # what the evaluators score on; training reads the same data
        # Streaming: how many threads decode, and how many unreadable files stop the run.
        "input_threads",
        "max_unreadable_fraction",
    }
)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message says what to do."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, read-only directory, ...)."""


def data_identity(images, labels) -> str:
    """A short fingerprint of the training set: its size, image shape and a CRC of the labels
    and of a strided sample of the images (cheap at any size)."""
    stride = max(1, len(images) // 1024)
    crc = zlib.crc32(np.ascontiguousarray(labels, np.int64).tobytes())
    crc = zlib.crc32(np.ascontiguousarray(images[::stride]).tobytes(), crc)
    return f"{len(labels)} images of {tuple(images.shape[1:])}, crc32 {crc:08x}"


def compatibility_record(config, num_classes=None, *, steps_per_epoch=None, train_data=None):
    """The config (JSON values) and what the data made of it; saved beside every checkpoint.

    Without the data facts (None), it is the part that can be checked before loading any data.
    """
    record = json.loads(config.to_json_best_effort())
    facts = dict(num_classes=num_classes, steps_per_epoch=steps_per_epoch, train_data=train_data)
    record.update({k: v for k, v in facts.items() if v is not None})
    return record


# Keys added since some checkpoints were written, with the value those checkpoints' runs had:
# a record without the key is compared as if it held that value.
IMPLIED_BY_OLDER_RECORDS = {"pred_hidden_bias": True, "scale_classifier_lr": False}


def changes(saved: dict, now: dict) -> tuple[dict, dict]:
    """(refused, accepted) changes, each {key: (saved value, current value)}, over the keys both
    records hold (a key added since the checkpoint was written is not compared, unless its
    earlier behaviour is in `IMPLIED_BY_OLDER_RECORDS`)."""
    saved = {**IMPLIED_BY_OLDER_RECORDS, **saved}
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    refused = {k: c for k, c in changed.items() if k not in RESUMABLE_KEYS}
    return refused, {k: c for k, c in changed.items() if k in RESUMABLE_KEYS}


# Why a key cannot change on resume, for keys a user is likely to change to train longer.
WHY_FIXED = {
    "max_epochs": (
        "the cosine schedule spans max_epochs, and one that has (partly) decayed cannot be "
        "extended; --config.max_steps stops earlier, a fresh --workdir trains longer"
    ),
}


def incompatible(directory: str, step: int, refused: dict) -> CheckpointError:
    detail = ", ".join(
        f"{k}: {a!r} in the checkpoint, {b!r} now"
        + (f" ({WHY_FIXED[k]})" if k in WHY_FIXED else "")
        for k, (a, b) in refused.items()
    )
    return CheckpointError(
        f"{directory} holds a checkpoint (step {step}) of an incompatible config ({detail}). Use "
        "a fresh --workdir, or restore the config that wrote it."
    )


def check_directory(directory: str) -> None:
    """Raises CheckpointError if `directory` exists but is not a directory (a file, a link to
    nothing or to a file), which would otherwise fail only at the first save."""
    if os.path.isdir(directory) or not os.path.lexists(directory):
        return
    if os.path.islink(directory):
        what = f"a link to {os.readlink(directory)!r}, which is not a directory"
    else:
        what = "not a directory"
    raise CheckpointError(
        f"{os.path.abspath(directory)} is {what}; the checkpoints go there. Move it away, or use "
        "another --workdir."
    )


def latest_record(directory: str) -> tuple[int | None, dict | None]:
    """The newest step whose record can be read, and that record; (None, None) if none.

    Reads only the small JSON records: cheap, before any data is loaded or anything compiled.
    Raises CheckpointError if `directory` is not a directory.
    """
    check_directory(directory)
    if not os.path.isdir(directory):
        return None, None
    _quiet_closed_loop_callbacks()
    # Not `read_only=True`: that option logs three warnings that read like a permissions
    # problem. A manager that neither creates nor saves reads the same.
    manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(create=False),
        item_names=("state", "record"),
    )
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                args = ocp.args.Composite(record=ocp.args.JsonRestore())
                return step, dict(manager.restore(step, args=args)["record"])
            except Exception:  # noqa: BLE001 - unreadable: restore_latest sets it aside later
                continue
        return None, None
    finally:
        manager.close()


class Checkpointer:
    def __init__(self, directory: str, record: dict, *, max_to_keep: int = 3, input_position=None):
        """`input_position(step) -> dict`: the input stream's position, saved with every step as
        the `input` item (None: not saved)."""
        check_directory(directory)
        _quiet_closed_loop_callbacks()
        self.directory = os.path.abspath(directory)
        self.record = record
        self.input_position = input_position
        self._failed = False
        # cleanup_tmp_directories: a step whose save was cut short (SIGKILL, a lost host) is a
        # `<step>.orbax-checkpoint-tmp` dir; never restored, but removed so it cannot pile up.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "record", "input", "metrics")
            )
        except OSError as error:
            raise self._save_error("checkpoints", error) from error

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, metrics: dict | None = None) -> None:
        """Saves `state` as `step`, with `metrics` (JSON: the values fetched since the last log
        point, see `loop`) if given; a step already saved (a preemption right after a regular
        checkpoint) is left as it is. Raises CheckpointSaveError (one line: the path and the OS
        error) when this save cannot be written, or when the previous, asynchronous one failed."""
        if step in self.manager.all_steps():
            return
        try:
            self.manager.wait_until_finished()  # the previous save's error belongs to it
        except Exception as error:  # noqa: BLE001 - any failure of a write: say which
            raise self._save_error("the previous checkpoint", error) from error
        try:
            self._preflight(step, state)
            items = dict(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(self.record))
            if self.input_position is not None:
                items["input"] = ocp.args.JsonSave(self.input_position(step))
            if metrics is not None:
                items["metrics"] = ocp.args.JsonSave(metrics)
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:  # noqa: BLE001
            raise self._save_error(f"the checkpoint of step {step}", error) from error

    def restore_metrics(self, step: int) -> dict | None:
        """The `metrics` saved with `step`; None where there are none (checkpoints written
        before they were saved)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "metrics")):
            return None
        restored = self.manager.restore(
            step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore())
        )
        return dict(restored["metrics"])

    def _preflight(self, step: int, state) -> None:
        """A write probe and a free-space check, so that a read-only directory or a full disk
        fails this save, here, rather than inside Orbax's background writes a save later."""
        probe = os.path.join(self.directory, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) + (1 << 20)
        stat = os.statvfs(self.directory)
        if stat.f_bavail * stat.f_frsize < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.directory)

    def _save_error(self, what: str, error: Exception) -> CheckpointSaveError:
        self._failed = True
        if isinstance(error, OSError) and error.strerror:
            reason = error.strerror
        else:  # tensorstore reports the errno inside its message
            code = re.search(r"os_error_code='?(\d+)", str(error))
            reason = os.strerror(int(code[1])) if code else f"{type(error).__name__}: {error}"
        return CheckpointSaveError(
            f"cannot write {what} to {self.directory}: {reason}. The checkpoints already there "
            "are intact; free space or fix the permissions, then rerun the same command to "
            "resume."
        )

    def _check_record(self, step: int) -> None:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        )
        refused, _ = changes(dict(restored["record"]), self.record)
        if refused:
            raise incompatible(self.directory, step, refused)

    def restore_latest(self, template):
        """The newest readable checkpoint, in `template`'s shapes and shardings; None if none."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
        unreadable = []
        try:
            with _abandoned_reads_unreported(unreadable):
                return self._newest_readable(abstract, unreadable)
        finally:
            if unreadable:
                self._set_aside(unreadable)

    def _newest_readable(self, abstract, unreadable: list):
        """Tries the steps newest first; appends (step, reason) to `unreadable` for each that
        fails to read."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self._check_record(step)
                return self._restore_state(step, abstract)
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - any unreadable one: try an older one
                first_line = (str(error).strip().splitlines() or [""])[0]
                unreadable.append((step, f"{type(error).__name__}: {first_line[:300]}"))
        return None

    def _restore_state(self, step: int, abstract):
        """The state of `step` in `abstract`'s layout, or, for a state that has a layout of
        earlier releases (`legacy_layout()`, `from_legacy_layout`), in that one, converted."""

        def restore(target):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
            return self.manager.restore(step, args=args)["state"]

        try:
            return restore(abstract)
        except Exception as error:
            legacy = getattr(abstract, "legacy_layout", lambda: None)()
            if legacy is None:
                raise
            try:
                return type(abstract).from_legacy_layout(restore(legacy))
            except Exception:  # not that layout either: the first error is the one to report
                raise error from None

    def _set_aside(self, unreadable) -> None:
        """Moves unreadable steps out of the way (not deleted: a read error may be transient), so
        that the resumed run can save those steps again; one line each says so."""
        aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
        if jax.process_index() == 0:
            for step, reason in unreadable:
                target = os.path.join(aside, f"{step}_{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(step)), target)
                log.warning(
                    "checkpoint at step %d in %s cannot be read (%s); moved it to %s, falling "
                    "back to the previous one",
                    step,
                    self.directory,
                    reason,
                    target,
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("simco_jax:unreadable_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the last save and for Orbax's background clean-up of temporary steps
        (which would otherwise fail with a traceback at interpreter exit when an error ends the
        process first). Closing on the way out of another error keeps that error: a failure
        here then is its consequence (the same full disk), not news."""
        propagating = sys.exc_info()[1] is not None
        try:
            cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
            if cleanup is not None:
                cleanup.result()
                self.manager._cleanup_tmp_directory_future = None
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as error:  # noqa: BLE001
            if propagating or self._failed:  # the first error is already on its way
                log.debug("closing the checkpoints after an error failed too: %s", error)
                return
            raise self._save_error("the last checkpoint", error) from error


def _is_closed_loop_callback(unraisable) -> bool:
    """Orbax's reads run on a short-lived asyncio loop; when one read of a damaged checkpoint
    fails, tensorstore still completes the others and calls back into the loop already closed.
    Each callback is reported as an unraisable `RuntimeError('Event loop is closed')` from
    `call_soon_threadsafe`: hundreds of tracebacks about reads whose result nobody wants."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return any(frame.name == "call_soon_threadsafe" for frame in frames)


def _quiet_closed_loop_callbacks() -> None:
    """Drops only those callbacks' reports; every other unraisable error is reported as before."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook.quiet_closed_loop_callbacks = True
    sys.unraisablehook = hook


_UNRETRIEVED_ERRORS = ("Task exception was never retrieved", "Future exception was never retrieved")


def _is_not_an_unretrieved_error(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_UNRETRIEVED_ERRORS)


@contextlib.contextmanager
def _abandoned_reads_unreported(failed: list):
    """Orbax reads a checkpoint's arrays as asyncio tasks gathered together; when the first read
    of a damaged checkpoint fails, the gather raises its error and the other failed reads are
    abandoned. asyncio reports each of those when it is garbage-collected, at any later moment,
    as "Task (or Future) exception was never retrieved" with the read's traceback: noise about
    errors the restore already handled. Within this block asyncio's reports of unretrieved
    errors are dropped; when a read failed (`failed` is not empty at its end), collecting the
    garbage there makes them all happen within it."""
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(_is_not_an_unretrieved_error)
    try:
        yield
    finally:
        if failed:
            gc.collect()
        asyncio_log.removeFilter(_is_not_an_unretrieved_error)


# --------------------------------------------------------------------------------------------
# Restoring a training run from its workdir.
# --------------------------------------------------------------------------------------------


class RestoredRun(NamedTuple):
    config: ml_collections.ConfigDict  # the run's training config (from config.json)
    state: train_step.TrainState  # its latest readable checkpoint
    step: int
    num_classes: int  # of the data set it trained on (its online probe's width)
    comps: train_step.Components
    mesh: Any


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The training config a run wrote to WORKDIR/config.json, on today's defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(
            f"{workdir} is not a training run's workdir: it has no config.json (a run writes it "
            "when it starts)"
        )
    with open(path) as f:
        saved = json.load(f)
    config = config_lib.base_config()
    for key, value in saved.items():
        if key not in config:
            log.warning("ignoring key %r of %s (not in today's schema)", key, path)
            continue
        config[key] = tuple(value) if isinstance(value, list) else value
    return config


def run_progress(workdir: str) -> tuple[int, int | None]:
    """(the step of a training run's newest readable checkpoint, the run's total steps, or None
    where its record does not say), from the checkpoint's JSON record; nothing else is loaded."""
    config = load_run_config(workdir)
    step, record = latest_record(os.path.join(workdir, "checkpoints"))
    if record is None:
        raise CheckpointError(f"{workdir} has no readable checkpoint")
    if "steps_per_epoch" not in record:
        return step, None
    total = config.max_epochs * record["steps_per_epoch"]
    return step, min(total, config.max_steps) if config.max_steps > 0 else total


def _saved_num_classes(ckpt: Checkpointer, directory: str) -> int:
    """The class count recorded with the newest checkpoint (no data set needs loading)."""
    for step in sorted(ckpt.manager.all_steps(), reverse=True):
        try:
            record = ckpt.manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )["record"]
            return int(record["num_classes"])
        except Exception as error:  # noqa: BLE001 - unreadable: restore_latest decides later
            log.warning("cannot read the record of step %d (%s)", step, error)
    raise CheckpointError(f"no readable checkpoint in {directory}")


def restore_run(workdir: str, member: int = -1) -> RestoredRun:
    """Rebuilds a run's model and restores its latest TrainState, as the trainer does on resume.

    As on resume, an unreadable latest checkpoint is skipped with a warning (and set aside by
    `Checkpointer`) for the one before it. A population run (config.members) restores member
    `member`'s state and config, as if that member had trained alone; a plain run has none.
    """
    from simco_jax import population  # builds on train_step, as this module does

    config = load_run_config(workdir)
    points = config_lib.member_points(config)
    if len(points) > 1 and not 0 <= member < len(points):
        names = "; ".join(f"{i}: {config_lib.member_name(p)}" for i, p in enumerate(points))
        raise CheckpointError(
            f"{workdir} is a population run of {len(points)} members ({names}); choose one "
            f"with member=0..{len(points) - 1}" + ("" if member == -1 else f" (got {member})")
        )
    if len(points) <= 1 and member not in (-1, 0):
        raise CheckpointError(f"{workdir} is not a population run: it has no member {member}")
    if len(points) == 1:  # one member trains as an ordinary run with its values
        config = config_lib.member_configs(config)[0]
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{workdir} has no checkpoints/ directory")
    ckpt = Checkpointer(directory, {}, max_to_keep=config.keep_checkpoints)
    try:
        num_classes = _saved_num_classes(ckpt, directory)
        ckpt.record = compatibility_record(config, num_classes)
        mesh = parallel.make_mesh()
        image_shape = (config.crop_size, config.crop_size, 3)  # only the channel count matters
        pop = population.Population(config) if len(points) > 1 else None
        if pop:
            config = pop.configs[member]
        comps = train_step.build_components(config, num_classes, steps_per_epoch=1)

        def template():  # the trainer's state: stacked for a population
            if pop:
                return pop.init(num_classes, 1, image_shape)
            return train_step.create_train_state(config, comps, image_shape)

        template = jax.jit(template, out_shardings=parallel.replicated(mesh))()
        state = ckpt.restore_latest(template)
    finally:
        ckpt.close()
    if state is None:
        raise CheckpointError(f"no readable checkpoint in {directory}")
    if pop:
        state = pop.member(state, member)
    step = int(parallel.to_host(state.step))
    return RestoredRun(config, state, step, num_classes, comps, mesh)
