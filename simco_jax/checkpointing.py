"""Orbax checkpoints of the train state, with a compatibility record and corruption fallback.

Each checkpoint holds the state pytree and a small JSON record of the settings that fix the
state's shapes. Restoring checks the record first, so a workdir from another model or queue size
fails with a message instead of a shape error, and a latest checkpoint that cannot be read
(truncated, corrupted) is skipped with a warning for the one before it.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

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
    def __init__(self, directory: str, record: dict, *, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.record = record
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "record")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
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

    def restore_latest(self, template):
        """The newest readable checkpoint, in `template`'s shapes and shardings; None if none."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self._check_record(step)
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
                return restored["state"]
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: try an older one
                log.warning(
                    "checkpoint at step %d in %s cannot be read (%s: %s); falling back to the "
                    "previous one",
                    step,
                    self.directory,
                    type(error).__name__,
                    error,
                )
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
