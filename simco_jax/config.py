"""The one configuration schema: defaults, and the checks that run before anything compiles.

Every framework is a setting of the same keys (`simco_jax.methods` says what each key does); the
first three are the paper's (Zhang et al., CVPR 2022, arXiv:2203.17248), as in its official code
(github.com/ChaoningZhang/Dual-temperature):

===================  ===========  ===========  ===========  ==============  ===============
key                  MoCo v2      SimMoCo      SimCo        BYOL            SimSiam
===================  ===========  ===========  ===========  ==============  ===============
momentum_encoder     True         True         False        True            False
queue_size           65536        0            0            0               0
dt_m                 1.0          10.0         10.0         (unused)        (unused)
symmetric            False        False        True         True            True
loss                 contrastive  contrastive  contrastive  normalized_mse  negative_cosine
predictor            False        False        False        True (4096)     True (512)
pred_fixed_lr        -            -            -            False           True
pred_hidden_bias     -            -            -            True            False
projector            mlp          mlp          mlp          mlp_bn          mlp3_bn
optimizer            sgd          sgd          sgd          lars            sgd
scale_classifier_lr  False        False        False        True            True
===================  ===========  ===========  ===========  ==============  ===============

Periods: every period is `<name>_steps` or `<name>_epochs` (a float), resolved by `period_steps`
(log_every, checkpoint_every, and each entry of `evals`: every_steps / every_epochs).

Checks: each seam of the library (data, model, method, optimization, augmentation, evaluation,
runtime) is a `Seam` below, its keys' domains and its constraints between keys (the machinery is
`simco_jax.domains`; the projector, loss and optimizer names come from `simco_jax.registry`);
`validate` combines them. Nothing here imports JAX, so a config is checked before anything heavy
is imported. Variants of a config file (`get_config('smoke,cifar10')`) go through
`apply_variants`, the one parser of them.

Keys carry the official scripts' flag names wherever one exists (``temperature``, ``dt_m``,
``queue_size``, ``base_tau_momentum``, ``lr``, ``min_scale`` ...). ``dt_m = 1`` *is* InfoNCE: the
dual-temperature weight is then exactly 1.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Mapping

import ml_collections
from ml_collections import config_dict

from simco_jax import registry
from simco_jax.domains import (
    BOOL,
    COUNT,
    DIVISOR,
    EPOCHS_OR_NONE,
    FLOAT32_MAX,
    FLOAT32_TINY,
    NAME,
    PROBABILITY,
    STEPS_OR_NONE,
    TEXT,
    ConfigError,
    Domain,
    Seam,
    as_text,
    check,
    integer,
    one_of,
    real,
    rgb,
    unknown_keys_message,
)

# The method seam's parts, by the registries' names (simco_jax/registry.py).
PROJECTORS, LOSSES, OPTIMIZERS = registry.PROJECTORS, registry.LOSSES, registry.OPTIMIZERS
NEGATIVE_FREE_LOSSES = registry.NEGATIVE_FREE_LOSSES


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the official SimCo recipe on CIFAR-100 (the official scripts' flags). Frameworks
    override the four method keys of the module docstring."""
    c = ml_collections.ConfigDict()

    # Data. `dataset`: a tfds name (cifar10, cifar100, svhn_cropped, stl10, imagenet2012, ...),
    # 'npz' (arrays in `data_path`), 'imagefolder' (torchvision's layout: `data_path`/train/<class>/
    # and `data_path`/val/<class>/) or 'synthetic' (generated, learnable; for smoke runs and tests);
    # every source and what it needs: simco_jax/sources.py.
    c.dataset = "cifar100"
    c.data_path = ""
    # 'resident': the whole train set on every device; 'streaming': each host decodes and crops
    # its share of every batch; 'auto': streaming for image folders and large tfds datasets.
    c.input_mode = "auto"
    c.input_threads = 0  # streaming: host decoding threads per process; 0 = one per CPU core
    c.max_unreadable_fraction = 0.001  # streaming: more unreadable images than this stops the run
    c.data_dir = ""  # tfds data_dir; '' = tfds default.
    # A text file of class names (WordNet IDs for ImageNet), one a line: only these classes are
    # used, labelled in sorted order (e.g. configs/imagenet100_classes.txt); streamed data only:
    # an image folder's class folders or a tfds dataset's ClassLabel names. '' = every class.
    c.class_list = ""
    # A tfds dataset whose `validation` (else `test`) split is the test split of the evaluators
    # and of the linear evaluation, its labels mapped by ClassLabel name to the training
    # dataset's (e.g. imagenet_v2 for imagenet2012); streamed tfds data only. '' = the training
    # dataset's own. The kNN bank stays the training split.
    c.eval_dataset = ""
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
    c.projector = "mlp"  # 'mlp' (MoCo v2, SimCo) | 'mlp_bn' (BYOL) | 'mlp3_bn' (SimSiam)
    c.predictor = False  # BYOL/SimSiam: an MLP on the online branch predicts the target
    c.pred_hidden_dim = 4096  # BYOL 4096, SimSiam 512
    c.pred_fixed_lr = False  # SimSiam: the predictor keeps the peak lr (no warm-up, no decay)
    c.pred_hidden_bias = True  # the predictor's first Linear has a bias (BYOL; SimSiam's has none)

    # The contrastive method: SimCo by default (the table in the module docstring).
    c.momentum_encoder = False
    c.base_tau_momentum = 0.99
    c.final_tau_momentum = 0.99
    c.queue_size = 0
    c.temperature = 0.1  # tau_alpha
    c.dt_m = 10.0  # tau_beta / tau_alpha; 1.0 = plain InfoNCE
    c.symmetric = True
    # 'contrastive' (dual-temperature InfoNCE) | 'normalized_mse' (BYOL) | 'negative_cosine'
    # (SimSiam); the negative-free losses stop the gradient of online targets.
    c.loss = "contrastive"

    # Per-device semantics of a multi-GPU PyTorch run, for reproducing them (default: global batch).
    c.bn_groups = 1  # BatchNorm statistics over this many equal sub-batches.
    c.shuffle_bn = False  # MoCo's ShuffleBN: the key encoder sees the batch shuffled across groups.
    c.negative_groups = 1  # in-batch negatives only from the anchor's own sub-batch.

    # Optimisation: the official CIFAR-100 scripts' SGD recipe.
    c.batch_size = 256  # global batch, over all devices and hosts
    c.max_epochs = 200
    c.lr = 0.03  # at batch 256; scaled by batch_size / 256 when scale_lr
    c.scale_lr = True
    c.classifier_lr = 0.3  # the online probe's lr, at batch 256 when scale_classifier_lr
    c.scale_classifier_lr = False  # True: × batch_size / 256 (solo-learn); the official SimCo: no
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.warmup_epochs = 10
    c.warmup_start_lr = 0.003
    c.min_lr = 0.0
    c.lr_schedule_unit = "epoch"  # the official code steps the schedule once per epoch
    c.optimizer = "sgd"  # 'sgd' | 'lars' (solo-learn's LARS; see simco_jax/optimizers.py)
    c.lars_eta = 0.02  # trust coefficient (solo-learn's CIFAR recipes)
    c.lars_clip_lr = True  # trust ratio capped so that no layer's lr exceeds the global lr
    c.lars_exclude_bias_n_norm = True  # biases and BN: plain SGD, no weight decay

    # Augmentation: the official scripts' CIFAR pipeline, with their flag names.
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

    # Evaluation (as big_vision's config.evals): name -> type and period. A type is a built-in
    # ('probe': the online probe's top-1/5 on the test set; 'knn': a cosine kNN on clean
    # features) or an importable module path whose module defines `Evaluator` (see
    # simco_jax/evaluate.py). Each entry's period is every_steps or every_epochs; the built-ins
    # without one use eval_every_epochs / knn_every_epochs. A period <= 0 disables an entry.
    # Every entry also runs after the last step. Metrics are written as <name>_<metric>.
    c.evals = ml_collections.ConfigDict()
    c.evals.probe = _eval_entry("probe")
    c.evals.knn = _eval_entry("knn")
    c.eval_every_epochs = 1  # <= 0 turns the probe's evaluation off (the probe still trains)
    c.knn_every_epochs = 10  # <= 0 turns the kNN monitor off
    c.knn_k = 200
    c.knn_temperature = 0.1
    c.knn_bank_dtype = "float32"  # or 'bfloat16': half the memory of the sharded feature bank
    # The kNN monitor's bank: a fixed subset of this many training images, drawn from the seed
    # (at ImageNet scale, not every image each time); 0 = all. The offline kNN uses all.
    c.knn_bank_size = 0
    c.eval_batch_size = 1024

    # Runtime.
    c.seed = 15
    c.dtype = "auto"  # compute dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU
    # Memory of one accelerator in GiB, for the check before compiling (simco_jax.memory);
    # 0 = what JAX reports for the device (no check where it reports nothing, e.g. on CPU).
    c.device_memory_gb = 0.0
    c.steps_per_dispatch = 8  # train steps fused into one jitted lax.scan
    c.log_every_steps = 50  # or log_every_epochs
    c.log_every_epochs = config_dict.placeholder(float)
    c.checkpoint_every_steps = 1000  # or checkpoint_every_epochs; plus the end and on SIGTERM
    c.checkpoint_every_epochs = config_dict.placeholder(float)
    c.keep_checkpoints = 3
    # > 0 stops early (smoke runs, benchmarks); the schedule still spans max_epochs.
    c.max_steps = -1
    # Population training (docs/population.md): {key: [values]} trains every combination of
    # the values (a grid) as one member of one vmapped program; only `MEMBER_KEYS` may vary.
    # {} = one run.
    c.members = ml_collections.ConfigDict()
    return c


def _eval_entry(kind: str, **extra) -> ml_collections.ConfigDict:
    """One `evals` entry: its type and its period (unset: the type's default period)."""
    entry = ml_collections.ConfigDict(
        dict(
            type=kind,
            every_steps=config_dict.placeholder(int),
            every_epochs=config_dict.placeholder(float),
        )
    )
    entry.update(extra)
    return entry


# The period of a built-in evaluator whose entry gives none (the keys of earlier releases).
DEFAULT_EVAL_PERIODS = {"probe": "eval_every_epochs", "knn": "knn_every_epochs"}


def period_steps(config, name: str, steps_per_epoch: int, *, default_epochs=None) -> int:
    """The period `<name>_steps` or `<name>_epochs` of `config`, in steps; <= 0 means never.

    The one place where a duration's unit is resolved: an epoch count (a float: 0.5 is half an
    epoch) becomes round(epochs · steps_per_epoch) steps, at least 1. A `_epochs` value replaces
    a top-level `_steps` value left at its default (so --config.log_every_epochs=1 just works);
    any other pair of both spellings is an error. Neither set: `default_epochs`, else never.
    """
    steps, epochs = config.get(f"{name}_steps"), config.get(f"{name}_epochs")
    if epochs is not None:
        # Top-level periods (this config holds `evals`) have a default in steps.
        default_steps = base_config().get(f"{name}_steps") if "evals" in config else None
        if steps is not None and steps != default_steps:
            raise ConfigError(
                f"{name}_steps={steps} and {name}_epochs={epochs} are both set; set only one"
            )
        return max(round(epochs * steps_per_epoch), 1) if epochs > 0 else 0
    if steps is not None:
        return steps
    if default_epochs is None:
        return 0
    return max(round(default_epochs * steps_per_epoch), 1) if default_epochs > 0 else 0


def eval_periods(config, steps_per_epoch: int) -> dict:
    """{eval name: period in steps} for every entry of config.evals (<= 0: disabled)."""
    periods = {}
    for name, entry in config.evals.items():
        default = DEFAULT_EVAL_PERIODS.get(entry.type)
        default_epochs = config[default] if default else None
        periods[name] = period_steps(entry, "every", steps_per_epoch, default_epochs=default_epochs)
    return periods


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
        pred_hidden_dim=16,
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
    """A tiny network with the ImageNet stem on a small image folder: seconds on a CPU. The
    folder is generated (`sources`, 'generated_imagefolder') unless --config.data_path names one."""
    return dict(
        dataset="generated_imagefolder",
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


# ------------------------------------------------------------------------------------ variants
# `get_config(arg)`: comma-separated variant names, each applied in order. A config file names
# its variants in a table {name: overrides}; `apply_variants` is the one parser of them all.
CIFAR_VARIANTS = {
    "smoke": smoke_overrides(),  # a tiny network on synthetic data: seconds on a CPU
    "cifar10": dict(dataset="cifar10"),
    "cifar100": dict(dataset="cifar100"),
}


def apply_variants(config, arg: str | None, variants: Mapping[str, dict | Callable]):
    """Applies the comma-separated variants of `arg` (a dict of overrides, or a function of the
    config) in order; an unknown one raises a one-line ConfigError before anything is set."""
    names = [name.strip() for name in (arg or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in variants]
    if unknown:
        where = f" (in {arg!r})" if arg.strip() != unknown[0] else ""
        raise ConfigError(
            f"unknown config variant {unknown[0]!r}{where}; known: {', '.join(variants)} "
            "(comma-separated, e.g. :" + ",".join(list(variants)[:2]) + ")"
        )
    for name in names:
        variant = variants[name]
        if callable(variant):
            variant(config)
        else:
            config.update(variant)
    return config


def imagenet_variants(class_list: str) -> dict:
    """The ImageNet configs' variants: 'imagenet100' (the 100 classes of CMC and solo-learn,
    listed in `class_list`), 'smoke' (tiny network, an image folder)."""
    return {"imagenet100": dict(class_list=class_list), "smoke": imagenet_smoke_overrides()}


def apply_imagenet_variant(config: ml_collections.ConfigDict, arg: str | None, class_list: str):
    return apply_variants(config, arg, imagenet_variants(class_list))


# ------------------------------------------------------------------------ user-given periods
PERIODS = ("log_every", "checkpoint_every")  # top-level periods: `<name>_steps` | `_epochs`


def prefer_given_periods(config, given: set[str]) -> None:
    """A period the user set in one spelling replaces the config file's other spelling:
    `--config.log_every_epochs=1` on a config whose file sets log_every_steps=4 logs once an
    epoch (instead of refusing both). `given`: the dotted keys the user set."""
    nodes = [("", config, name) for name in PERIODS]
    nodes += [(f"evals.{n}.", entry, "every") for n, entry in config.get("evals", {}).items()]
    for prefix, node, name in nodes:
        steps, epochs = f"{name}_steps", f"{name}_epochs"
        for mine, other in ((steps, epochs), (epochs, steps)):
            if prefix + mine in given and prefix + other not in given and other in node:
                node[other] = None


# ------------------------------------------------------------------------------------ the seams
# Each seam of the library declares its keys' domains and its constraints between keys;
# `validate` combines them. Every key of `base_config()` belongs to exactly one seam (a test
# fails for a key without a domain).


def _data_checks(c, num_devices):
    from simco_jax import sources  # noqa: PLC0415 - the data seam's table of sources; no JAX

    yield from sources.config_errors(c)


DATA = Seam(
    {
        "dataset": NAME,
        "data_path": TEXT,
        "data_dir": TEXT,
        "class_list": TEXT,
        "eval_dataset": TEXT,
        "tfds_download": BOOL,
        "input_mode": one_of("auto", "resident", "streaming"),
        "input_threads": integer(0, 4096),
        "max_unreadable_fraction": PROBABILITY,
        "synthetic_num_train": integer(1, 10_000_000),
        "synthetic_num_test": integer(1, 10_000_000),
        "synthetic_num_classes": integer(2, 100_000),
        "synthetic_image_size": integer(1, 4096),
    },
    _data_checks,
)

MODEL = Seam(
    {
        "backbone": one_of("resnet18", "resnet50"),
        "backbone_width": integer(1, 4096),
        "cifar_stem": BOOL,
        "proj_hidden_dim": integer(1, 65_536),
        "proj_output_dim": integer(1, 65_536),
        "projector": one_of(*registry.PROJECTORS),
        "predictor": BOOL,
        "pred_hidden_dim": integer(1, 65_536),
        "pred_fixed_lr": BOOL,
        "pred_hidden_bias": BOOL,
    }
)


def _method_checks(c, num_devices):
    """simco_jax/methods.py's constraints: negatives, groups, and the two temperatures."""
    batch = c.batch_size
    if c.queue_size % batch:
        yield (
            f"queue_size={c.queue_size} must be a multiple of the global batch_size={batch}, "
            "so that each step's keys replace one whole slot of the ring buffer"
        )
    if c.queue_size == 0 and batch < 2:
        yield "in-batch negatives (queue_size=0) need batch_size >= 2"
    for key in ("bn_groups", "negative_groups"):
        if batch % c[key] or batch // c[key] < 2:
            yield (
                f"{key}={c[key]} must divide batch_size={batch} into sub-batches of at least 2 "
                "images (BatchNorm statistics and in-batch negatives need two)"
            )
    if c.shuffle_bn and not c.momentum_encoder:
        yield (
            "shuffle_bn shuffles the key encoder's batch; it needs momentum_encoder=True "
            "(SimCo's keys come from the online encoder)"
        )
    if c.shuffle_bn and c.bn_groups < 2:
        yield "shuffle_bn needs bn_groups >= 2 (the number of sub-batches, e.g. the device count)"
    if c.negative_groups > 1 and c.queue_size:
        yield "negative_groups applies to in-batch negatives; set queue_size=0 or negative_groups=1"
    if c.loss in registry.NEGATIVE_FREE_LOSSES:
        if c.queue_size:
            yield f"loss={c.loss!r} uses no negatives; set queue_size=0"
        if c.negative_groups != 1:
            yield f"loss={c.loss!r} uses no negatives; set negative_groups=1"
    tau_beta = c.temperature * c.dt_m  # the loss divides by τβ as by τα
    if not FLOAT32_TINY <= tau_beta <= FLOAT32_MAX:
        yield (
            f"temperature * dt_m = {tau_beta:g} (τβ) must be a finite float32 >= "
            f"{FLOAT32_TINY:.3g}, as the loss divides by it; change temperature or dt_m"
        )


METHOD = Seam(
    {
        "momentum_encoder": BOOL,
        "base_tau_momentum": PROBABILITY,
        "final_tau_momentum": PROBABILITY,
        "queue_size": integer(0, 2**24),
        "temperature": DIVISOR,  # τα
        "dt_m": DIVISOR,  # τβ / τα
        "symmetric": BOOL,
        "loss": one_of(*registry.LOSSES),
        "bn_groups": COUNT,
        "shuffle_bn": BOOL,
        "negative_groups": COUNT,
    },
    _method_checks,
)

# Learning rates: > 0 and at most 100. The recipes use 0.03 (linearly scaled to 7.7 at batch
# 65,536) and 0.3 for the probe; above 100 an SGD step, not the data, sets the weights (a
# probe lr of 1e30 gave a loss of 3.5e31 that stayed finite): a typo, not an experiment.
LEARNING_RATE = real(0.0, 100.0, open_lo=True)


def _optimization_checks(c, num_devices):
    if c.warmup_epochs > c.max_epochs:
        yield f"warmup_epochs={c.warmup_epochs} must be <= max_epochs={c.max_epochs}"


OPTIMIZATION = Seam(
    {
        "batch_size": integer(1, 2**20),
        "max_epochs": integer(1, 100_000),
        "lr": LEARNING_RATE,
        "scale_lr": BOOL,
        "classifier_lr": LEARNING_RATE,
        "scale_classifier_lr": BOOL,
        "momentum": real(0.0, 1.0, open_hi=True),  # SGD momentum 1 never forgets a gradient
        "weight_decay": real(0.0, 1.0),
        "warmup_epochs": integer(0),
        "warmup_start_lr": real(0.0, 100.0),
        "min_lr": real(0.0, 100.0),
        "lr_schedule_unit": one_of("epoch", "step"),
        "optimizer": one_of(*registry.OPTIMIZERS),
        "lars_eta": real(0.0, 1.0, open_lo=True),
        "lars_clip_lr": BOOL,
        "lars_exclude_bias_n_norm": BOOL,
    },
    _optimization_checks,
)


def _augmentation_checks(c, num_devices):
    if c.min_scale > c.max_scale:
        yield f"min_scale={c.min_scale} must be <= max_scale={c.max_scale}"


AUGMENTATION = Seam(  # torchvision's domains
    {
        "crop_size": integer(1, 4096),
        "min_scale": real(0.0, 1.0, open_lo=True),
        "max_scale": real(0.0, 1.0, open_lo=True),
        "brightness": real(0.0),
        "contrast": real(0.0),
        "saturation": real(0.0),
        "hue": real(0.0, 0.5),
        "color_jitter_prob": PROBABILITY,
        "gray_scale_prob": PROBABILITY,
        "horizontal_flip_prob": PROBABILITY,
        "gaussian_prob": PROBABILITY,
        "solarization_prob": PROBABILITY,
        "mean": rgb(real(0.0, 1.0)),
        "std": rgb(DIVISOR),  # (x − mean) / std
    },
    _augmentation_checks,
)


def _is_evals(v) -> bool:
    """{name: entry with a string `type`} (entries may hold more keys for their evaluator)."""
    mappings = (dict, ml_collections.ConfigDict)
    return isinstance(v, mappings) and all(
        isinstance(e, mappings) and isinstance(e.get("type"), str) and e.get("type")
        for e in v.values()
    )


EVALS = Domain(_is_evals, "a mapping of names to entries with a 'type' (see config.evals)")
# A period of an `evals` entry: None (unset), or a number of steps / epochs; <= 0 turns it off.
_ENTRY_DOMAINS = {
    "every_steps": Domain(lambda v: v is None or integer().accepts(v), "None or an integer"),
    "every_epochs": Domain(
        lambda v: v is None or real(-FLOAT32_MAX).accepts(v), "None or a number"
    ),
}
_BUILT_IN_ENTRY_KEYS = ("type", *_ENTRY_DOMAINS)


def _evaluation_checks(c, num_devices):
    for name, entry in c.evals.items():
        where = f"evals.{name}"
        if entry.type in registry.EVALUATORS:  # a built-in's entry holds nothing else
            unknown = [f"{where}.{k}" for k in entry if k not in _BUILT_IN_ENTRY_KEYS]
            if unknown:
                known = [f"{where}.{k}" for k in _BUILT_IN_ENTRY_KEYS]
                yield unknown_keys_message(unknown, known)
                continue
        else:
            try:  # a module of the user's (importing it is not importing JAX here)
                importlib.import_module(entry.type).Evaluator  # noqa: B018
            except (ImportError, AttributeError) as error:
                yield (
                    f"{where}.type={entry.type!r} is neither a built-in evaluator "
                    f"{list(registry.EVALUATORS)} nor an importable module with an Evaluator "
                    f"class ({type(error).__name__}: {error})"
                )
        for key, domain in _ENTRY_DOMAINS.items():
            if not domain.accepts(entry.get(key)):
                yield f"{where}.{key} must be {domain.text}, got {as_text(entry.get(key))}"
        try:
            period_steps(entry, "every", 1)  # both spellings given: refused here
        except ConfigError as error:
            yield f"{where}.{error}"


EVALUATION = Seam(
    {
        "evals": EVALS,
        "eval_every_epochs": integer(
            note="<= 0 turns the online probe's evaluation off; the probe still trains"
        ),
        "knn_every_epochs": integer(note="<= 0 turns the kNN monitor off"),
        "knn_k": COUNT,
        # exp(similarity / T) of the kNN vote overflows float32 for T < 1 / 88.7.
        "knn_temperature": real(0.012, 100.0),
        "eval_batch_size": integer(1, 2**20),
        "knn_bank_dtype": one_of("float32", "bfloat16"),
        "knn_bank_size": integer(0),  # 0 = the whole training set
    },
    _evaluation_checks,
)


def _runtime_checks(c, num_devices):
    if num_devices is not None and c.batch_size % num_devices:
        yield (
            f"batch_size={c.batch_size} is not divisible by the {num_devices} devices; use a "
            f"multiple of {num_devices} (the batch is the global batch, split evenly over devices)"
        )
    for name in PERIODS:
        if c[f"{name}_steps"] is None and c[f"{name}_epochs"] is None:
            yield f"set {name}_steps or {name}_epochs (both are None)"
        try:
            period_steps(c, name, 1)  # both spellings given: refused here
        except ConfigError as error:
            yield str(error)


RUNTIME = Seam(
    {
        "seed": integer(0, 2**31 - 1),
        "dtype": one_of("auto", "float32", "bfloat16"),
        "steps_per_dispatch": integer(1, 100_000),
        "log_every_steps": STEPS_OR_NONE,
        "log_every_epochs": EPOCHS_OR_NONE,
        "checkpoint_every_steps": STEPS_OR_NONE,
        "checkpoint_every_epochs": EPOCHS_OR_NONE,
        "keep_checkpoints": COUNT,
        "device_memory_gb": real(0.0),  # 0 = ask JAX
        "max_steps": Domain(
            lambda v: integer().accepts(v) and (v == -1 or v >= 1), "-1 (no limit) or >= 1"
        ),
    },
    _runtime_checks,
)

# ------------------------------------------------------------------------ population members
# The keys members of one population may differ in: the seed and scalar hyperparameters, which
# the vmapped step reads as per-member arrays. Every other key changes a shape or the program
# (batch size, queue size, framework, width, ...) and needs runs of its own.
MEMBER_KEYS = (
    "seed",
    "temperature",
    "dt_m",
    "lr",
    "classifier_lr",
    "weight_decay",
    "base_tau_momentum",
    "final_tau_momentum",
)


def member_points(config) -> list[dict]:
    """{key: value} of each member of `config.members` (their grid, in the order listed); []
    without members."""
    grid = dict(config.get("members") or {})
    if not grid:
        return []
    keys = list(grid)
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*grid.values())]


def member_configs(config) -> list:
    """Each member's own config: `config` without `members`, with the member's values."""
    configs = []
    for point in member_points(config):
        member = config.copy_and_resolve_references()
        member.members = {}
        member.update(point)
        configs.append(member)
    return configs


def member_name(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


def _is_members(v) -> bool:
    mappings = (dict, ml_collections.ConfigDict)
    return isinstance(v, mappings) and all(
        isinstance(values, (list, tuple)) and len(values) > 0 for values in v.values()
    )


def _population_checks(c, num_devices):
    for key in c.members:
        if key not in DOMAINS:
            yield unknown_keys_message([f"members.{key}"], [f"members.{k}" for k in MEMBER_KEYS])
            return
        if key not in MEMBER_KEYS:
            yield (
                f"members.{key}: {key} cannot vary across the members of one population (it "
                f"changes a shape or the program); members may vary {', '.join(MEMBER_KEYS)}. "
                f"Train other values as separate runs (a sweep)"
            )
            return
    points = member_points(c)
    for index, (point, member) in enumerate(zip(points, member_configs(c), strict=True)):
        try:
            check(member, SEAMS.values(), num_devices=num_devices)
        except (ConfigError, TypeError) as error:
            yield f"members: member {index} ({member_name(point)}): {error}"
            return


POPULATION = Seam(
    {"members": Domain(_is_members, "a mapping of keys to non-empty lists of values")},
    _population_checks,
)

SEAMS = {
    "data": DATA,
    "model": MODEL,
    "method": METHOD,
    "optimization": OPTIMIZATION,
    "augmentation": AUGMENTATION,
    "evaluation": EVALUATION,
    "runtime": RUNTIME,
    "population": POPULATION,
}
DOMAINS: dict[str, Domain] = {k: d for seam in SEAMS.values() for k, d in seam.domains.items()}


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Rejects impossible settings before anything is loaded or compiled: each key against its
    seam's domain, then the seams' constraints between keys. Raises a one-line ConfigError
    naming the key."""
    check(config, SEAMS.values(), num_devices=num_devices)
