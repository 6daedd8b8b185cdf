"""The CPU-scale real-data runs (sweeps/cpu_scale.py): per-epoch curves and the results table.

    python docs/figures/cpu_scale.py --workdir=runs/cpu_scale

reads each framework's metrics.jsonl and sweep_point.json under WORKDIR, checks that every
evaluation scored the whole test set, draws the kNN and online-probe top-1 of each framework per
epoch into docs/figures/cpu_scale.png, and prints the markdown table of docs/results.md (final
probe and kNN top-1/top-5, training images/s, training and wall time, hardware). Needs
matplotlib (the `notebooks` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from simco_jax import writers  # noqa: E402

FRAMEWORKS = {
    "simco": "SimCo",
    "simmoco": "SimMoCo",
    "mocov2": "MoCo v2",
    "byol": "BYOL",
    "simsiam": "SimSiam",
}
TEST_IMAGES = 10_000  # CIFAR-100's test split


def read_run(workdir: str) -> dict:
    """One run's evaluation curves, final metrics, mean training throughput and sweep record."""
    records = writers.read_metrics(workdir)
    # Log records carry both the step and its epoch: the evaluation steps' epochs follow.
    steps_per_epoch = next(r["step"] / r["epoch"] for r in records if r.get("epoch"))
    curves = {"probe_top1": [], "knn_top1": []}
    final = {}
    for record in records:
        for key in curves:
            if key in record:
                curves[key].append((record["step"] / steps_per_epoch, record[key]))
        for kind in ("probe", "knn"):
            if f"{kind}_top1" in record:
                examples = record[f"{kind}_examples"]
                if examples != TEST_IMAGES:
                    raise SystemExit(f"{workdir}: {kind} scored {examples} test images")
                final.update({k: v for k, v in record.items() if k.startswith(kind + "_")})
    throughput = [r["images_per_s"] for r in records if "images_per_s" in r]
    with open(os.path.join(workdir, "config.json")) as f:
        batch_size = json.load(f)["batch_size"]
    # Time spent in training steps, from each log interval's measured rate: unlike the sweep's
    # wall_s (the invocation that finished the run), it covers every invocation of a resumed run.
    train_s, previous = 0.0, 0
    for record in records:
        if "images_per_s" in record:
            train_s += (record["step"] - previous) * batch_size / record["images_per_s"]
            previous = record["step"]
    with open(os.path.join(workdir, "sweep_point.json")) as f:
        done = json.load(f)
    return {
        "curves": curves,
        "final": final,
        "images_per_s": statistics.mean(throughput),
        "train_s": train_s,
        "wall_s": done["wall_s"],
        "device": done["device"],
        "steps": done["steps"],
    }


def table(runs: dict) -> str:
    lines = [
        "| framework | probe top-1 | probe top-5 | kNN top-1 | kNN top-5 | train img/s "
        "| training time | last invocation's wall time | hardware |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        f = run["final"]
        lines.append(
            f"| {FRAMEWORKS[name]} | {f['probe_top1']:.2f} | {f['probe_top5']:.2f} "
            f"| {f['knn_top1']:.2f} | {f['knn_top5']:.2f} | {run['images_per_s']:.0f} "
            f"| {run['train_s'] / 60:.0f} min | {run['wall_s'] / 60:.0f} min | {run['device']} |"
        )
    return "\n".join(lines)


def plot(runs: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharex=True)
    for ax, (key, title) in zip(
        axes, (("knn_top1", "kNN top-1 (%)"), ("probe_top1", "online probe top-1 (%)")), strict=True
    ):
        for name, run in runs.items():
            epochs, values = zip(*run["curves"][key], strict=True)
            ax.plot(epochs, values, marker="o", label=FRAMEWORKS[name])
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="chance")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("CIFAR-100, ResNet-18 width 8, batch 256, 3 epochs (CPU scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/cpu_scale", help="the sweep's root workdir")
    parser.add_argument(
        "--out", default=os.path.join(REPO, "docs", "figures", "cpu_scale.png"), help="the PNG"
    )
    args = parser.parse_args(argv)
    runs = {}
    for name in FRAMEWORKS:
        workdir = os.path.join(args.workdir, f"framework={name}")
        if not os.path.exists(os.path.join(workdir, "sweep_point.json")):
            parser.exit(2, f"error: {workdir} has not finished; run sweeps/cpu_scale.py first\n")
        runs[name] = read_run(workdir)
    plot(runs, args.out)
    print(table(runs))


if __name__ == "__main__":
    main()
