"""Will the train step fit on the device? An analytic estimate, checked before anything compiles.

An out-of-memory error of a ResNet-50 step arrives after minutes of compiling; this estimate
takes a second of shape inference (`jax.eval_shape`, nothing runs) and names the largest
per-device batch that fits. Per device, with data parallelism (replicated state, b = batch_size /
devices images per device):

    bytes(b) = state + gradients + b · max(augmentation, views with a backward pass ·
                                           activations per image + the float32 views)

* state: every array of the train state (parameters, optimizer state, the method's state such
  as a momentum encoder and a queue, BatchNorm statistics, probe), exactly, from its shapes;
* gradients: one float32 copy of the parameters;
* activations per image: the outputs of every layer of the encoder at the crop size in the
  compute dtype (Flax's `capture_intermediates`), i.e. what the backward pass keeps, once per
  view the method differentiates (`methods.Method.backward_views`): both views for a symmetric
  loss and for a one-way loss whose target is view 2's online projection with gradient (one-way
  SimCo); view 1 alone for MoCo v2 and SimMoCo (view 2's online pass and the momentum encoder's
  are forward-only, and their activations are freed layer by layer).
* augmentation: the on-device augmentation runs before the encoder, and its temporaries are free
  again when the activations pile up, so a step's peak is the larger of the two phases. XLA's
  compiled CPU step needs about `AUG_IMAGE_COPIES` float32 copies of the crop per image there
  (measured on the smoke configs, where the tiny network leaves only this phase; at 224 px with
  ResNet-50 the activations are 2-4× larger).

The evaluations run after training with the train state still held, so `check_fits` also
sizes `eval_batch_size` (per device):

    bytes(e) = state + kNN bank + e · (clean forward pass per image + kNN similarities)

* the forward pass keeps no activations for a backward pass: about two layers' outputs at a time
  (the largest layer's, twice) and the float32 crop, for e / devices images where the batch splits
  evenly over the devices (else every device encodes the whole batch);
* the kNN monitor (when an `evals` entry of type 'knn' is on) holds the normalised features of
  the bank's rows (sharded over the devices) and scores every query of the batch against its
  device's rows: `KNN_SCORE_COPIES` float32 similarity rows per query (the scores, the padding
  mask, top-k's working copy).

`benchmarks/memory_plan.py` compares it with XLA's own figure for the compiled step
(`compiled.memory_analysis()`); XLA's buffer assignment, fusion and convolution workspaces move
the real number by tens of percent either way, hence `SAFETY`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import config as config_lib
from simco_jax import train_step

# Headroom for what the model does not count (XLA temporaries, cuDNN workspaces, collectives,
# the runtime's own reservation).
SAFETY = 1.25
# Float32 crops per image alive during the augmentation (both views, colour-jitter branches,
# blur passes), as XLA:CPU's compiled step needs (tests/test_imagenet.py).
AUG_IMAGE_COPIES = 40
# Float32 (queries × bank rows) arrays alive while the kNN monitor scores a batch.
KNN_SCORE_COPIES = 3


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _shapes(config, num_classes: int):
    """(components, abstract train state, per-layer abstract activations of one image)."""
    comps = train_step.build_components(config, num_classes, 1000)
    size = config.crop_size
    state = jax.eval_shape(lambda: train_step.create_train_state(config, comps, (size, size, 3)))

    def forward(variables, images):
        return comps.model.apply(
            variables,
            images,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=True,
        )

    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    (features, *_), mutated = jax.eval_shape(forward, variables, image)
    return comps, state, features, mutated["intermediates"]


def step_terms(config, num_classes: int) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of one device's train step, from shapes alone."""
    comps, state, _, intermediates = _shapes(config, num_classes)
    fixed = _tree_bytes(state) + _tree_bytes(state.params)
    activations = _tree_bytes(intermediates)
    size = config.crop_size
    method = comps.method
    crop = size * size * 3 * 4  # one float32 view
    backward = len(method.backward_views) * activations + method.num_views * crop
    per_image = max(AUG_IMAGE_COPIES * crop, backward)
    return fixed, per_image


def step_bytes(config, num_classes: int, per_device_batch: int) -> float:
    """Estimated device bytes of the train step at `per_device_batch`, headroom included."""
    fixed, per_image = step_terms(config, num_classes)
    return SAFETY * (fixed + per_device_batch * per_image)


def eval_terms(config, num_classes: int, num_devices: int, bank_rows: int) -> tuple[int, int]:
    """(fixed bytes, bytes per image of `eval_batch_size`) of one device during an evaluation,
    with the train state held and a kNN bank of `bank_rows` training images."""
    _, state, features, intermediates = _shapes(config, num_classes)
    crop = config.crop_size**2 * 3 * 4
    largest = max(
        int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(intermediates)
    )
    forward = 2 * largest + crop
    if config.eval_batch_size % num_devices == 0:  # the batch is split over the devices
        forward = -(-forward // num_devices)
    fixed, per_image = _tree_bytes(state), forward
    if _knn_on(config):
        rows = -(-bank_rows // num_devices)
        bank_dtype = jnp.dtype(config.knn_bank_dtype).itemsize
        fixed += rows * (features.shape[-1] * bank_dtype + 4)  # features and labels
        per_image += KNN_SCORE_COPIES * rows * 4
    return fixed, per_image


def _knn_on(config) -> bool:
    periods = config_lib.eval_periods(config, 1)
    return any(e.type == "knn" and periods[name] > 0 for name, e in config.evals.items())


def device_memory_bytes(config) -> int | None:
    """`device_memory_gb` if set, else the device's limit as JAX reports it; on the CPU, which
    reports none, the host's physical memory shared by its devices."""
    if config.get("device_memory_gb", 0.0) > 0:
        return int(config.device_memory_gb * 2**30)
    stats = jax.local_devices()[0].memory_stats()
    limit = (stats or {}).get("bytes_limit")
    if limit:
        return int(limit)
    if jax.default_backend() == "cpu":
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return host // jax.local_device_count()
    return None


def check_fits(
    config, num_classes: int, num_devices: int, *, bank_rows: int = 0, members: int = 1
) -> None:
    """Raises ConfigError, before anything compiles, if the per-device train batch, or the
    evaluation batch with a kNN bank of `bank_rows` images, cannot fit; with `members` > 1 (a
    population), if that many members' steps cannot fit."""
    limit = device_memory_bytes(config)
    if limit is None:
        return
    if members > 1:
        _check_population_fits(config, num_classes, num_devices, limit, members)
    _check_train_fits(config, num_classes, num_devices, limit)
    fixed, per_image = eval_terms(config, num_classes, num_devices, bank_rows)
    need = SAFETY * (fixed + config.eval_batch_size * per_image)
    if need <= limit:
        return
    largest = max(0, int((limit / SAFETY - fixed) // per_image))
    raise config_lib.ConfigError(
        f"eval_batch_size={config.eval_batch_size} needs about {need / 2**30:.1f} GiB per device "
        f"during an evaluation (an analytic estimate with the train state held"
        f"{' and the kNN bank of ' + str(bank_rows) + ' images' if _knn_on(config) else ''}, "
        f"simco_jax/memory.py), but a device has {limit / 2**30:.1f} GiB; the largest that fits "
        f"is about {largest}. Use a smaller eval_batch_size."
    )


def _check_train_fits(config, num_classes: int, num_devices: int, limit: int) -> None:
    per_device = config.batch_size // num_devices
    fixed, per_image = step_terms(config, num_classes)
    need = SAFETY * (fixed + per_device * per_image)
    if need <= limit:
        return
    largest = max(0, int((limit / SAFETY - fixed) // per_image))
    raise config_lib.ConfigError(
        f"batch_size={config.batch_size} over {num_devices} devices is {per_device} images per "
        f"device; the train step needs about {need / 2**30:.1f} GiB per device (an analytic "
        f"estimate, simco_jax/memory.py), but a device has {limit / 2**30:.1f} GiB. The largest "
        f"per-device batch that fits is about {largest} (batch_size={largest * num_devices}); "
        "use more devices, a smaller batch_size, or dtype='bfloat16'. Gradient accumulation is "
        "not offered: it would shrink the in-batch negatives of SimCo and SimMoCo."
    )


def population_bytes(config, num_classes: int, num_devices: int, members: int) -> float:
    """Estimated device bytes of a population's train step: the vmapped step holds every
    member's state, gradients and activations at once (the batch is shared, not the work)."""
    fixed, per_image = step_terms(config, num_classes)
    return SAFETY * members * (fixed + config.batch_size // num_devices * per_image)


def largest_population(config, num_classes: int, num_devices: int) -> int | None:
    """The most members of `config` whose step fits a device; None where no limit is known."""
    limit = device_memory_bytes(config)
    if limit is None:
        return None
    return int(limit // population_bytes(config, num_classes, num_devices, 1))


def _check_population_fits(config, num_classes, num_devices, limit, members: int) -> None:
    need = population_bytes(config, num_classes, num_devices, members)
    if need <= limit:
        return
    largest = largest_population(config, num_classes, num_devices)
    raise config_lib.ConfigError(
        f"{members} members of batch_size={config.batch_size} need about {need / 2**30:.1f} GiB "
        f"per device (an analytic estimate, simco_jax/memory.py), but a device has "
        f"{limit / 2**30:.1f} GiB; the largest population that fits is {largest} members. Use "
        "fewer members (config.members), or more devices."
    )
