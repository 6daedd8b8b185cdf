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
_INPUT_MODES = ("auto", "resident", "streaming")


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the official SimCo recipe on CIFAR-100 (spec §3). Frameworks override §2 keys."""
    c = ml_collections.ConfigDict()

    # Data. `dataset`: a tfds name (cifar10, cifar100, svhn_cropped, stl10, imagenet2012, ...),
    # 'npz' (arrays in `data_path`), 'imagefolder' (torchvision's layout: `data_path`/train/<class>/
    # and `data_path`/val/<class>/) or 'synthetic' (generated, learnable; for smoke runs and tests).
    c.dataset = "cifar100"
    c.data_path = ""
    # 'resident': the whole train set on every device; 'streaming': each host decodes and crops
    # its share of every batch; 'auto': streaming for image folders and large tfds datasets.
    c.input_mode = "auto"
    c.input_threads = 0  # streaming: host decoding threads per process; 0 = one per CPU core
    c.max_unreadable_fraction = 0.001  # streaming: more unreadable images than this stops the run
    c.data_dir = ""  # tfds data_dir; '' = tfds default.
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
    c.eval_batch_size = 1024

    # Runtime.
    c.seed = 15
    c.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
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
    if config.eval_batch_size < 1:
        fail("eval_batch_size must be >= 1")
    if config.dataset == "npz" and not config.data_path:
        fail("dataset='npz' needs --config.data_path=/path/to/arrays.npz")
    if config.input_mode not in _INPUT_MODES:
        fail(f"input_mode must be one of {_INPUT_MODES}, got {config.input_mode!r}")
    if config.dataset == "imagefolder":
        if not config.data_path:
            fail("dataset='imagefolder' needs --config.data_path=ROOT (ROOT/train/<class>/*.JPEG)")
        if config.input_mode == "resident":
            fail("dataset='imagefolder' streams from disk; use input_mode='auto' or 'streaming'")
    if config.input_threads < 0:
        fail(f"input_threads must be >= 0 (0 = one per core), got {config.input_threads}")
    if not 0.0 <= config.max_unreadable_fraction <= 1.0:
        fail(f"max_unreadable_fraction must lie in [0, 1], got {config.max_unreadable_fraction}")
