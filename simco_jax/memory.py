"""Will the train step fit on the device? An analytic estimate, checked before anything compiles.

An out-of-memory error of a ResNet-50 step arrives after minutes of compiling; this estimate
takes a second of shape inference (`jax.eval_shape`, nothing runs) and names the largest
per-device batch that fits. Per device, with data parallelism (replicated state, b = batch_size /
devices images per device):

    bytes(b) = state + gradients + b · max(augmentation, views with a backward pass ·
                                           activations per image + two float32 views)

* state: every array of the train state (parameters, SGD momentum, momentum encoder, BatchNorm
  statistics, queue, probe), exactly, from its shapes;
* gradients: one float32 copy of the parameters;
* activations per image: the outputs of every layer of the encoder at the crop size in the
  compute dtype (Flax's `capture_intermediates`), i.e. what the backward pass keeps. SimCo's
  symmetric loss back-propagates through both views' online passes; MoCo v2 and SimMoCo only
  through view 1's (view 2's online pass and the momentum encoder's are forward-only, and their
  activations are freed layer by layer).
* augmentation: the on-device augmentation runs before the encoder, and its temporaries are free
  again when the activations pile up, so a step's peak is the larger of the two phases. XLA's
  compiled CPU step needs about `AUG_IMAGE_COPIES` float32 copies of the crop per image there
  (measured on the smoke configs, where the tiny network leaves only this phase; at 224 px with
  ResNet-50 the activations are 2-4× larger).

`benchmarks/memory_plan.py` compares it with XLA's own figure for the compiled step
(`compiled.memory_analysis()`); XLA's buffer assignment, fusion and convolution workspaces move
the real number by tens of percent either way, hence `SAFETY`.
"""

from __future__ import annotations

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


def _tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def step_terms(config, num_classes: int) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of one device's train step, from shapes alone."""
    comps = train_step.build_components(config, num_classes, 1000)
    size = config.crop_size
    state = jax.eval_shape(lambda: train_step.create_train_state(config, comps, (size, size, 3)))
    fixed = _tree_bytes(state) + _tree_bytes(state.params)

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
    _, mutated = jax.eval_shape(forward, variables, image)
    activations = _tree_bytes(mutated["intermediates"])
    views_with_backward = 2 if config.symmetric else 1
    crop = size * size * 3 * 4
    per_image = max(AUG_IMAGE_COPIES * crop, views_with_backward * activations + 2 * crop)
    return fixed, per_image


def step_bytes(config, num_classes: int, per_device_batch: int) -> float:
    """Estimated device bytes of the train step at `per_device_batch`, headroom included."""
    fixed, per_image = step_terms(config, num_classes)
    return SAFETY * (fixed + per_device_batch * per_image)


def device_memory_bytes(config) -> int | None:
    """`device_memory_gb` if set, else the device's limit as JAX reports it (None on CPU)."""
    if config.get("device_memory_gb", 0.0) > 0:
        return int(config.device_memory_gb * 2**30)
    stats = jax.local_devices()[0].memory_stats()
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_fits(config, num_classes: int, num_devices: int) -> None:
    """Raises ConfigError, before anything compiles, if the per-device batch cannot fit."""
    limit = device_memory_bytes(config)
    if limit is None:
        return
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
