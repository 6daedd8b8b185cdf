"""The one configuration schema: defaults, and the checks that run before anything compiles.

Every framework of the paper is a setting of the same keys (spec §2):

=================  ==========  =========  =========
key                MoCo v2     SimMoCo    SimCo
=================  ==========  =========  =========
momentum_encoder   True        True       False
queue_size         65536       0          0
dt_m               1.0         10.0       10.0
symmetric          False       False      True
=================  ==========  =========  =========

Keys carry the official scripts' flag names wherever one exists (``temperature``, ``dt_m``,
``queue_size``, ``base_tau_momentum``, ``lr``, ``min_scale`` ...). ``dt_m = 1`` *is* InfoNCE: the
dual-temperature weight is then exactly 1.
"""

from __future__ import annotations

import ml_collections

_DTYPES = ("auto", "float32", "bfloat16")
_BACKBONES = ("resnet18", "resnet50")
_LR_SCHEDULE_UNITS = ("epoch", "step")


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the official SimCo recipe on CIFAR-100 (spec §3). Frameworks override §2 keys."""
    c = ml_collections.ConfigDict()

    # Data. `dataset`: a tfds name (cifar10, cifar100, svhn_cropped, stl10, ...), 'npz' (arrays in
    # `data_path`) or 'synthetic' (generated, learnable; for smoke runs and tests).
    c.dataset = "cifar100"
    c.data_path = ""
    c.data_dir = ""  # tfds data_dir; '' = tfds default.
    # A text file of class names (WordNet IDs for ImageNet), one a line: only these classes are
    # used, labelled in sorted order (e.g. configs/imagenet100_classes.txt). '' = every class.
    c.class_list = ""
    c.tfds_download = True
    c.synthetic_num_train = 512
    c.synthetic_num_test = 128
    c.synthetic_num_classes = 10
    c.synthetic_image_size = 32

    # Backbone and projector.
    c.backbone = "resnet18"
    c.backbone_width = 64
    c.cifar_stem = True
    c.proj_hidden_dim = 128
    c.proj_output_dim = 128

    # The contrastive method (spec §2): SimCo by default.
    c.momentum_encoder = False
    c.base_tau_momentum = 0.99
    c.final_tau_momentum = 0.99
    c.queue_size = 0
    c.temperature = 0.1  # tau_alpha
    c.dt_m = 10.0  # tau_beta / tau_alpha; 1.0 = plain InfoNCE
    c.symmetric = True

    # Per-device semantics of a multi-GPU PyTorch run, for reproducing them (default: global batch).
    c.bn_groups = 1  # BatchNorm statistics over this many equal sub-batches.
    c.shuffle_bn = False  # MoCo's ShuffleBN: the key encoder sees the batch shuffled across groups.
    c.negative_groups = 1  # in-batch negatives only from the anchor's own sub-batch.

    # Optimisation (spec §3).
    c.batch_size = 256  # global batch, over all devices and hosts
    c.max_epochs = 200
    c.lr = 0.03  # at batch 256; scaled by batch_size / 256 when scale_lr
    c.scale_lr = True
    c.classifier_lr = 0.3  # the online probe's lr (not scaled)
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.warmup_epochs = 10
    c.warmup_start_lr = 0.003
    c.min_lr = 0.0
    c.lr_schedule_unit = "epoch"  # the official code steps the schedule once per epoch

    # Augmentation (spec §3), official flag names.
    c.crop_size = 32
    c.min_scale = 0.08
    c.max_scale = 1.0
    c.brightness = 0.4
    c.contrast = 0.4
    c.saturation = 0.4
    c.hue = 0.1
    c.color_jitter_prob = 0.8
    c.gray_scale_prob = 0.2
    c.horizontal_flip_prob = 0.5
    c.gaussian_prob = 0.0
    c.solarization_prob = 0.0
    c.mean = (0.4914, 0.4822, 0.4465)
    c.std = (0.247, 0.243, 0.261)

    # Evaluation: online probe every `eval_every_epochs`, plus a cosine kNN on clean features.
    c.eval_every_epochs = 1
    c.knn_k = 200
    c.knn_temperature = 0.1
    c.knn_every_epochs = 10  # 0 disables the kNN monitor
    c.knn_bank_dtype = "float32"  # or 'bfloat16': half the memory of the sharded feature bank
    c.eval_batch_size = 1024

    # Runtime.
    c.seed = 15
    c.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
    # Memory of one accelerator in GiB, for the check before compiling (simco_jax.memory);
    # 0 = what JAX reports for the device (no check where it reports nothing, e.g. on CPU).
    c.device_memory_gb = 0.0
    c.steps_per_dispatch = 8  # train steps fused into one jitted lax.scan
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000  # plus one at the end and one on SIGTERM
    c.keep_checkpoints = 3
    c.max_steps = (
        -1
    )  # > 0 stops early (smoke runs, benchmarks); the schedule still spans max_epochs
    return c


def smoke_overrides() -> dict:
    """A tiny network on synthetic data: trains in seconds on a CPU, downloads nothing."""
    return dict(
        dataset="synthetic",
        synthetic_num_train=256,
        synthetic_num_test=64,
        synthetic_image_size=16,
        crop_size=16,
        backbone_width=4,
        proj_hidden_dim=16,
        proj_output_dim=16,
        batch_size=32,
        max_epochs=2,
        warmup_epochs=1,
        steps_per_dispatch=4,
        log_every_steps=4,
        checkpoint_every_steps=8,
        knn_every_epochs=1,
        knn_k=10,
        eval_batch_size=64,
        dtype="float32",
    )


def apply_variant(config: ml_collections.ConfigDict, arg: str | None):
    """`get_config(arg)` variants, comma-separated: 'smoke' (tiny, synthetic), 'cifar10'."""
    for variant in filter(None, (arg or "").split(",")):
        if variant == "smoke":
            config.update(smoke_overrides())
        elif variant in ("cifar10", "cifar100"):
            config.dataset = variant
        else:
            raise ValueError(f"unknown config variant {variant!r}; known: smoke, cifar10, cifar100")
    return config


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_overrides() -> dict:
    """MoCo v2's ImageNet recipe (Chen et al. 2020; facebookresearch/moco main_moco.py with
    --mlp --aug-plus --cos): ResNet-50, SGD 0.03·B/256, wd 1e-4, cosine over 200 epochs without
    warm-up, projector 2048→2048→128, key momentum 0.999, its augmentation at 224 px."""
    return dict(
        dataset="imagenet2012",
        tfds_download=False,  # tfds cannot download ImageNet: it needs the manual tars
        backbone="resnet50",
        backbone_width=64,
        cifar_stem=False,  # 7×7 stride-2 conv and 3×3 max-pool
        proj_hidden_dim=2048,
        proj_output_dim=128,
        base_tau_momentum=0.999,
        final_tau_momentum=0.999,
        batch_size=256,
        max_epochs=200,
        lr=0.03,
        scale_lr=True,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=0,
        crop_size=224,
        min_scale=0.2,
        max_scale=1.0,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        color_jitter_prob=0.8,
        gray_scale_prob=0.2,
        gaussian_prob=0.5,
        solarization_prob=0.0,
        horizontal_flip_prob=0.5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_batch_size=1024,
        knn_every_epochs=10,
        knn_k=200,
    )


def imagenet_smoke_overrides() -> dict:
    """A tiny network with the ImageNet stem on a small image folder: seconds on a CPU."""
    return dict(
        dataset="imagefolder",
        backbone="resnet18",
        backbone_width=4,
        crop_size=32,
        proj_hidden_dim=16,
        proj_output_dim=16,
        batch_size=32,
        max_epochs=2,
        steps_per_dispatch=2,
        log_every_steps=2,
        checkpoint_every_steps=8,
        knn_every_epochs=1,
        knn_k=10,
        eval_batch_size=64,
        dtype="float32",
    )


def apply_imagenet_variant(config: ml_collections.ConfigDict, arg: str | None, class_list: str):
    """ImageNet `get_config(arg)` variants, comma-separated: 'imagenet100' (the 100 classes of
    CMC and solo-learn, listed in `class_list`), 'smoke' (tiny network, an image folder)."""
    for variant in filter(None, (arg or "").split(",")):
        if variant == "imagenet100":
            config.class_list = class_list
        elif variant == "smoke":
            config.update(imagenet_smoke_overrides())
        else:
            raise ValueError(f"unknown config variant {variant!r}; known: imagenet100, smoke")
    return config


class ConfigError(ValueError):
    """A configuration that cannot run; the message says how to fix it."""


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Rejects impossible settings before anything is loaded or compiled."""
    known = base_config()
    unknown = sorted(set(config.keys()) - set(known.keys()))
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known.keys())}")

    def fail(message):
        raise ConfigError(message)

    def check_positive(key):
        if not config[key] > 0:
            fail(f"{key} must be > 0, got {config[key]!r}")

    for key in ("temperature", "dt_m", "batch_size", "max_epochs", "crop_size", "lr"):
        check_positive(key)
    for key in ("steps_per_dispatch", "log_every_steps", "checkpoint_every_steps", "knn_k"):
        check_positive(key)
    for key in ("momentum", "base_tau_momentum", "final_tau_momentum"):
        if not 0.0 <= config[key] <= 1.0:
            fail(f"{key} must lie in [0, 1], got {config[key]!r}")
    if config.dtype not in _DTYPES:
        fail(f"dtype must be one of {_DTYPES}, got {config.dtype!r}")
    if config.backbone not in _BACKBONES:
        fail(f"backbone must be one of {_BACKBONES}, got {config.backbone!r}")
    if config.lr_schedule_unit not in _LR_SCHEDULE_UNITS:
        fail(
            f"lr_schedule_unit must be one of {_LR_SCHEDULE_UNITS}, got {config.lr_schedule_unit!r}"
        )
    if not 0 <= config.warmup_epochs <= config.max_epochs:
        fail(f"warmup_epochs must lie in [0, max_epochs={config.max_epochs}]")
    if not 0.0 < config.min_scale <= config.max_scale <= 1.0:
        fail(f"need 0 < min_scale <= max_scale <= 1, got ({config.min_scale}, {config.max_scale})")
    for key in (
        "color_jitter_prob",
        "gray_scale_prob",
        "horizontal_flip_prob",
        "gaussian_prob",
        "solarization_prob",
    ):
        if not 0.0 <= config[key] <= 1.0:
            fail(f"{key} is a probability and must lie in [0, 1], got {config[key]!r}")
    if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
        fail("mean and std need three entries (RGB) and std > 0")

    batch = config.batch_size
    if config.queue_size < 0:
        fail(f"queue_size must be >= 0 (0 = in-batch negatives), got {config.queue_size}")
    if config.queue_size and config.queue_size % batch:
        fail(
            f"queue_size={config.queue_size} must be a multiple of the global batch_size={batch}, "
            "so that each step's keys replace one whole slot of the ring buffer"
        )
    if config.queue_size == 0 and batch < 2:
        fail("in-batch negatives need batch_size >= 2")
    if config.shuffle_bn and not config.momentum_encoder:
        fail(
            "shuffle_bn shuffles the key encoder's batch; it needs momentum_encoder=True "
            "(SimCo's keys come from the online encoder)"
        )
    for key in ("bn_groups", "negative_groups"):
        groups = config[key]
        if groups < 1 or batch % groups:
            fail(f"{key}={groups} must be >= 1 and divide batch_size={batch}")
    if config.shuffle_bn and config.bn_groups < 2:
        fail("shuffle_bn needs bn_groups >= 2 (the number of sub-batches, e.g. the device count)")
    if config.negative_groups > 1 and config.queue_size:
        fail("negative_groups applies to in-batch negatives; set queue_size=0 or negative_groups=1")
    if num_devices is not None and batch % num_devices:
        fail(
            f"batch_size={batch} is not divisible by the {num_devices} devices; use a multiple "
            f"of {num_devices} (the batch is the global batch, split evenly over devices)"
        )
    if config.device_memory_gb < 0:
        fail(f"device_memory_gb must be >= 0 (0 = ask JAX), got {config.device_memory_gb}")
    if config.knn_bank_dtype not in ("float32", "bfloat16"):
        fail(f"knn_bank_dtype must be 'float32' or 'bfloat16', got {config.knn_bank_dtype!r}")
    if config.eval_batch_size < 1:
        fail("eval_batch_size must be >= 1")
    if config.dataset == "npz" and not config.data_path:
        fail("dataset='npz' needs --config.data_path=/path/to/arrays.npz")
