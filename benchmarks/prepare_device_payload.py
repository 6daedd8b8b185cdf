r"""Prepares device_payload/ (git-ignored) for benchmarks/device_run.sh (see benchmarks/README.md).

    python benchmarks/prepare_device_payload.py --source=/path/to/cifar100.npz [--no_wheels]

Writes
* device_payload/cifar100_subset.npz: a class-balanced CIFAR-100 subset (default 100 train and
  20 test images per class, 10,000 + 2,000 images, about 35 MiB, uncompressed uint8) with the
  keys launch.py's npz source reads, cut from `--source` (CIFAR-100 as an .npz with those keys);
* device_payload/wheels/ (unless --no_wheels): the ml-collections wheel (pure Python), fetched
  with `pip download --no-deps`, for a machine with JAX but without internet access.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simco_jax import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = os.path.join(REPO, "device_payload")
MAX_BYTES = 40 * 2**20


def balanced_subset(labels: np.ndarray, per_class: int, rng) -> np.ndarray:
    """Sorted indices of `per_class` random images of every class."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(picks))


def write_subset(source: str, target: str, train_per_class: int, test_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    with np.load(source) as archive:
        train_labels, test_labels = archive["train_labels"], archive["test_labels"]
        train = balanced_subset(train_labels, train_per_class, rng)
        test = balanced_subset(test_labels, test_per_class, rng)
        arrays = dict(
            train_images=archive["train_images"][train],
            train_labels=train_labels[train].astype(np.int32),
            test_images=archive["test_images"][test],
            test_labels=test_labels[test].astype(np.int32),
            class_names=archive["class_names"],
        )
    np.savez(target, **arrays)  # uncompressed: loads at once, compresses poorly anyway
    size = os.path.getsize(target)
    if size > MAX_BYTES:
        raise SystemExit(f"{target} is {size / 2**20:.1f} MiB > 40 MiB; take fewer per class")
    return {k: v.shape for k, v in arrays.items()}, size


def fetch_wheels(wheel_dir: str) -> list[str]:
    os.makedirs(wheel_dir, exist_ok=True)
    if not glob.glob(os.path.join(wheel_dir, "ml_collections-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            + ["-d", wheel_dir, "ml-collections"],
            check=True,
        )
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(wheel_dir, "*.whl")))


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", required=True, help="CIFAR-100 as .npz (train_images, ...)")
    p.add_argument("--train_per_class", type=int, default=100)
    p.add_argument("--test_per_class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_wheels", action="store_true", help="skip the ml-collections wheel")
    args = p.parse_args(argv)
    if not os.path.isfile(args.source):
        cli.fail(f"--source={args.source!r} is not a file (CIFAR-100 as .npz)")
    if min(args.train_per_class, args.test_per_class) < 1:
        cli.fail("--train_per_class and --test_per_class must be >= 1")

    os.makedirs(PAYLOAD, exist_ok=True)
    target = os.path.join(PAYLOAD, "cifar100_subset.npz")
    shapes, size = write_subset(
        args.source, target, args.train_per_class, args.test_per_class, args.seed
    )
    print(f"{target}: {size / 2**20:.1f} MiB, {shapes}")
    if not args.no_wheels:
        print("wheels:", fetch_wheels(os.path.join(PAYLOAD, "wheels")))


if __name__ == "__main__":
    main()
