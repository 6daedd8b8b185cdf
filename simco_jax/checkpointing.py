"""Orbax checkpoints of the train state, with a compatibility record and corruption fallback.

Each checkpoint holds the state pytree and a small JSON record of the settings that fix the
state's shapes. Restoring checks the record first, so a workdir from another model or queue size
fails with a message instead of a shape error, and a latest checkpoint that cannot be read
(truncated, corrupted) is skipped with a warning for the one before it, and moved to
`unreadable_checkpoints/` next to the checkpoint directory so that its step can be saved again.
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
    "projector",
    "predictor",
    "pred_hidden_dim",
    "pred_fixed_lr",
    "optimizer",
)
# Keys added to the record after checkpoints were first written, with the value every run before
# them had: a checkpoint whose record lacks one is read as having this value.
ADDED_KEYS = {
    "projector": "mlp",
    "predictor": False,
    "pred_hidden_dim": 0,
    "pred_fixed_lr": False,
    "optimizer": "sgd",
}


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used; the message says what to do."""


def compatibility_record(config, num_classes: int) -> dict:
    record = {key: config.get(key, ADDED_KEYS.get(key)) for key in COMPATIBILITY_KEYS}
    if not record["predictor"]:  # the predictor's settings shape nothing without one
        record["pred_hidden_dim"], record["pred_fixed_lr"] = 0, False
    record["num_classes"] = num_classes
    return record


class Checkpointer:
    def __init__(self, directory: str, record: dict, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.record = record
        # cleanup_tmp_directories: a step whose save was cut short (SIGKILL, a lost host) is a
        # `<step>.orbax-checkpoint-tmp` dir; never restored, but removed so it cannot pile up.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "record")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Saves `state` as `step`; a step already saved (a preemption right after a regular
        checkpoint) is left as it is."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(self.record)
            ),
            force=True,
        )

    def _check_record(self, step: int) -> None:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        )
        saved = {**ADDED_KEYS, **restored["record"]}
        diffs = {k: (saved.get(k), v) for k, v in self.record.items() if saved.get(k) != v}
        if diffs:
            detail = ", ".join(
                f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diffs.items()
            )
            raise CheckpointError(
                f"{self.directory} holds a checkpoint (step {step}) of an incompatible config "
                f"({detail}). Use a fresh --workdir, or restore the config that wrote it."
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
