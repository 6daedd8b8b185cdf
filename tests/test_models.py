"""ResNet and projector: torchvision structure, PyTorch padding and init, BatchNorm, dtypes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simco_jax import models

TINY_WIDTH = 4


def numpy_conv(x, kernel_hwio, stride, pad):
    """Cross-correlation with symmetric zero padding, as torch.nn.functional.conv2d (float64)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = np.asarray(kernel_hwio, np.float64)
    kh, kw, _, out_ch = kernel.shape
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, out_ch))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride
            ]
            out += patch @ kernel[i, j]
    return out


def abstract_variables(model, image_size):
    x = jnp.zeros((2, image_size, image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def abstract_intermediates(model, image_size):
    """Output shapes of every sub-module's __call__, computed abstractly (no FLOPs)."""
    x = jnp.zeros((2, image_size, image_size, 3))

    def run():
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
        return state["intermediates"]

    return jax.eval_shape(run)


def spatial_and_channels(intermediates, *path):
    node = intermediates
    for key in path:
        node = node[key]
    shape = node["__call__"][0].shape
    return shape[1], shape[3]


# ------------------------------------------------------------------------------------------
# Structure: parameter counts and feature-map sizes (abstract evaluation only).
# ------------------------------------------------------------------------------------------


def test_cifar_resnet18_has_torchvision_parameter_count():
    variables = abstract_variables(models.make_backbone("resnet18", cifar_stem=True), 32)
    # torchvision resnet18 = 11,689,512; minus fc (513,000); minus the 7×7→3×3 conv1 (7,680).
    assert models.count_params(variables["params"]) == 11_168_832
    assert models.count_params(variables["batch_stats"]) == 2 * 4800  # 20 BNs, mean and var


def test_imagenet_stem_parameter_counts():
    r50 = abstract_variables(models.make_backbone("resnet50", cifar_stem=False), 64)
    assert models.count_params(r50["params"]) == 23_508_032  # 25,557,032 minus fc (2,049,000)
    r18 = abstract_variables(models.make_backbone("resnet18", cifar_stem=False), 64)
    assert models.count_params(r18["params"]) == 11_176_512  # 11,689,512 minus fc (513,000)


def test_cifar_feature_maps_are_34_17_9_5():
    model = models.make_backbone("resnet18", cifar_stem=True)
    inter = abstract_intermediates(model, 32)
    assert spatial_and_channels(inter, "conv1") == (34, 64)  # 3×3, stride 1, padding 2
    expected = {"layer1_1": (34, 64), "layer2_1": (17, 128), "layer3_1": (9, 256)}
    expected["layer4_1"] = (5, 512)
    for name, size in expected.items():
        assert spatial_and_channels(inter, name) == size, name
    assert "maxpool" not in str(jax.tree_util.tree_structure(inter))
    assert inter["__call__"][0].shape == (2, 512)
    assert inter["__call__"][0].dtype == jnp.float32


def test_imagenet_resnet50_maps_and_v15_stride_placement():
    model = models.make_backbone("resnet50", cifar_stem=False)
    inter = abstract_intermediates(model, 224)
    assert spatial_and_channels(inter, "conv1") == (112, 64)
    # Max-pool 112 -> 56, then 56, 28, 14, 7 with 256..2048 channels.
    for name, size in {
        "layer1_2": (56, 256),
        "layer2_3": (28, 512),
        "layer3_5": (14, 1024),
    }.items():
        assert spatial_and_channels(inter, name) == size, name
    assert spatial_and_channels(inter, "layer4_2") == (7, 2048)
    # v1.5: the 1×1 conv1 keeps 56×56, the 3×3 conv2 strides to 28.
    assert spatial_and_channels(inter, "layer2_0", "conv1") == (56, 128)
    assert spatial_and_channels(inter, "layer2_0", "conv2") == (28, 128)
    # layer1.0 gets a stride-1 projection shortcut because 64 != 256 channels.
    assert spatial_and_channels(inter, "layer1_0", "downsample_conv") == (56, 256)
    assert inter["__call__"][0].shape == (2, 2048)


def test_width_scales_channels_and_feature_dim():
    for backbone, width, dim in (("resnet18", 8, 64), ("resnet50", 16, 512)):
        assert models.feature_dim(backbone, width) == dim
        model = models.make_backbone(backbone, width=width)
        x = jnp.zeros((3, 16, 16, 3))
        out = jax.eval_shape(
            lambda m=model, x=x: m.init_with_output(jax.random.key(0), x, train=False)
        )
        assert out[0].shape == (3, dim)


def test_stage_sizes_override():
    model = models.make_backbone("resnet18", width=TINY_WIDTH, stage_sizes=(1, 1, 1, 1))
    params = abstract_variables(model, 8)["params"]
    assert sorted(k for k in params if k.startswith("layer")) == [
        "layer1_0",
        "layer2_0",
        "layer3_0",
        "layer4_0",
    ]


# ------------------------------------------------------------------------------------------
# PyTorch initialisation statistics (one real init of the full-width CIFAR ResNet-18).
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    """One real initialisation of the paper's encoder, shared by all tests that need values
    (initialisation compiles slowly on CPU). Inputs are 8×8 so forward passes are cheap."""
    config = {
        "backbone": "resnet18",
        "backbone_width": 64,
        "cifar_stem": True,
        "proj_hidden_dim": 128,
        "proj_output_dim": 128,
    }
    model = models.create_encoder(config)
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    variables = jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(42))
    return model, jax.device_get(variables), x


@pytest.fixture(scope="module")
def resnet(encoder):
    """The encoder's backbone as a stand-alone ResNet with its variables."""
    _, variables, x = encoder
    model = models.make_backbone("resnet18", width=64, cifar_stem=True)
    return model, {k: variables[k]["backbone"] for k in ("params", "batch_stats")}, x


@pytest.fixture(scope="module")
def resnet18_variables(resnet):
    return resnet[1]


def _conv_kernels(params, prefix=()):
    for name, value in params.items():
        if isinstance(value, dict):
            yield from _conv_kernels(value, (*prefix, name))
        elif name == "kernel":
            yield "/".join(prefix), np.asarray(value, np.float64)


def test_convs_are_kaiming_normal_fan_out(resnet18_variables):
    kernels = dict(_conv_kernels(resnet18_variables["params"]))
    assert len(kernels) == 20
    for name, kernel in kernels.items():
        if name == "conv1":
            continue
        kh, kw, _, out_ch = kernel.shape
        expected_std = np.sqrt(2.0 / (out_ch * kh * kw))
        n = kernel.size
        # 6 standard errors of the sample std (normal: se ≈ σ/√(2n)) and of the mean.
        assert abs(kernel.std() / expected_std - 1) < 6 / np.sqrt(2 * n), name
        assert abs(kernel.mean()) < 6 * expected_std / np.sqrt(n), name
    # Plain, not truncated, normal: 4.55% of draws beyond 2σ, and draws beyond 4σ exist.
    big = kernels["layer4_1/conv2"]  # 3·3·512·512 draws
    sigma = np.sqrt(2.0 / (512 * 9))
    assert abs(np.mean(np.abs(big) > 2 * sigma) - 0.0455) < 0.001
    assert np.abs(big).max() > 4 * sigma


def test_cifar_conv1_keeps_pytorch_default_uniform_init(resnet18_variables):
    kernel = np.asarray(resnet18_variables["params"]["conv1"]["kernel"], np.float64)
    assert kernel.shape == (3, 3, 3, 64)
    bound = 1 / np.sqrt(3 * 3 * 3)  # kaiming_uniform_(a=√5) -> 1/√fan_in
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.98 * bound  # 1728 draws fill the interval
    assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 0.05
    # Not the kaiming-normal fan_out rule (std 0.059), which the other convs follow.
    assert kernel.std() > 1.5 * np.sqrt(2.0 / (64 * 9))


def test_batchnorm_starts_at_identity(resnet18_variables):
    params, stats = resnet18_variables["params"], resnet18_variables["batch_stats"]
    bn = params["layer3_0"]["downsample_bn"]
    for tree, key, value in ((params, "scale", 1.0), (params, "bias", 0.0)):
        leaves = [
            leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if path[-1].key == key and "bn" in path[-2].key
        ]
        assert len(leaves) == 20
        for leaf in leaves:
            np.testing.assert_array_equal(leaf, value)
    assert bn["scale"].shape == (256,)
    for leaf in jax.tree.leaves(stats["layer2_0"]):
        assert leaf.dtype == np.float32
    np.testing.assert_array_equal(stats["bn1"]["mean"], 0.0)
    np.testing.assert_array_equal(stats["bn1"]["var"], 1.0)


def _assert_torch_linear_init(layer, fan_in):
    bound = 1 / np.sqrt(fan_in)
    kernel = np.asarray(layer["kernel"], np.float64)
    bias = np.asarray(layer["bias"], np.float64)
    assert kernel.shape[0] == fan_in
    for draws in (kernel, bias):
        assert np.abs(draws).max() <= bound
        assert np.abs(draws).max() > 0.8 * bound  # P(all inside) ≤ 0.8^n ≈ 0
    assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 0.05
    assert abs(bias.std() / (bound / np.sqrt(3)) - 1) < 0.25  # few draws


def test_projector_and_probe_use_pytorch_linear_init(encoder):
    params = encoder[1]["params"]["projector"]
    assert params["hidden"]["kernel"].shape == (512, 128)
    _assert_torch_linear_init(params["hidden"], 512)
    _assert_torch_linear_init(params["output"], 128)
    features = jnp.zeros((2, 512))
    probe_params = models.LinearProbe(100).init(jax.random.key(2), features)["params"]
    _assert_torch_linear_init(probe_params["linear"], 512)
    assert probe_params["linear"]["kernel"].shape == (512, 100)


# ------------------------------------------------------------------------------------------
# Padding, BatchNorm modes, dtypes (8×8 inputs).
# ------------------------------------------------------------------------------------------


def test_convs_use_explicit_pytorch_padding(resnet):
    model, variables, x = resnet
    _, state = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    inter, params = state["intermediates"], variables["params"]

    def out(*path):
        node = inter
        for key in path:
            node = node[key]
        return np.asarray(node["__call__"][0], np.float64)

    stem = numpy_conv(x, params["conv1"]["kernel"], stride=1, pad=2)
    np.testing.assert_allclose(out("conv1"), stem, rtol=1e-5, atol=1e-5)
    assert stem.shape[1:3] == (10, 10)

    block_in = out("layer1_1")  # 10×10, even: where "SAME" would pad (0, 1)
    block = params["layer2_0"]
    strided = numpy_conv(block_in, block["conv1"]["kernel"], stride=2, pad=1)
    np.testing.assert_allclose(out("layer2_0", "conv1"), strided, rtol=1e-5, atol=1e-5)
    shortcut = numpy_conv(block_in, block["downsample_conv"]["kernel"], stride=2, pad=0)
    np.testing.assert_allclose(out("layer2_0", "downsample_conv"), shortcut, rtol=1e-5, atol=1e-5)

    # The check can tell the difference: Flax's "SAME" gives another result on this input.
    same = jax.lax.conv_general_dilated(
        jnp.asarray(block_in, jnp.float32),
        block["conv1"]["kernel"],
        (2, 2),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert same.shape == strided.shape
    assert np.abs(np.asarray(same) - strided).max() > 1e-2


def test_max_pool_pads_with_minus_infinity():
    x = -1.0 - np.arange(2 * 5 * 5 * 1, dtype=np.float32).reshape(2, 5, 5, 1)  # all negative
    got = np.asarray(models.torch_max_pool(jnp.asarray(x)))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    want = np.empty((2, 3, 3, 1), np.float32)
    for i in range(3):
        for j in range(3):
            want[:, i, j] = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    np.testing.assert_array_equal(got, want)
    assert got.max() < 0  # zero padding would have produced zeros on the border


def test_train_mode_normalises_with_batch_stats_and_updates_running_averages(resnet):
    model, variables, x = resnet
    features, state = model.apply(
        variables,
        x,
        train=True,
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    bn_out = np.asarray(state["intermediates"]["bn1"]["__call__"][0], np.float64)
    mean, var = conv.mean(axis=(0, 1, 2)), conv.var(axis=(0, 1, 2))
    np.testing.assert_allclose(bn_out, (conv - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    # PyTorch momentum 0.1: running = 0.9·running + 0.1·batch, from mean 0 and var 1.
    new = state["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
    # Every BN layer moved.
    changed = jax.tree.map(
        lambda a, b: not np.allclose(a, b), variables["batch_stats"], state["batch_stats"]
    )
    assert all(jax.tree.leaves(changed))
    # In train mode a sample's features depend on the rest of the batch.
    alone = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])[0]
    assert np.abs(np.asarray(features[:1]) - np.asarray(alone)).max() > 1e-3


def test_eval_mode_uses_running_averages(resnet):
    model, variables, x = resnet
    rng = np.random.default_rng(0)
    draw = lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    stats = jax.tree.map(draw, variables["batch_stats"])
    stats["bn1"]["mean"] = rng.normal(size=64).astype(np.float32)
    evaluated = {"params": variables["params"], "batch_stats": stats}
    features, state = model.apply(
        evaluated, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    bn_out = np.asarray(state["intermediates"]["bn1"]["__call__"][0], np.float64)
    want = (conv - stats["bn1"]["mean"]) / np.sqrt(stats["bn1"]["var"] + 1e-5)
    np.testing.assert_allclose(bn_out, want, rtol=1e-5, atol=1e-5)
    # Per-sample outputs do not depend on the batch.
    alone = model.apply(evaluated, x[1:2], train=False)
    np.testing.assert_allclose(features[1:2], alone, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_stats_and_outputs(encoder):
    model, variables, x = encoder
    model = model.clone(dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    (features, projections), state = model.apply(
        variables,
        x,
        train=True,
        capture_intermediates=True,
        mutable=["batch_stats", "intermediates"],
    )
    assert state["intermediates"]["backbone"]["conv1"]["__call__"][0].dtype == jnp.bfloat16
    assert features.dtype == projections.dtype == jnp.float32
    assert features.shape == (4, 512) and projections.shape == (4, 128)
    assert np.isfinite(features).all() and np.isfinite(projections).all()
    assert {leaf.dtype for leaf in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype("float32")}
    # The statistics agree with the float32 model's to bf16 accuracy.
    f32_state = model.clone(dtype=jnp.float32).apply(
        variables, x, train=True, mutable=["batch_stats"]
    )[1]
    bf16_mean = state["batch_stats"]["backbone"]["bn1"]["mean"]
    np.testing.assert_allclose(
        bf16_mean, f32_state["batch_stats"]["backbone"]["bn1"]["mean"], rtol=0.02, atol=2e-3
    )


# ------------------------------------------------------------------------------------------
# Encoder, factory, probe, helpers.
# ------------------------------------------------------------------------------------------


def test_encoder_returns_features_and_unnormalised_projections(encoder):
    model, variables, x = encoder
    assert set(variables["params"]) == {"backbone", "projector"}
    features, projections = model.apply(variables, x, train=False)
    proj = variables["params"]["projector"]
    f = np.asarray(features, np.float64)
    hidden = np.maximum(f @ proj["hidden"]["kernel"] + proj["hidden"]["bias"], 0)
    want = hidden @ proj["output"]["kernel"] + proj["output"]["bias"]
    np.testing.assert_allclose(projections, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(projections, axis=-1), 1.0)


def test_create_encoder_reads_config_dict_and_rejects_unknown_backbone():
    config = ml_collections.ConfigDict(
        dict(
            backbone="resnet50",
            backbone_width=16,
            cifar_stem=False,
            proj_hidden_dim=32,
            proj_output_dim=8,
        )
    )
    model = models.create_encoder(config, dtype=jnp.bfloat16)
    assert (model.backbone_name, model.width, model.cifar_stem) == ("resnet50", 16, False)
    assert (model.proj_hidden_dim, model.proj_output_dim, model.dtype) == (32, 8, jnp.bfloat16)
    config.backbone = "vit_tiny"
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        models.create_encoder(config)


def test_linear_probe_stops_gradients_into_features():
    probe = models.LinearProbe(5)
    features = jax.random.normal(jax.random.key(9), (4, 12))
    params = probe.init(jax.random.key(10), features)
    grad = jax.grad(lambda f: probe.apply(params, f).sum())(features)
    np.testing.assert_array_equal(grad, 0.0)
    logits = probe.apply(params, features)
    layer = params["params"]["linear"]
    np.testing.assert_allclose(logits, features @ layer["kernel"] + layer["bias"], rtol=1e-5)


def test_count_params():
    tree = {"a": np.zeros((2, 3)), "b": [np.zeros(4), jax.ShapeDtypeStruct((5, 1, 2), jnp.int8)]}
    assert models.count_params(tree) == 6 + 4 + 10
    assert models.count_params({}) == 0
