"""Runs the torch side of tests/test_export.py in a fresh interpreter.

torch and torchvision are imported here, never in the test process: importing torchvision
(torch._dynamo, then triton) after JAX and TensorFlow are loaded in the same process can crash it
(a segmentation fault seen in the full suite), and what a user does is load the file in PyTorch
alone anyway. Usage: python tests/torch_worker.py MODE DIR, with the inputs in DIR (.npy,
.safetensors, snippet.py); outputs are written to DIR as .npy.
"""

import os
import sys

import numpy as np
import torch


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def conv(directory):
    """The stem and a strided block convolution with torch's own conv2d on the exported weights."""
    from safetensors.numpy import load_file

    loaded = load_file(os.path.join(directory, "export.safetensors"))
    weight = lambda name: torch.from_numpy(loaded[name])
    x = np.load(os.path.join(directory, "x.npy"))
    block_in = np.load(os.path.join(directory, "block_in.npy"))
    stem = torch.nn.functional.conv2d(_nchw(x), weight("conv1.weight"), padding=2)
    strided = torch.nn.functional.conv2d(
        _nchw(block_in), weight("layer2.0.conv1.weight"), stride=2, padding=1
    )
    np.save(os.path.join(directory, "stem.npy"), stem.numpy().transpose(0, 2, 3, 1))
    np.save(os.path.join(directory, "strided.npy"), strided.numpy().transpose(0, 2, 3, 1))


def resnet18(directory):
    """The README's loading code: torchvision's resnet18 with the CIFAR stem, strict load."""
    import torchvision
    from safetensors.torch import load_file

    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(load_file(os.path.join(directory, "export.safetensors")), strict=True)
    net.eval()
    with torch.no_grad():
        features = net(_nchw(np.load(os.path.join(directory, "x.npy"))))
    np.save(os.path.join(directory, "features.npy"), features.numpy())


def snippet(directory):
    """The code `python -m simco_jax.export` prints, run as printed (it loads strictly)."""
    namespace = {}
    with open(os.path.join(directory, "snippet.py")) as f:
        exec(f.read(), namespace)
    net = namespace["model"].eval()
    with torch.no_grad():
        features = net(_nchw(np.load(os.path.join(directory, "x.npy"))))
        np.save(os.path.join(directory, "features.npy"), features.numpy())
        if "projector" in namespace:
            projections = namespace["projector"].eval()(features)
            np.save(os.path.join(directory, "projections.npy"), projections.numpy())


if __name__ == "__main__":
    {"conv": conv, "resnet18": resnet18, "snippet": snippet}[sys.argv[1]](sys.argv[2])
