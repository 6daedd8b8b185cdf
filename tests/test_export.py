"""Export tests: torchvision names, shapes and layouts, exact round trips, torch-layout forwards."""

import importlib.util
import json
import os
import re
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import run_python

from simco_jax import export, models

TINY_WIDTH = 4


def assert_features_close(actual, expected):
    """Equal up to float32 rounding. Random weights make activations of ~1e4 whose sums of
    thousands of terms round differently in torch and XLA, so the error is measured against the
    features' scale, not per element."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(actual - expected)) <= 1e-5 * scale, np.max(np.abs(actual - expected))


def random_variables(model, x, seed=0):
    """Variables with the model's structure and distinct random values (no init compile).

    BatchNorm running variances are kept positive so eval-mode forward passes are meaningful.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes["params"]
    )
    stats = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            rng.uniform(0.5, 1.5, s.shape) if path[-1].key == "var" else rng.normal(0, 0.2, s.shape)
        ).astype(np.float32),
        shapes["batch_stats"],
    )
    return {"params": params, "batch_stats": stats}


def flax_location(torch_name):
    """Independent inverse of the naming rule: torch name -> (collection, flax path)."""
    parts = torch_name.split(".")
    path = []
    i = 0
    while i < len(parts) - 1:
        if parts[i].startswith("layer"):
            path.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        elif parts[i] == "downsample":
            path.append({"0": "downsample_conv", "1": "downsample_bn"}[parts[i + 1]])
            i += 2
        else:
            path.append(parts[i])
            i += 1
    leaf = parts[-1]
    is_conv = "conv" in path[-1]
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", (*path, leaf.removeprefix("running_")), None
    if leaf == "weight":
        return (
            "params",
            (*path, "kernel" if is_conv else "scale"),
            (3, 2, 0, 1) if is_conv else None,
        )
    return "params", (*path, leaf), None


def lookup(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


# ------------------------------------------------------------------------------------------
# torchvision rules against torchvision's published numbers.
# ------------------------------------------------------------------------------------------


def _learnable_count(shapes):
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(int(np.prod(s)) for n, s in shapes.items() if not n.endswith(buffers))


def test_torchvision_rules_match_published_sizes():
    r18 = export.torchvision_state_dict_shapes("resnet18", cifar_stem=True)
    # torchvision resnet18 state_dict has 122 entries; without fc.weight/fc.bias 120:
    # 20 convs (1 stem + 16 in blocks + 3 downsample) and 20 BNs × 5 entries.
    assert len(r18) == 120
    assert _learnable_count(r18) == 11_168_832
    assert r18["conv1.weight"] == (64, 3, 3, 3)
    assert r18["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert r18["layer4.1.bn2.num_batches_tracked"] == ()
    assert "layer1.0.downsample.0.weight" not in r18
    assert "fc.weight" not in r18

    r18_imagenet = export.torchvision_state_dict_shapes("resnet18", cifar_stem=False)
    assert _learnable_count(r18_imagenet) == 11_689_512 - 513_000
    r50 = export.torchvision_state_dict_shapes("resnet50", cifar_stem=False)
    assert len(r50) == 320 - 2  # 53 convs + 53 BNs × 5
    assert _learnable_count(r50) == 25_557_032 - 2_049_000
    assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert r50["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert r50["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    with pytest.raises(ValueError, match="resnet18"):
        export.torchvision_state_dict_shapes("resnet34")


# ------------------------------------------------------------------------------------------
# Full-width layouts (shapes only; values are zeros built from jax.eval_shape).
# ------------------------------------------------------------------------------------------


def _zeros_like_abstract(model, image_size):
    x = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def test_full_width_resnet18_file_has_torchvision_names_shapes_and_format(tmp_path):
    variables = _zeros_like_abstract(models.make_backbone("resnet18", cifar_stem=True), 32)
    path = tmp_path / "resnet18.safetensors"
    export.export_torch_state_dict(variables["params"], variables["batch_stats"], path)
    expected = export.torchvision_state_dict_shapes("resnet18", width=64, cifar_stem=True)

    # Parse the file by the safetensors spec, not with our reader.
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert header_len % 8 == 0
    header = json.loads(data[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert list(header) == list(expected)  # torchvision's state_dict order
    spans = []
    for name, info in header.items():
        assert tuple(info["shape"]) == expected[name], name
        want_dtype = "I64" if name.endswith("num_batches_tracked") else "F32"
        assert info["dtype"] == want_dtype, name
        begin, end = info["data_offsets"]
        itemsize = 8 if want_dtype == "I64" else 4
        assert end - begin == itemsize * int(np.prod(info["shape"]))
        assert begin % itemsize == 0  # aligned for zero-copy loaders
        spans.append((begin, end))
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - header_len
    assert all(
        a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True)
    )  # contiguous, no holes


def test_full_width_resnet50_names_and_shapes():
    variables = _zeros_like_abstract(models.make_backbone("resnet50", cifar_stem=False), 32)
    tensors = export.backbone_state_dict(variables["params"], variables["batch_stats"])
    expected = export.torchvision_state_dict_shapes("resnet50", width=64, cifar_stem=False)
    assert {n: t.shape for n, t in tensors.items()} == expected


# ------------------------------------------------------------------------------------------
# Tiny width: exact values and a forward pass in torch layout.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    model = models.Encoder(width=TINY_WIDTH, proj_hidden_dim=16, proj_output_dim=8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = random_variables(model, x)
    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    export.export_torch_state_dict(
        variables["params"], variables["batch_stats"], path, include_projector=True
    )
    return model, variables, x, export.load_safetensors(path)


def test_tiny_export_round_trips_exactly(tiny_export):
    _, variables, _, loaded = tiny_export
    expected = export.torchvision_state_dict_shapes("resnet18", width=TINY_WIDTH)
    projector_names = ["projector.0.weight", "projector.0.bias"]
    projector_names += ["projector.2.weight", "projector.2.bias"]
    assert list(loaded) == list(expected) + projector_names
    assert {n: loaded[n].shape for n in expected} == expected

    backbone = {k: variables[k]["backbone"] for k in ("params", "batch_stats")}
    used = set()
    for name in expected:
        if name.endswith("num_batches_tracked"):
            assert loaded[name].dtype == np.int64 and loaded[name] == 0
            continue
        collection, path, to_torch = flax_location(name)
        value = lookup(backbone[collection], path)
        if to_torch:
            value = value.transpose(to_torch)
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
        used.add((collection, path))
    # Every Flax leaf was exported exactly once.
    n_leaves = len(jax.tree.leaves(backbone))
    assert len(used) == n_leaves

    projector = variables["params"]["projector"]
    for index, layer in ((0, "hidden"), (2, "output")):
        np.testing.assert_array_equal(
            loaded[f"projector.{index}.weight"], projector[layer]["kernel"].T
        )
        np.testing.assert_array_equal(loaded[f"projector.{index}.bias"], projector[layer]["bias"])


def _conv_nchw(x, weight_oihw, stride, pad):
    """torch.nn.functional.conv2d in NumPy (float64)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_ch, _, kh, kw = weight_oihw.shape
    oh = (x.shape[2] - kh) // stride + 1
    ow = (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_ch, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :, :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride
            ]
            out += np.einsum("nchw,oc->nohw", patch, weight_oihw[:, :, i, j])
    return out


def _torchvision_resnet18_eval(sd, x_nchw):
    """torchvision BasicBlock ResNet forward in eval mode, driven only by state-dict names."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}

    def bn(x, name):
        scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
        shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    relu = lambda x: np.maximum(x, 0)
    x = relu(bn(_conv_nchw(x_nchw, sd["conv1.weight"], 1, 2), "bn1"))  # CIFAR stem
    for layer in range(1, 5):
        for index in range(2):
            p = f"layer{layer}.{index}"
            stride = 2 if layer > 1 and index == 0 else 1
            out = relu(bn(_conv_nchw(x, sd[f"{p}.conv1.weight"], stride, 1), f"{p}.bn1"))
            out = bn(_conv_nchw(out, sd[f"{p}.conv2.weight"], 1, 1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                x = bn(
                    _conv_nchw(x, sd[f"{p}.downsample.0.weight"], stride, 0), f"{p}.downsample.1"
                )
            x = relu(out + x)
    return x.mean(axis=(2, 3))


def test_exported_weights_reproduce_flax_forward_in_torch_layout(tiny_export):
    model, variables, x, loaded = tiny_export
    features, projections = model.apply(variables, x, train=False)
    x_nchw = np.asarray(x, np.float64).transpose(0, 3, 1, 2)
    torch_features = _torchvision_resnet18_eval(loaded, x_nchw)
    np.testing.assert_allclose(features, torch_features, rtol=1e-4, atol=1e-5)
    hidden = np.maximum(
        torch_features @ loaded["projector.0.weight"].T + loaded["projector.0.bias"], 0
    )
    torch_projections = hidden @ loaded["projector.2.weight"].T + loaded["projector.2.bias"]
    np.testing.assert_allclose(projections, torch_projections, rtol=1e-4, atol=1e-5)


# solo-learn's projectors as torch.nn.Sequential, layer by layer (solo/methods/{mocov2plus,byol,
# simsiam}.py): "linear" has a bias, "linear_nobias" not; "bn_noaffine" has no weight or bias.
SOLO_LEARN_PROJECTORS = {
    "mlp": ("linear", "relu", "linear"),
    "mlp_bn": ("linear", "bn", "relu", "linear"),
    "mlp3_bn": (
        *("linear_nobias", "bn", "relu"),
        *("linear_nobias", "bn", "relu"),
        *("linear", "bn_noaffine"),
    ),
}
_LEAVES = {
    "linear": ("weight", "bias"),
    "linear_nobias": ("weight",),
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    "bn_noaffine": ("running_mean", "running_var", "num_batches_tracked"),
    "relu": (),
}


def _solo_learn_projector_eval(layers, tensors, x):
    """The Sequential of `layers` in eval mode on the exported `projector.*` tensors (float64)."""
    sd = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    for index, layer in enumerate(layers):
        p = f"projector.{index}"
        if layer == "relu":
            x = np.maximum(x, 0)
        elif layer.startswith("linear"):
            x = x @ sd[f"{p}.weight"].T + sd.get(f"{p}.bias", 0.0)
        else:
            x = (x - sd[f"{p}.running_mean"]) / np.sqrt(sd[f"{p}.running_var"] + 1e-5)
            if layer == "bn":
                x = x * sd[f"{p}.weight"] + sd[f"{p}.bias"]
    return x


@pytest.mark.parametrize("kind", sorted(SOLO_LEARN_PROJECTORS))
def test_every_projector_exports_in_torch_layer_order_with_its_batch_norm(kind, tmp_path):
    assert set(SOLO_LEARN_PROJECTORS) == set(models.PROJECTORS)
    model = models.Encoder(width=TINY_WIDTH, proj_hidden_dim=16, proj_output_dim=8, projector=kind)
    x = jax.random.normal(jax.random.key(4), (3, 8, 8, 3))
    variables = random_variables(model, x, seed=3)
    path = tmp_path / f"{kind}.safetensors"
    export.export_torch_state_dict(
        variables["params"], variables["batch_stats"], path, include_projector=True
    )
    loaded = export.load_safetensors(path)
    layers = SOLO_LEARN_PROJECTORS[kind]
    names = [f"projector.{i}.{leaf}" for i, layer in enumerate(layers) for leaf in _LEAVES[layer]]
    assert [n for n in loaded if n.startswith("projector.")] == names  # torch's state_dict order
    features, projections = model.apply(variables, x, train=False)
    np.testing.assert_allclose(
        _solo_learn_projector_eval(layers, loaded, np.asarray(features, np.float64)),
        projections,
        rtol=1e-4,
        atol=1e-5,
    )
    if kind == "mlp3_bn":  # solo-learn's frozen bias before the last BatchNorm: zeros
        np.testing.assert_array_equal(loaded["projector.6.bias"], 0.0)
    # The printed loading code builds the same Sequential.
    modules = export.torch_projector_layers(loaded)
    assert [m.split("(")[0].removeprefix("torch.nn.") for m in modules] == [
        {"linear": "Linear", "linear_nobias": "Linear", "relu": "ReLU"}.get(layer, "BatchNorm1d")
        for layer in layers
    ]
    assert [("bias=False" in m) for m in modules] == [la == "linear_nobias" for la in layers]
    assert [("affine=False" in m) for m in modules] == [la == "bn_noaffine" for la in layers]


def test_a_projector_without_a_torch_mapping_is_refused_before_writing(tmp_path):
    model = models.Encoder(width=TINY_WIDTH, proj_hidden_dim=16, proj_output_dim=8)
    variables = random_variables(model, jnp.zeros((1, 8, 8, 3)))
    params = dict(variables["params"])
    params["projector"] = {**params["projector"], "extra": params["projector"]["output"]}
    with pytest.raises(ValueError, match="match no exportable head"):
        export.export_torch_state_dict(
            params, variables["batch_stats"], tmp_path / "x", include_projector=True
        )
    assert not any(tmp_path.iterdir())


def test_export_rejects_mismatched_trees(tmp_path):
    model = models.make_backbone("resnet18", width=TINY_WIDTH)
    variables = random_variables(model, jnp.zeros((1, 8, 8, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    with pytest.raises(ValueError, match="resnet50"):
        export.export_torch_state_dict(params, stats, tmp_path / "a", backbone="resnet50")
    with pytest.raises(ValueError, match="allowed"):
        export.export_torch_state_dict(params, stats, tmp_path / "b", backbone="vgg16")
    with pytest.raises(ValueError, match="projector"):
        export.export_torch_state_dict(params, stats, tmp_path / "c", include_projector=True)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_safetensors_round_trip_of_mixed_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(2, 3)).astype(np.float32),
        "f16": rng.normal(size=(5,)).astype(np.float16),
        "bf16": rng.normal(size=(3, 1)).astype(ml_dtypes.bfloat16),
        "i64_scalar": np.array(7, np.int64),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "mask": np.array([True, False, True]),
        "big_endian": np.arange(4, dtype=">f8"),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "mixed.safetensors"
    export.save_safetensors(tensors, path)
    loaded = export.load_safetensors(path)
    assert list(loaded) == list(tensors)
    for name, value in tensors.items():
        assert loaded[name].shape == value.shape, name
        assert loaded[name].dtype == value.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    # Bytes on disk are little-endian whatever the input byte order.
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    info = json.loads(path.read_bytes()[8 : 8 + header_len])["big_endian"]
    begin, end = info["data_offsets"]
    body = path.read_bytes()[8 + header_len :]
    assert info["dtype"] == "F64"
    assert body[begin:end] == np.arange(4, dtype="<f8").tobytes()


def test_files_load_with_safetensors_package_when_installed(tiny_export, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, variables, _, loaded = tiny_export
    path = tmp_path / "again.safetensors"
    export.export_torch_state_dict(variables["params"], variables["batch_stats"], path)
    reference = safetensors_numpy.load_file(str(path))
    assert set(reference) == set(export.torchvision_state_dict_shapes("resnet18", TINY_WIDTH))
    for name, value in reference.items():
        np.testing.assert_array_equal(value, loaded[name])


def _torch(mode, directory):
    """Runs tests/torch_worker.py MODE DIRECTORY in a fresh interpreter (see its docstring)."""
    for module in ("torch", "torchvision", "safetensors"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the `export` extra)")
    run_python([os.path.join("tests", "torch_worker.py"), mode, str(directory)])


def test_torch_conv2d_on_exported_weights_matches_flax(tiny_export, tmp_path):
    model, variables, x, loaded = tiny_export
    _, state = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]["backbone"]
    export.export_torch_state_dict(
        variables["params"], variables["batch_stats"], tmp_path / "export.safetensors"
    )
    np.save(tmp_path / "x.npy", np.asarray(x))
    np.save(tmp_path / "block_in.npy", np.asarray(inter["layer1_1"]["__call__"][0]))
    _torch("conv", tmp_path)
    np.testing.assert_allclose(
        np.load(tmp_path / "stem.npy"), inter["conv1"]["__call__"][0], atol=1e-5
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "strided.npy"),
        inter["layer2_0"]["conv1"]["__call__"][0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_torchvision_resnet18_loads_strictly_and_matches_flax(tmp_path):
    model = models.make_backbone("resnet18", width=64, cifar_stem=True)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    variables = random_variables(model, x, seed=1)
    export.export_torch_state_dict(
        variables["params"], variables["batch_stats"], tmp_path / "export.safetensors"
    )
    np.save(tmp_path / "x.npy", np.asarray(x))
    _torch("resnet18", tmp_path)
    features = model.apply(variables, x, train=False)
    assert_features_close(np.load(tmp_path / "features.npy"), features)


@pytest.mark.parametrize("width, cifar_stem", [(4, True), (64, True), (8, False)])
def test_loading_snippet_names_the_constructor_and_widths(width, cifar_stem):
    shapes = export.torchvision_state_dict_shapes("resnet18", width, cifar_stem)
    message = export.describe_export("out.safetensors", {k: np.zeros(s) for k, s in shapes.items()})
    stem = "CIFAR" if cifar_stem else "ImageNet"
    assert message.startswith(
        f"wrote 120 tensors to out.safetensors: resnet18 backbone, width {width}, {stem} stem."
    )
    assert "model = torchvision.models.resnet18()\n" in message
    assert message.endswith('state = load_file("out.safetensors")\nmodel.load_state_dict(state)')
    kernel = "3, 1, 2" if cifar_stem else "7, 2, 3"
    conv1 = f"model.conv1 = torch.nn.Conv2d(3, {width}, {kernel}, bias=False)"
    assert (conv1 in message) == (cifar_stem or width != 64)
    assert ("model.maxpool = torch.nn.Identity()" in message) == cifar_stem
    if width == 64:  # the stock constructor's widths: nothing rebuilt
        assert "cannot load it" not in message and "_make_layer" not in message
    else:
        rebuilt = (
            f"has width 64 and cannot load it; this rebuilds its stem and stages at width {width}"
        )
        assert rebuilt in message
        for i in range(4):
            stride = "" if i == 0 else ", stride=2"
            layer = f"model.layer{i + 1} = model._make_layer(BasicBlock, {width * 2**i}, 2{stride})"
            assert layer in message


@pytest.mark.parametrize(
    "width, include_projector, kind",
    [(4, False, "mlp"), (64, False, "mlp"), (8, True, "mlp"), (4, True, "mlp_bn")]
    + [(4, True, "mlp3_bn")],
)
def test_printed_snippet_loads_the_export_into_torchvision(
    width, include_projector, kind, tmp_path
):
    """The code the export prints, run as printed: strict loads, and the Flax features."""
    model = models.Encoder(width=width, proj_hidden_dim=16, proj_output_dim=8, projector=kind)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    variables = random_variables(model, x, seed=2)
    path = tmp_path / "encoder.safetensors"
    tensors = export.export_torch_state_dict(
        variables["params"], variables["batch_stats"], path, include_projector=include_projector
    )
    message = export.describe_export(path, tensors)
    # The message, then a blank line, then the code.
    (tmp_path / "snippet.py").write_text(message.split("\n\n", 1)[1])
    np.save(tmp_path / "x.npy", np.asarray(x))
    _torch("snippet", tmp_path)
    flax_features, flax_projections = model.apply(variables, x, train=False)
    assert_features_close(np.load(tmp_path / "features.npy"), flax_features)
    if include_projector:
        assert_features_close(np.load(tmp_path / "projections.npy"), flax_projections)


def _run_without_checkpoint(tmp_path):
    """A workdir with the run's config.json and an empty checkpoints/ (nothing saved yet)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    return run


@pytest.mark.parametrize(
    "workdir, out, message",
    [
        ("", "x.safetensors", "--workdir is empty"),
        ("nope", "x.safetensors", r"--workdir='.*nope' does not exist; pass a training run's"),
        ("file", "x.safetensors", r"--workdir='.*file' is not a directory"),
        ("bare", "x.safetensors", r"--workdir='.*bare' holds no config.json: it is not a train"),
        ("bad_json", "x.safetensors", r"config.json cannot be read \(.*\); the run's workdir is"),
        ("no_ckpt", "x.safetensors", r"has no checkpoints/ directory: the run has not saved"),
        ("run", "x.safetensors", r"checkpoints holds no checkpoint: the run has not saved one"),
        ("saved", "", "--out is empty"),
        ("saved", ".", r"--out='.*' is a directory; pass a file path in it"),
        ("saved", "missing/x.safetensors", r"the directory of --out='.*' does not exist; create"),
    ],
)
def test_bad_workdir_and_out_are_named_in_one_line(workdir, out, message, tmp_path):
    run = _run_without_checkpoint(tmp_path)
    (tmp_path / "file").write_text("")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{")
    (tmp_path / "no_ckpt").mkdir()
    (tmp_path / "no_ckpt" / "config.json").write_text("{}")
    (tmp_path / "saved" / "checkpoints" / "8").mkdir(parents=True)  # a run with a step saved
    (tmp_path / "saved" / "config.json").write_text("{}")
    where = lambda p: p and str(tmp_path / p)
    line = export.argument_error(where(workdir), where(out) if out != "." else str(run))
    assert re.search(message, line) and "\n" not in line and "pretrained" not in line, line
    assert export.argument_error(where("saved"), where("x.safetensors")) is None


def test_export_of_a_run_without_a_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    run = _run_without_checkpoint(tmp_path)
    (run / "config.json").write_text(json.dumps({"seed": 15}))
    out = tmp_path / "x.safetensors"
    result = run_python(["-m", "simco_jax.export", f"--workdir={run}", f"--out={out}"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: {run}/checkpoints holds no checkpoint: the run has not saved one yet"
    assert not out.exists()
