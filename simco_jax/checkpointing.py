"""Orbax checkpoints of the train state, with a compatibility record and corruption fallback.

Each checkpoint holds the state pytree, a small JSON record of the settings that fix the
state's shapes, and the input stream's position (`inputs`: the next step, the epoch and the batch
within it, the dataset's size, the seed). Restoring checks the record first, so a workdir from
another model or queue size fails with a message instead of a shape error, and a latest
checkpoint that cannot be read (truncated, corrupted) is skipped with a warning for the one before
it, and moved to `unreadable_checkpoints/` next to the checkpoint directory so that its step can
be saved again.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# Settings that determine the train state's structure and shapes.
COMPATIBILITY_KEYS = (
    "backbone",
    "backbone_width",
    "cifar_stem",
    "proj_hidden_dim",
    "proj_output_dim",
    "queue_size",
    "momentum_encoder",
    "crop_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message says what to do."""


def compatibility_record(config, num_classes: int) -> dict:
    record = {key: config[key] for key in COMPATIBILITY_KEYS}
    record["num_classes"] = num_classes
    return record


class Checkpointer:
    def __init__(self, directory: str, record: dict, *, max_to_keep: int = 3, input_position=None):
        """`input_position(step) -> dict`: the input stream's position, saved with every step and
        compared on restore (None: not saved, not checked)."""
        self.directory = os.path.abspath(directory)
        self.record = record
        self.input_position = input_position
        # cleanup_tmp_directories: a step whose save was cut short (SIGKILL, a lost host) is a
        # `<step>.orbax-checkpoint-tmp` dir; never restored, but removed so it cannot pile up.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "record", "input")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Saves `state` as `step`; a step already saved (a preemption right after a regular
        checkpoint) is left as it is."""
        if step in self.manager.all_steps():
            return
        items = dict(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(self.record))
        if self.input_position is not None:
            items["input"] = ocp.args.JsonSave(self.input_position(step))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _check_record(self, step: int) -> None:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        )
        saved = dict(restored["record"])
        diffs = {k: (saved.get(k), v) for k, v in self.record.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(
                f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diffs.items()
            )
            raise CheckpointError(
                f"{self.directory} holds a checkpoint (step {step}) of an incompatible config "
                f"({detail}). Use a fresh --workdir, or restore the config that wrote it."
            )

    def _check_input(self, step: int) -> None:
        """The saved stream position must be where today's input resumes at `step`: the same
        dataset size, batch, seed and order (a changed image folder would silently reorder)."""
        saved_input = os.path.join(self.directory, str(step), "input")
        if self.input_position is None or not os.path.exists(saved_input):
            return  # not recorded (an older checkpoint): nothing to compare
        saved = self.manager.restore(step, args=ocp.args.Composite(input=ocp.args.JsonRestore()))
        saved, now = dict(saved["input"]), self.input_position(step)
        if saved != now:
            diffs = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k)}
            raise CheckpointError(
                f"the input stream saved with step {step} in {self.directory} differs from "
                f"today's input ({diffs}: (saved, now)); the data, batch size or input mode "
                f"changed. Restore them, or use a fresh --workdir."
            )

    def restore_latest(self, template):
        """The newest readable checkpoint, in `template`'s shapes and shardings; None if none."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
        unreadable = []
        try:
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    self._check_record(step)
                    self._check_input(step)
                    restored = self.manager.restore(
                        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                    )
                    return restored["state"]
                except CheckpointError:
                    raise
                except Exception as error:  # noqa: BLE001 - any unreadable one: try an older one
                    unreadable.append(step)
                    log.warning(
                        "checkpoint at step %d in %s cannot be read (%s: %s); falling back to "
                        "the previous one",
                        step,
                        self.directory,
                        type(error).__name__,
                        str(error)[:500],
                    )
            return None
        finally:
            if unreadable:
                self._set_aside(unreadable)

    def _set_aside(self, steps) -> None:
        """Moves unreadable steps out of the way (not deleted: a read error may be transient), so
        that the resumed run can save those steps again."""
        aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
        if jax.process_index() == 0:
            for step in steps:
                target = os.path.join(aside, f"{step}_{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(os.path.join(self.directory, str(step)), target)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("simco_jax:unreadable_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
