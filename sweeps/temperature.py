"""The two temperatures of SimCo: τα (`temperature`) × dt_m = τβ / τα (dt_m = 1 is InfoNCE).

    python -m simco_jax.sweep --sweep=sweeps/temperature.py --workdir=runs/sweep_temperature

τα shapes the distribution over an anchor's negatives (intra-anchor hardness-awareness), τβ the
per-anchor weight (inter-anchor); the official setting is τα = 0.1, dt_m = 10 (τβ = 1).
`--variant=smoke`: τα ∈ {0.1, 0.2} × dt_m ∈ {1, 10} on the tiny synthetic setting. The points
train packed, as the members of one population run (docs/population.md).
"""


def get_sweep(variant=None):
    if variant and "smoke" in variant:
        grid = {"temperature": [0.1, 0.2], "dt_m": [1.0, 10.0]}
    else:
        grid = {"temperature": [0.05, 0.1, 0.2, 0.5], "dt_m": [1.0, 2.0, 5.0, 10.0, 20.0]}
    # Every point differs only in member keys: one population run trains them all at once.
    return {"base": "configs/simco_cifar.py", "grid": grid, "pack": True}
