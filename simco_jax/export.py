"""Export the backbone (and optionally the projector) as a PyTorch state dict, without torch.

The file is safetensors, written by hand: an 8-byte little-endian header length N, N bytes of
JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` (padded
with spaces to a multiple of 8), then the raw little-endian tensor bytes; offsets count from the
end of the header. `safetensors.torch.load_file(path)` gives a dict that loads with
`torchvision.models.resnet18()` (conv1 replaced for CIFAR, fc dropped) via `load_state_dict` at
width 64; `describe_export` writes the loading code for any width (what the command line prints).

Layouts: Flax conv kernels are HWIO, torch's OIHW; Flax Dense kernels are (in, out), torch's
Linear weight is (out, in). BatchNorm: scale → weight, bias → bias, batch_stats mean/var →
running_mean/running_var, plus torch's int64 scalar num_batches_tracked (written as 0; torch only
reads it when momentum=None). The projector, with `include_projector`, is solo-learn's
torch.nn.Sequential of its kind (`PROJECTOR_LAYERS`), BatchNorms included; the printed loading
code rebuilds that Sequential.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from simco_jax.models import BACKBONES

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------------------------
# torchvision naming rules, written from torchvision.models.resnet, independent of models.py.
# --------------------------------------------------------------------------------------------


def torchvision_state_dict_shapes(
    backbone: str, width: int = 64, cifar_stem: bool = True
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of torchvision's ResNet state dict without `fc`, in state_dict order.

    cifar_stem: conv1 is 3×3 (solo-learn) instead of 7×7. Widths follow torchvision's
    `width_per_group=64` scaled by width/64 (planes 64, 128, 256, 512 at width 64).
    """
    rules = {"resnet18": ("basic", (2, 2, 2, 2), 1), "resnet50": ("bottleneck", (3, 4, 6, 3), 4)}
    if backbone not in rules:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {sorted(rules)}")
    block, layers, expansion = rules[backbone]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, out_ch, in_ch, k):
        shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)

    def bn(name, ch):  # parameters first, then buffers (nn.Module.state_dict order)
        for suffix in _BN_SUFFIXES:
            shapes[f"{name}.{suffix}"] = () if suffix == "num_batches_tracked" else (ch,)

    conv("conv1", width, 3, 3 if cifar_stem else 7)
    bn("bn1", width)
    inplanes = width
    for layer, num_blocks in enumerate(layers, start=1):
        planes = width * 2 ** (layer - 1)
        for index in range(num_blocks):
            stride = 2 if layer > 1 and index == 0 else 1
            prefix = f"layer{layer}.{index}"
            if block == "basic":
                conv(f"{prefix}.conv1", planes, inplanes, 3)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
            else:
                conv(f"{prefix}.conv1", planes, inplanes, 1)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
                conv(f"{prefix}.conv3", planes * expansion, planes, 1)
                bn(f"{prefix}.bn3", planes * expansion)
            if stride != 1 or inplanes != planes * expansion:
                conv(f"{prefix}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return shapes


# --------------------------------------------------------------------------------------------
# Flax trees -> torch-named numpy arrays.
# --------------------------------------------------------------------------------------------


def _torch_module_name(flax_path: tuple[str, ...]) -> str:
    """('layer2_0', 'downsample_bn') -> 'layer2.0.downsample.1'."""
    parts = []
    for part in flax_path:
        if part.startswith("layer") and "_" in part:
            parts.extend(part.split("_", 1))  # layer2_0 -> layer2.0
        elif part == "downsample_conv":
            parts.append("downsample.0")
        elif part == "downsample_bn":
            parts.append("downsample.1")
        else:
            parts.append(part)
    return ".".join(parts)


def backbone_state_dict(params, batch_stats) -> dict[str, np.ndarray]:
    """torchvision-named arrays (OIHW convs, BN buffers) from a ResNet's params/batch_stats."""
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        module, leaf = _torch_module_name(path[:-1]), path[-1]
        value = np.asarray(value)
        if leaf == "kernel":  # conv, HWIO -> OIHW
            out[f"{module}.weight"] = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        elif leaf == "scale":  # BatchNorm
            out[f"{module}.weight"] = value
            out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
        elif leaf == "bias":
            out[f"{module}.bias"] = value
        else:
            raise ValueError(f"unexpected backbone parameter {'/'.join(path)}")
    stat_names = {"mean": "running_mean", "var": "running_var"}
    for path, value in traverse_util.flatten_dict(batch_stats).items():
        out[f"{_torch_module_name(path[:-1])}.{stat_names[path[-1]]}"] = np.asarray(value)
    return out


# The projector kinds of `models.Projector` as torch.nn.Sequential layers, in torch's order:
# (Flax module, Sequential index, what it is). The ReLUs hold the indices between. 'linear0'
# is a Linear whose torch twin has a bias the Flax head lacks (solo-learn's SimSiam freezes it
# under a BatchNorm): exported as zeros, which gives the Flax head's outputs.
PROJECTOR_LAYERS = {
    "mlp": (("hidden", 0, "linear"), ("output", 2, "linear")),
    "mlp_bn": (("hidden", 0, "linear"), ("hidden_bn", 1, "bn"), ("output", 3, "linear")),
    "mlp3_bn": (
        ("hidden", 0, "linear"),
        ("hidden_bn", 1, "bn"),
        ("hidden2", 3, "linear"),
        ("hidden2_bn", 4, "bn"),
        ("output", 6, "linear0"),
        ("output_bn", 7, "bn"),
    ),
}


def projector_kind(projector_params, projector_stats=None) -> str:
    """The `models.Projector` kind whose layers these are; ValueError for a head with no torch
    mapping here."""
    names = set(projector_params) | set(projector_stats or {})
    for kind, layers in PROJECTOR_LAYERS.items():
        if names == {name for name, _, _ in layers}:
            return kind
    raise ValueError(
        f"the projector's layers {sorted(names)} match no exportable head "
        f"{sorted(PROJECTOR_LAYERS)}; export without --include_projector"
    )


def projector_state_dict(projector_params, projector_stats=None) -> dict[str, np.ndarray]:
    """The projector as torch.nn.Sequential names (`projector.<index>.<leaf>`), in torch's order:
    Linear weight (out, in) and bias; BatchNorm weight, bias (when affine), running_mean,
    running_var, num_batches_tracked."""
    projector_stats = projector_stats or {}
    out = {}
    for name, index, what in PROJECTOR_LAYERS[projector_kind(projector_params, projector_stats)]:
        prefix, layer = f"projector.{index}", projector_params.get(name, {})
        if what.startswith("linear"):
            out[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
            if "bias" in layer:
                out[f"{prefix}.bias"] = np.asarray(layer["bias"])
            elif what == "linear0":
                out[f"{prefix}.bias"] = np.zeros(out[f"{prefix}.weight"].shape[0], np.float32)
            continue
        if "scale" in layer:  # affine
            out[f"{prefix}.weight"] = np.asarray(layer["scale"])
            out[f"{prefix}.bias"] = np.asarray(layer["bias"])
        out[f"{prefix}.running_mean"] = np.asarray(projector_stats[name]["mean"])
        out[f"{prefix}.running_var"] = np.asarray(projector_stats[name]["var"])
        out[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _split_encoder_tree(tree):
    """Accept a backbone's tree or an Encoder's ({'backbone': ..., 'projector': ...})."""
    if isinstance(tree, Mapping) and "backbone" in tree:
        return tree["backbone"], tree.get("projector")
    return tree, None


def export_torch_state_dict(
    params,
    batch_stats,
    path,
    *,
    backbone: str = "resnet18",
    include_projector: bool = False,
) -> dict[str, np.ndarray]:
    """Write the backbone (and projector) as a torchvision-named safetensors file.

    params/batch_stats: a ResNet's variables or an Encoder's (with `backbone`/`projector`).
    The names and shapes are checked against `torchvision_state_dict_shapes` before writing,
    so a file that would not `load_state_dict(strict=True)` is never produced.
    Returns the written arrays (torch names, torchvision order).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {sorted(BACKBONES)}")
    backbone_params, projector_params = _split_encoder_tree(params)
    backbone_stats, projector_stats = _split_encoder_tree(batch_stats)
    tensors = backbone_state_dict(backbone_params, backbone_stats)

    stem = tensors["conv1.weight"].shape  # (width, 3, k, k)
    expected = torchvision_state_dict_shapes(backbone, width=stem[0], cifar_stem=stem[-1] == 3)
    got = {name: tuple(value.shape) for name, value in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = [n for n in expected if n in got and got[n] != expected[n]][:5]
        raise ValueError(
            f"parameters do not match torchvision {backbone}: missing {missing}, "
            f"unexpected {extra}, wrong shapes {wrong}"
        )
    tensors = {name: tensors[name] for name in expected}  # torchvision's order

    if include_projector:
        if projector_params is None:
            raise ValueError("include_projector=True needs an Encoder's params (with 'projector')")
        tensors.update(projector_state_dict(projector_params, projector_stats))
    save_safetensors(tensors, path, metadata={"format": "pt"})
    return tensors


# --------------------------------------------------------------------------------------------
# safetensors, read and written without the safetensors package.
# --------------------------------------------------------------------------------------------


def save_safetensors(tensors: Mapping[str, np.ndarray], path, metadata=None) -> None:
    """Write a safetensors file (little-endian, C order, data 8-byte aligned)."""
    arrays = {name: np.asarray(value, order="C") for name, value in tensors.items()}  # keeps 0-d
    # Lay the data out widest dtype first so every tensor is aligned to its item size (torch's
    # zero-copy loaders need that); the header keeps the caller's order.
    layout = sorted(arrays, key=lambda name: -arrays[name].dtype.itemsize)
    header, offset = {}, 0
    for name in layout:
        array = arrays[name]
        if array.dtype.byteorder == ">":
            array = arrays[name] = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors equivalent")
        header[name] = {
            "dtype": _DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header = {name: header[name] for name in arrays}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in layout:
            f.write(arrays[name].tobytes())


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Read a safetensors file into numpy arrays, in header order (metadata dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    body = memoryview(data)[8 + header_len :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if not 0 <= begin <= end <= len(body) or end - begin != dtype.itemsize * int(
            np.prod(shape, dtype=np.int64)
        ):
            raise ValueError(f"{path}: bad data_offsets for {name}")
        out[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return out


# --------------------------------------------------------------------------------------------
# Command line: python -m simco_jax.export --workdir=RUN --out=backbone.safetensors
# --------------------------------------------------------------------------------------------


_TORCHVISION_BLOCKS = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2)),
    "resnet50": ("Bottleneck", (3, 4, 6, 3)),
}


def torch_projector_layers(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The torch.nn modules of an exported projector, read off its tensors in index order:
    a 2-d weight is a Linear, running statistics a BatchNorm1d, an index without tensors a
    ReLU. [] if the file holds no projector."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if name.startswith("projector."):
            _, index, leaf = name.split(".")
            layers.setdefault(int(index), {})[leaf] = value
    modules = []
    for index in range(max(layers, default=-1) + 1):
        layer = layers.get(index)
        if layer is None:
            modules.append("torch.nn.ReLU()")
        elif "running_mean" in layer:
            affine = "" if "weight" in layer else ", affine=False"
            modules.append(f"torch.nn.BatchNorm1d({layer['running_mean'].shape[0]}{affine})")
        else:
            out_dim, in_dim = layer["weight"].shape
            bias = "" if "bias" in layer else ", bias=False"
            modules.append(f"torch.nn.Linear({in_dim}, {out_dim}{bias})")
    return modules


def torchvision_loading_snippet(
    path, backbone: str, width: int, cifar_stem: bool = True, projector_layers=()
) -> str:
    """Python that loads an exported file into torchvision, for the file's backbone and width.

    torchvision's constructors fix the stage widths at 64·2^i (`width_per_group` only widens a
    Bottleneck's inner 3×3, and BasicBlock rejects it), so at another `width` the snippet rebuilds
    the stem and the four stages with torchvision's own `ResNet._make_layer`, as its constructor
    does. projector_layers: the torch.nn modules of an exported projector
    (`torch_projector_layers`), or none.
    """
    block, layers = _TORCHVISION_BLOCKS[backbone]
    lines = ["import torch", "import torchvision", "from safetensors.torch import load_file"]
    if width != 64:
        lines.append(f"from torchvision.models.resnet import {block}")
    lines += ["", f"model = torchvision.models.{backbone}()"]
    stem = "3, 1, 2" if cifar_stem else "7, 2, 3"
    if width != 64:
        planes = [width * 2**i for i in range(4)]
        lines.append(
            f"# width {width}: stages of {', '.join(map(str, planes))} channels instead of "
            f"torchvision's 64, 128, 256, 512"
        )
        lines.append(f"model.inplanes = {width}")
    if cifar_stem or width != 64:
        comment = "  # the CIFAR stem" if cifar_stem else ""
        lines.append(f"model.conv1 = torch.nn.Conv2d(3, {width}, {stem}, bias=False){comment}")
    if width != 64:
        lines.append(f"model.bn1 = torch.nn.BatchNorm2d({width})")
        for i, (count, planes_i) in enumerate(zip(layers, planes, strict=True), start=1):
            stride = "" if i == 1 else ", stride=2"
            lines.append(
                f"model.layer{i} = model._make_layer({block}, {planes_i}, {count}{stride})"
            )
    if cifar_stem:
        lines.append("model.maxpool = torch.nn.Identity()")
    path = str(path)
    quoted = f'"{path}"' if '"' not in path and "\\" not in path else repr(path)  # black's style
    lines += ["model.fc = torch.nn.Identity()", f"state = load_file({quoted})"]
    if not projector_layers:
        lines.append("model.load_state_dict(state)")
    else:
        lines += [
            'model.load_state_dict({k: v for k, v in state.items() if "projector" not in k})',
            "projector = torch.nn.Sequential(",
            *[f"    {module}," for module in projector_layers],
            ")",
            "projector.load_state_dict(",
            '    {k.removeprefix("projector."): v for k, v in state.items() if "projector" in k}',
            ")",
        ]
    return "\n".join(lines)


def describe_export(path, tensors: Mapping[str, np.ndarray]) -> str:
    """What an exported file holds, read off its tensors, and the Python that loads it."""
    backbone = "resnet50" if "layer1.0.conv3.weight" in tensors else "resnet18"  # Bottleneck
    stem = tensors["conv1.weight"].shape  # (width, 3, k, k)
    width, cifar_stem = stem[0], stem[-1] == 3
    projector_layers = torch_projector_layers(tensors)
    what = (
        f"wrote {len(tensors)} tensors to {path}: {backbone} backbone, width {width}, "
        f"{'CIFAR' if cifar_stem else 'ImageNet'} stem{', projector' if projector_layers else ''}."
    )
    if width == 64:
        how = f" Load it into torchvision.models.{backbone}() with:"
    else:
        how = (
            f" torchvision.models.{backbone}() has width 64 and cannot load it; this rebuilds its"
            f" stem and stages at width {width} and loads it:"
        )
    snippet = torchvision_loading_snippet(path, backbone, width, cifar_stem, projector_layers)
    return f"{what}{how}\n\n{snippet}"


def export_run(
    workdir, out, *, include_projector: bool = False, member: int = -1
) -> dict[str, np.ndarray]:
    """Restores a training run's latest checkpoint (member `member` of a population run) and
    exports its online encoder to `out`."""
    from simco_jax import checkpointing  # the one place that restores a run from its workdir

    run = checkpointing.restore_run(workdir, member)
    params = jax.tree.map(np.asarray, run.state.params)
    batch_stats = jax.tree.map(np.asarray, run.state.batch_stats)
    return export_torch_state_dict(
        params,
        batch_stats,
        out,
        backbone=run.config.backbone,
        include_projector=include_projector,
    )


def argument_error(workdir: str, out: str) -> str | None:
    """What is wrong with --workdir (a training run's, with a checkpoint) or --out (a file
    path in a writable directory), as one line; None if nothing is. Checked before anything
    is restored, so nothing is written for a bad command."""
    run = f"--workdir={workdir!r}"
    if not workdir:
        return "--workdir is empty; pass a training run's --workdir"
    if not os.path.isdir(workdir):
        what = "does not exist" if not os.path.exists(workdir) else "is not a directory"
        return f"{run} {what}; pass a training run's --workdir"
    config = os.path.join(workdir, "config.json")
    if not os.path.isfile(config):
        return f"{run} holds no config.json: it is not a training run's --workdir"
    try:
        with open(config) as f:
            json.load(f)
    except (OSError, ValueError) as error:
        return f"{config} cannot be read ({error}); the run's workdir is damaged"
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return f"{run} has no checkpoints/ directory: the run has not saved a checkpoint yet"
    if not any(name.isdigit() for name in os.listdir(checkpoints)):  # Orbax's step folders
        return f"{checkpoints} holds no checkpoint: the run has not saved one yet"
    if not out:
        return "--out is empty; pass a file path, e.g. --out=backbone.safetensors"
    if os.path.isdir(out):
        return (
            f"--out={out!r} is a directory; pass a file path in it, e.g. {out}/backbone.safetensors"
        )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        return f"the directory of --out={out!r} does not exist; create {parent} first"
    if not os.access(parent, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        return f"--out={out!r} cannot be written (permission denied); pass a writable path"
    return None


def main(argv=None) -> None:
    from simco_jax import checkpointing, cli
    from simco_jax import config as config_lib

    parser = cli.ArgumentParser(
        prog="python -m simco_jax.export",
        description="Export a run's backbone as torchvision names.",
    )
    parser.add_argument("--workdir", required=True, help="the training run's --workdir")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--include_projector", action="store_true")
    parser.add_argument(
        "--member", type=int, default=-1, help="the member of a population run (config.members)"
    )
    args = parser.parse_args(argv)
    problem = argument_error(args.workdir, args.out)
    if problem:
        cli.fail(problem)
    try:
        tensors = export_run(
            args.workdir, args.out, include_projector=args.include_projector, member=args.member
        )
    except (checkpointing.CheckpointError, config_lib.ConfigError) as error:
        cli.fail(str(error))
    except OSError as error:  # e.g. writing --out: a full disk, a vanished directory
        cli.fail(f"{error.filename or args.out}: {error.strerror or error}")
    print(describe_export(args.out, tensors))


if __name__ == "__main__":
    main()
