"""ResNet backbones, projector and linear probe, built to match torchvision/PyTorch exactly.

The official code uses torchvision's ResNet-18 with solo-learn's CIFAR stem, PyTorch's default
initialisers and PyTorch's padding rules. Flax's defaults differ on all three, so every choice is
explicit here:

- Padding: PyTorch pads symmetrically; Flax's "SAME" pads (0, 1) for a stride-2 3×3 conv on an
  even-sized map, which shifts every sampled window. Every conv and the max-pool get explicit
  ((p, p), (p, p)) padding.
- Init: torchvision re-initialises each conv with kaiming_normal_(mode='fan_out', relu), a plain
  (untruncated) normal of std sqrt(2 / (out_ch·kh·kw)). solo-learn replaces conv1 for CIFAR after
  that loop, so the CIFAR conv1 keeps nn.Conv2d's default kaiming_uniform_(a=√5), i.e.
  U(±1/√fan_in). nn.Linear: weight and bias both U(±1/√fan_in) (Flax: lecun-normal and zeros).
- BatchNorm: PyTorch momentum 0.1 is Flax momentum 0.9; eps 1e-5; scale 1, bias 0.

Parameter names map 1:1 onto torchvision's state-dict names (see `simco_jax.export`): `conv1`,
`bn1`, blocks `layer{stage}_{index}` holding `conv1`, `bn1`, `conv2`, `bn2` (`conv3`, `bn3`) and,
when present, `downsample_conv`/`downsample_bn` (torchvision's `downsample.0`/`downsample.1`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simco_jax import registry

Dtype = Any

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): gain² = 2, plain normal (not truncated).
# jax's fan_out for an HWIO kernel is out_ch·kh·kw, as PyTorch's for OIHW.
torch_kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default for nn.Conv2d/nn.Linear weights, kaiming_uniform_(a=√5):
# bound = sqrt(6 / ((1 + a²)·fan_in)) = 1/√fan_in, which is variance_scaling(1/3, fan_in, uniform).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init U(±1/√fan_in); needs fan_in, which Flax's bias_init lacks."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(features: int, fan_in: int, dtype: Dtype, name: str) -> nn.Dense:
    """nn.Dense initialised like torch.nn.Linear(fan_in, features)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        name=name,
    )


def _pad(p: int):
    return ((p, p), (p, p))


def _conv(features, kernel, stride, padding, dtype, name, kernel_init=torch_kaiming_fan_out_init):
    """Bias-free conv with explicit symmetric PyTorch padding, float32 params."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=_pad(padding),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


def _batch_norm(train: bool, dtype, name, affine: bool = True):
    # Flax computes the batch statistics in float32 even when dtype is bfloat16/float16
    # (force_float32_reductions) and keeps the running statistics in float32.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_scale=affine,
        use_bias=affine,
        name=name,
    )


def _dense(features: int, fan_in: int, dtype: Dtype, name: str, *, use_bias: bool) -> nn.Dense:
    """torch.nn.Linear(fan_in, features, bias=use_bias)."""
    if use_bias:
        return torch_linear(features, fan_in, dtype, name)
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        name=name,
    )


def torch_max_pool(x, window: int = 3, stride: int = 2, padding: int = 1):
    """nn.MaxPool2d(window, stride, padding): the padded border counts as -inf."""
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=_pad(padding))


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3×3 (stride) → BN → ReLU → 3×3 → BN, + shortcut, ReLU."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv(self.planes, 3, self.stride, 1, self.dtype, "conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.planes, 3, 1, 1, self.dtype, "conv2")(y)
        y = _batch_norm(train, self.dtype, "bn2")(y)
        shortcut = x
        if self.downsample:
            shortcut = _conv(self.planes, 1, self.stride, 0, self.dtype, "downsample_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5: the stride sits on the 3×3 conv), expansion 4."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, train: bool):
        out_planes = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, 0, self.dtype, "conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.planes, 3, self.stride, 1, self.dtype, "conv2")(y)
        y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
        y = _conv(out_planes, 1, 1, 0, self.dtype, "conv3")(y)
        y = _batch_norm(train, self.dtype, "bn3")(y)
        shortcut = x
        if self.downsample:
            shortcut = _conv(out_planes, 1, self.stride, 0, self.dtype, "downsample_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """torchvision ResNet without the fc; returns global-average-pooled float32 features.

    width: channels of the stem and first stage (torchvision: 64); stage i has width·2^i planes.
    cifar_stem: solo-learn's CIFAR stem, conv1 = 3×3 / stride 1 / padding 2 and no max-pool
      (a 32×32 input gives a 34×34 map; stages 34 → 17 → 9 → 5). Otherwise the ImageNet stem,
      7×7 / stride 2 / padding 3, BN, ReLU, 3×3 max-pool stride 2 padding 1.
    dtype: compute dtype of convs and BN outputs; parameters and BN statistics stay float32.
    """

    block_cls: type[nn.Module]
    stage_sizes: Sequence[int]
    width: int = 64
    cifar_stem: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            # Replaced after torchvision's init loop, so it keeps nn.Conv2d's default init.
            stem = _conv(self.width, 3, 1, 2, self.dtype, "conv1", torch_default_kernel_init)
        else:
            stem = _conv(self.width, 7, 2, 3, self.dtype, "conv1")
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(stem(x)))
        if not self.cifar_stem:
            x = torch_max_pool(x)

        in_planes = self.width
        expansion = self.block_cls.expansion
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = self.width * 2**stage
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                # torchvision's _make_layer rule for the projection shortcut.
                downsample = index == 0 and (stride != 1 or in_planes != planes * expansion)
                x = self.block_cls(
                    planes, stride, downsample, self.dtype, name=f"layer{stage + 1}_{index}"
                )(x, train)
                in_planes = planes * expansion
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# name -> (block, stage sizes)
BACKBONES = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def _check_backbone(name: str):
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; allowed: {sorted(BACKBONES)}")


def feature_dim(backbone: str, width: int = 64) -> int:
    """Feature size: 512·width/64 for ResNet-18, 2048·width/64 for ResNet-50."""
    _check_backbone(backbone)
    block_cls, stage_sizes = BACKBONES[backbone]
    return width * 2 ** (len(stage_sizes) - 1) * block_cls.expansion


def make_backbone(
    backbone: str,
    *,
    width: int = 64,
    cifar_stem: bool = True,
    dtype: Dtype = jnp.float32,
    stage_sizes: Sequence[int] | None = None,
    name: str | None = None,
) -> ResNet:
    """ResNet by name ('resnet18' | 'resnet50'); stage_sizes overrides the block counts."""
    _check_backbone(backbone)
    block_cls, default_stages = BACKBONES[backbone]
    return ResNet(
        block_cls=block_cls,
        stage_sizes=tuple(stage_sizes or default_stages),
        width=width,
        cifar_stem=cifar_stem,
        dtype=dtype,
        name=name,
    )


PROJECTORS = registry.PROJECTORS


class Projector(nn.Module):
    """The projection head, PyTorch init; float32 output. `kind` picks the paper's head:

    - 'mlp': Linear → ReLU → Linear, no BatchNorm (MoCo v2, SimCo; solo-learn's `projector.0`
      and `projector.2` are `hidden` and `output`).
    - 'mlp_bn': Linear → BN → ReLU → Linear (BYOL, Grill et al. 2020, §3.3).
    - 'mlp3_bn': [Linear (no bias) → BN → ReLU] × 2 → Linear (no bias) → BN without affine
      (SimSiam, Chen & He 2021, §4.1). solo-learn's last Linear has a bias that it freezes at its
      random init: the BN after it cancels it in every output of training, and it shifts that
      BN's running mean by (1 − 0.9^t)·bias after t steps, so an eval-mode projection differs
      from this head's by 0.9^t·bias/σ (below float32's resolution after a few hundred steps).
      The export writes that bias as zeros, which reproduces this head in torch exactly.
    """

    hidden_dim: int
    output_dim: int
    dtype: Dtype = jnp.float32
    kind: str = "mlp"

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = jnp.asarray(x, self.dtype)
        if self.kind not in PROJECTORS:
            raise ValueError(f"unknown projector {self.kind!r}; allowed: {PROJECTORS}")
        if self.kind == "mlp":
            x = torch_linear(self.hidden_dim, x.shape[-1], self.dtype, "hidden")(x)
            x = torch_linear(self.output_dim, self.hidden_dim, self.dtype, "output")(nn.relu(x))
            return x.astype(jnp.float32)
        hidden = ("hidden",) if self.kind == "mlp_bn" else ("hidden", "hidden2")
        bias = self.kind == "mlp_bn"
        for name in hidden:
            x = _dense(self.hidden_dim, x.shape[-1], self.dtype, name, use_bias=bias)(x)
            x = nn.relu(_batch_norm(train, self.dtype, f"{name}_bn")(x))
        x = _dense(self.output_dim, self.hidden_dim, self.dtype, "output", use_bias=bias)(x)
        if self.kind == "mlp3_bn":
            x = _batch_norm(train, self.dtype, "output_bn", affine=False)(x)
        return x.astype(jnp.float32)


class Predictor(nn.Module):
    """BYOL's/SimSiam's predictor on the online branch: Linear → BN → ReLU → Linear.

    BYOL (Grill et al. 2020, §3.3) and SimSiam (Chen & He 2021, §4.1) use the same shape: a
    hidden layer of `hidden_dim` (BYOL 4096, SimSiam 512) back to the projection size.
    `hidden_bias`: the first Linear's bias, which solo-learn's SimSiam drops (the BatchNorm after
    it cancels one in training, but a bias would shift its running mean).
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32
    hidden_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        output_dim = x.shape[-1]
        x = _dense(self.hidden_dim, output_dim, self.dtype, "hidden", use_bias=self.hidden_bias)(x)
        x = nn.relu(_batch_norm(train, self.dtype, "hidden_bn")(x))
        x = torch_linear(output_dim, self.hidden_dim, self.dtype, "output")(x)
        return x.astype(jnp.float32)


class Encoder(nn.Module):
    """Backbone + projector (+ predictor): `(features, projections[, predictions])`.

    Projections and predictions are NOT normalised. Parameters live under `backbone`,
    `projector` and, when `pred_hidden_dim` > 0 and `predict` is asked for, `predictor`
    (solo-learn's attribute names).
    """

    backbone_name: str = "resnet18"
    width: int = 64
    cifar_stem: bool = True
    proj_hidden_dim: int = 128
    proj_output_dim: int = 128
    dtype: Dtype = jnp.float32
    stage_sizes: Sequence[int] | None = None
    projector: str = "mlp"
    pred_hidden_dim: int = 0  # 0: no predictor
    pred_hidden_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool, predict: bool = False):
        features = make_backbone(
            self.backbone_name,
            width=self.width,
            cifar_stem=self.cifar_stem,
            dtype=self.dtype,
            stage_sizes=self.stage_sizes,
            name="backbone",
        )(x, train)
        projections = Projector(
            self.proj_hidden_dim, self.proj_output_dim, self.dtype, self.projector, name="projector"
        )(features, train)
        if not predict:
            return features, projections
        if not self.pred_hidden_dim:
            raise ValueError("predict=True needs an Encoder with pred_hidden_dim > 0")
        predictor = Predictor(
            self.pred_hidden_dim, self.dtype, self.pred_hidden_bias, name="predictor"
        )
        predictions = predictor(projections, train)
        return features, projections, predictions


class LinearProbe(nn.Module):
    """Online linear classifier on stop-gradient features (labels reach only this layer)."""

    num_classes: int

    @nn.compact
    def __call__(self, features):
        features = jax.lax.stop_gradient(jnp.asarray(features, jnp.float32))
        return torch_linear(self.num_classes, features.shape[-1], jnp.float32, "linear")(features)


def create_encoder(config, dtype: Dtype = jnp.float32) -> Encoder:
    """Encoder from config keys backbone, backbone_width, cifar_stem, proj_hidden_dim,
    proj_output_dim, projector, predictor, pred_hidden_dim and pred_hidden_bias."""
    backbone = config["backbone"]
    _check_backbone(backbone)
    return Encoder(
        backbone_name=backbone,
        width=config.get("backbone_width", 64),
        cifar_stem=config.get("cifar_stem", True),
        proj_hidden_dim=config["proj_hidden_dim"],
        proj_output_dim=config["proj_output_dim"],
        dtype=dtype,
        projector=config.get("projector", "mlp"),
        pred_hidden_dim=config["pred_hidden_dim"] if config.get("predictor", False) else 0,
        pred_hidden_bias=config.get("pred_hidden_bias", True),
    )


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays (or jax.ShapeDtypeStructs from eval_shape)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# Flax-examples-style constructors, for callers who prefer classes to names.
ResNet18 = functools.partial(ResNet, block_cls=BasicBlock, stage_sizes=(2, 2, 2, 2))
ResNet50 = functools.partial(ResNet, block_cls=Bottleneck, stage_sizes=(3, 4, 6, 3))
