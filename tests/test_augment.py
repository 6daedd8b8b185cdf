"""Tests of the on-device two-view augmentation (the official solo-learn recipe).

References are independent re-implementations: torchvision's RandomResizedCrop.get_params as its
sequential Python loop, PIL's own bicubic resize, NumPy blends and `colorsys` HSV for ColorJitter,
PIL's own ImageOps.solarize and ImageFilter.GaussianBlur (and a NumPy copy of its box-blur
arithmetic). Rates are checked against binomial tolerances, distributions with a two-sample
Kolmogorov-Smirnov distance.
"""

import colorsys
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simco_jax import augment

AugmentParams = augment.AugmentParams

# All probabilities 0 and a crop that is always the full image: steps 1-5 are the identity.
IDENTITY = dict(
    min_scale=1.0,
    max_scale=1.0,
    min_ratio=1.0,
    max_ratio=1.0,
    color_jitter_prob=0.0,
    gray_scale_prob=0.0,
    horizontal_flip_prob=0.0,
    gaussian_prob=0.0,
    solarization_prob=0.0,
)

augment_view = jax.jit(augment.augment_view, static_argnums=2)
two_views = jax.jit(augment.two_views, static_argnums=2)
resized_crop = jax.jit(augment.resized_crop, static_argnums=5)


def _random_images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _unnormalize(x, params):
    return np.asarray(x, np.float64) * np.array(params.std) + np.array(params.mean)


def _binomial_ok(count, n, p, sigmas=4.5):
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a − F_b|."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.max(np.abs(cdf_a - cdf_b))


def _ks_critical(n, m, alpha=1e-3):
    # Asymptotic critical value c(α)·sqrt((n + m)/(n m)); conservative for discrete data.
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


# --------------------------------------------------------------------------------------------
# RandomResizedCrop sampling


def torchvision_get_params(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, line by line, with a NumPy rng."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def _reference_crops(n, height, width, seed=1, **kwargs):
    rng = np.random.default_rng(seed)
    return np.array([torchvision_get_params(rng, height, width, **kwargs) for _ in range(n)])


def _jax_crops(n, height, width, params, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    sample = jax.jit(jax.vmap(lambda k: augment.sample_crop(k, height, width, params)))
    return np.stack([np.asarray(v) for v in sample(keys)], axis=1)


def test_sample_crop_follows_torchvision_get_params():
    params = AugmentParams()
    size = 32
    ours = _jax_crops(4000, size, size, params)
    ref = _reference_crops(20000, size, size)
    top, left, h, w = ours.T

    # Every crop lies inside the image, and some pre-rounding (w0, h0) within half a pixel of
    # (w, h) has its area fraction in [0.08, 1] and its ratio in [3/4, 4/3].
    assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= size) & (left + w <= size))
    assert np.all((w + 0.5) * (h + 0.5) >= 0.08 * size * size)
    assert np.all((w + 0.5) / (h - 0.5) >= 3 / 4) and np.all((w - 0.5) / (h + 0.5) <= 4 / 3)

    def area_fraction(c):
        return c[:, 2] * c[:, 3] / size**2

    def log_ratio(c):
        return np.log(c[:, 3] / c[:, 2])

    critical = _ks_critical(len(ours), len(ref))
    for stat in (area_fraction, log_ratio, lambda c: c[:, 0], lambda c: c[:, 1]):
        assert _ks_distance(stat(ours), stat(ref)) < critical
    # A loose sanity check on the shape of the law, not only agreement with the reference.
    assert 0.45 < area_fraction(ours).mean() < 0.6
    assert abs(log_ratio(ours).mean()) < 0.02
    # Full-image crops (valid draws near scale 1, and the fallback) at the reference's rate.
    full_ours, full_ref = np.mean(area_fraction(ours) == 1), np.mean(area_fraction(ref) == 1)
    assert abs(full_ours - full_ref) < 4.5 * math.sqrt(full_ref * (1 - full_ref) / len(ours)) + 1e-3


def test_sample_crop_fallback_rate_and_central_crop_on_narrow_images():
    # A 32×8 image rejects most draws (w ≤ 8 needs scale·ratio ≲ 0.28): all 10 fail ~8 % of
    # the time, and the fallback is the central crop at ratio 3/4: h = round(8 / 0.75) = 11.
    params = AugmentParams()
    fallback = np.array([10, 0, 11, 8])
    ours = _jax_crops(4000, 32, 8, params)
    ref = _reference_crops(20000, 32, 8)
    rate_ref = np.mean(np.all(ref == fallback, axis=1))
    assert 0.05 < rate_ref < 0.12
    assert _binomial_ok(np.sum(np.all(ours == fallback, axis=1)), len(ours), rate_ref, sigmas=5)

    # Scale (1, 1) never fits a narrow image: always the fallback, in both orientations.
    whole = AugmentParams(min_scale=1.0, max_scale=1.0)
    np.testing.assert_array_equal(_jax_crops(64, 32, 8, whole), np.tile(fallback, (64, 1)))
    np.testing.assert_array_equal(_jax_crops(64, 8, 32, whole), np.tile([0, 10, 8, 11], (64, 1)))


# --------------------------------------------------------------------------------------------
# Bicubic resize of the crop


def test_resized_crop_matches_pil_crop_then_bicubic_resize():
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (24, 20, 3)).astype(np.float32)
    # (top, left, h, w, size): downscale, upscale, mixed, a shifted crop at scale 1, full image.
    for top, left, h, w, size in [
        (0, 0, 24, 20, 12),
        (3, 5, 7, 10, 16),
        (2, 1, 20, 9, 12),
        (5, 4, 12, 12, 12),
        (0, 0, 24, 20, 16),
    ]:
        ours = np.asarray(resized_crop(image, top, left, h, w, size))
        for c in range(3):
            pil = image_module.fromarray(image[:, :, c])  # mode "F": float, no rounding
            pil = pil.crop((left, top, left + w, top + h)).resize(
                (size, size), image_module.Resampling.BICUBIC
            )
            np.testing.assert_allclose(ours[:, :, c], np.clip(np.asarray(pil), 0, 1), atol=2e-6)


def test_resized_crop_of_the_whole_image_agrees_with_jax_image_resize():
    # Where no tap leaves the crop, PIL's rule is jax.image's antialiased cubic resize.
    image = np.random.default_rng(1).uniform(0.2, 0.8, (24, 20, 3)).astype(np.float32)
    for size in (12, 16):
        ours = resized_crop(image, 0, 0, 24, 20, size)
        ref = jax.image.resize(image, (size, size, 3), "cubic", antialias=True)
        np.testing.assert_allclose(ours, np.clip(ref, 0, 1), atol=2e-6)


def test_full_crop_at_the_same_size_is_exactly_the_identity():
    image = np.random.default_rng(2).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(resized_crop(image, 0, 0, 16, 16, 16), image)


def test_identity_params_leave_images_unchanged():
    params = AugmentParams(crop_size=16, **IDENTITY)
    images = _random_images(8, 16)
    out = augment_view(jax.random.key(3), images, params)
    np.testing.assert_allclose(_unnormalize(out, params), images / 255.0, atol=1e-6)
    np.testing.assert_allclose(out, augment.normalize(images, params), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Colour operations against NumPy / colorsys references of torchvision's functional


def _np_gray(image):
    return image @ np.array([0.299, 0.587, 0.114])


def _np_brightness(image, f):
    return np.clip(f * image, 0, 1)


def _np_contrast(image, f):
    return np.clip(f * image + (1 - f) * _np_gray(image).mean(), 0, 1)


def _np_saturation(image, f):
    return np.clip(f * image + (1 - f) * _np_gray(image)[..., None], 0, 1)


def _np_hue(image, shift):
    out = np.empty_like(image)
    for idx in np.ndindex(image.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*image[idx])
        out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


NP_OPS = (_np_brightness, _np_contrast, _np_saturation, _np_hue)


def _colour_test_image():
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (6, 7, 3))
    # Edge cases: grey, black, white, primaries, ties between channels.
    special = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]
    image[0, : len(special)] = special
    return image


@pytest.mark.parametrize(
    "op, np_op, factors",
    [
        (augment.adjust_brightness, _np_brightness, (0.0, 0.6, 1.4)),
        (augment.adjust_contrast, _np_contrast, (0.0, 0.6, 1.4)),
        (augment.adjust_saturation, _np_saturation, (0.0, 0.6, 1.4)),
        (augment.adjust_hue, _np_hue, (-0.5, -0.1, 0.05, 0.3)),
    ],
)
def test_colour_ops_match_numpy_reference(op, np_op, factors):
    image = _colour_test_image()
    for factor in factors:
        ours = op(jnp.asarray(image, jnp.float32), factor)
        np.testing.assert_allclose(ours, np_op(image, factor), atol=2e-6)


def test_hue_round_trip_and_grayscale():
    image = _colour_test_image()
    np.testing.assert_allclose(augment.adjust_hue(image.astype(np.float32), 0.0), image, atol=1e-6)
    gray = np.asarray(augment.grayscale(jnp.asarray(image, jnp.float32)))
    np.testing.assert_allclose(gray, np.repeat(_np_gray(image)[..., None], 3, -1), atol=1e-6)
    np.testing.assert_allclose(gray[0, 3], [0.299] * 3, atol=1e-7)  # pure red


def test_color_jitter_applies_ops_in_the_given_order():
    params = AugmentParams()
    # Brightness 1.4 clips the bright pixels, so the order matters.
    image = _colour_test_image()
    factors = np.array([1.4, 0.6, 1.3, 0.08])
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        expected = image
        for op in order:
            expected = NP_OPS[op](expected, factors[op])
        ours = augment.color_jitter(
            jnp.asarray(image, jnp.float32), jnp.array(order), factors, params
        )
        np.testing.assert_allclose(ours, expected, atol=1e-5)
        results.append(np.asarray(ours))
    assert np.abs(results[0] - results[1]).max() > 1e-2
    # A strength of 0 removes the op, as torchvision's None: no inexact HSV round trip.
    no_hue = AugmentParams(hue=0.0)
    ours = augment.color_jitter(jnp.asarray(image, jnp.float32), jnp.arange(4), factors, no_hue)
    expected = _np_saturation(_np_contrast(_np_brightness(image, 1.4), 0.6), 1.3)
    np.testing.assert_allclose(ours, expected, atol=1e-6)


def test_color_jitter_parameters_are_sampled_like_torchvision():
    params = AugmentParams()
    n = 24000
    keys = jax.random.split(jax.random.key(5), n)
    sample = jax.jit(jax.vmap(lambda k: augment.sample_color_jitter(k, params)))
    order, factors = (np.asarray(a) for a in sample(keys))
    assert np.all(np.sort(order, axis=1) == np.arange(4))
    # Uniform over the 24 orders: chi-square, 23 degrees of freedom, critical value at 1e-4.
    codes = order @ np.array([64, 16, 4, 1])
    counts = np.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    assert np.sum((counts - n / 24) ** 2 / (n / 24)) < 56.0
    # Factors U[0.6, 1.4] (brightness, contrast, saturation) and the hue shift U[-0.1, 0.1].
    for column, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        f = factors[:, column]
        assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi
        grid = np.linspace(lo, hi, 9)[1:-1]
        ecdf = np.searchsorted(np.sort(f), grid) / n
        np.testing.assert_allclose(ecdf, (grid - lo) / (hi - lo), atol=0.015)


# --------------------------------------------------------------------------------------------
# Solarisation and blur


def test_solarize_inverts_pixels_from_128_up():
    values = np.array([0.0, 0.25, 127 / 255, 128 / 255, 0.75, 1.0], np.float32)
    expected = np.array([0.0, 0.25, 127 / 255, 127 / 255, 0.25, 0.0], np.float32)
    np.testing.assert_allclose(augment.solarize(values), expected, atol=1e-7)


def test_solarize_matches_pil_imageops_solarize():
    image_ops = pytest.importorskip("PIL.ImageOps")
    image_module = pytest.importorskip("PIL.Image")
    # Every uint8 value, as PIL.ImageOps.solarize(img, threshold=128) maps it.
    values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    pil = np.asarray(image_ops.solarize(image_module.fromarray(values), threshold=128))
    ours = np.asarray(augment.solarize(values / np.float32(255.0)))
    np.testing.assert_array_equal(np.round(ours * 255).astype(np.uint8), pil)
    # Floats between uint8 levels: inverted exactly when PIL would invert round(255·x).
    x = np.random.default_rng(3).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    rounded = np.round(x * 255).astype(np.uint8)
    pil = np.asarray(image_ops.solarize(image_module.fromarray(rounded), threshold=128)) / 255
    np.testing.assert_allclose(augment.solarize(x), pil, atol=0.5 / 255 + 1e-6)


def _pil_box_radius(sigma, passes=3):
    """PIL's _gaussian_blur_radius (libImaging/BoxBlur.c), step by step in C's float32."""
    f = np.float32
    sigma2 = f(f(sigma) * f(sigma) / f(passes))
    length = f(np.sqrt(12.0 * float(sigma2) + 1.0))
    whole = f(np.floor((float(length) - 1.0) / 2.0))
    a = f(f(2 * whole + 1) * f(whole * (whole + 1) - 3 * sigma2))
    a = f(a / f(6 * (sigma2 - (whole + 1) * (whole + 1))))
    return f(whole + a)


def _np_pil_blur(image, sigma, pil_rounding):
    """PIL's ImagingGaussianBlur on a (H, W, C) uint8 image: 3 extended-box passes along the
    width, then 3 along the height, edges replicated. With `pil_rounding`, PIL's 24-bit fixed-point
    weights and uint8 rounding after every pass (bit-exact); without, the same passes in float64."""
    radius = _pil_box_radius(sigma)
    whole = int(radius)
    if pil_rounding:
        ww = int(np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1)))
        fw = ((1 << 24) - (2 * whole + 1) * ww) // 2
        x = image.astype(np.int64)
    else:
        ww = 1.0 / (2.0 * float(radius) + 1.0)
        fw = (1.0 - (2 * whole + 1) * ww) / 2.0
        x = image.astype(np.float64)

    def tap(x, d, axis):
        n = x.shape[axis]
        return np.take(x, np.clip(np.arange(n) + d, 0, n - 1), axis=axis)

    for axis in (1, 1, 1, 0, 0, 0):
        inner = sum(tap(x, d, axis) for d in range(-whole, whole + 1))
        total = inner * ww + (tap(x, -whole - 1, axis) + tap(x, whole + 1, axis)) * fw
        x = (total + (1 << 23)) >> 24 if pil_rounding else total
    return x


BLUR_CASES = [(0.1, (9, 13)), (0.6, (16, 16)), (1.3, (17, 23)), (2.0, (12, 10)), (2.0, (3, 5))]


@pytest.mark.parametrize("sigma, shape", BLUR_CASES)
def test_gaussian_blur_reference_is_pil_bit_exact(sigma, shape):
    # The NumPy reference with PIL's integer arithmetic reproduces PIL exactly: it is PIL's op.
    image_module = pytest.importorskip("PIL.Image")
    image_filter = pytest.importorskip("PIL.ImageFilter")
    image = np.random.default_rng(int(sigma * 10)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pil = image_module.fromarray(image).filter(image_filter.GaussianBlur(radius=sigma))
    np.testing.assert_array_equal(_np_pil_blur(image, sigma, pil_rounding=True), np.asarray(pil))


@pytest.mark.parametrize("sigma, shape", BLUR_CASES)
def test_gaussian_blur_is_pil_gaussian_blur_in_float(sigma, shape):
    image_module = pytest.importorskip("PIL.Image")
    image_filter = pytest.importorskip("PIL.ImageFilter")
    image = np.random.default_rng(int(sigma * 10)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours = np.asarray(augment.gaussian_blur(image / np.float32(255.0), sigma))
    # The same passes without rounding, to float32 precision.
    reference = _np_pil_blur(image, sigma, pil_rounding=False) / 255.0
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    # PIL itself differs only by its six roundings to uint8, at most 0.5/255 each.
    pil = np.asarray(image_module.fromarray(image).filter(image_filter.GaussianBlur(radius=sigma)))
    assert np.abs(ours - pil / 255.0).max() <= 3.0 / 255
    # Constants stay constant (the edges are replicated).
    constant = np.full((8, 8, 3), 0.3, np.float32)
    np.testing.assert_allclose(augment.gaussian_blur(constant, sigma), 0.3, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The full view: rates, determinism, shapes


def test_gray_solarize_and_flip_rates_within_binomial_tolerance():
    # Identity crop, no jitter: each output is one of 8 exactly computable combinations.
    rates = dict(gray_scale_prob=0.2, solarization_prob=0.3, horizontal_flip_prob=0.5)
    params = AugmentParams(crop_size=8, **{**IDENTITY, **rates})
    n = 2000
    images = _random_images(n, 8, seed=6)
    out = _unnormalize(augment_view(jax.random.key(7), images, params), params)
    x = images / 255.0
    counts = {"gray": 0, "solarize": 0, "flip": 0, "gray&flip": 0}
    for i in range(n):
        matches = []
        for gray in (False, True):
            for sol in (False, True):
                for flip in (False, True):
                    y = _np_gray(x[i])[..., None].repeat(3, -1) if gray else x[i]
                    y = np.where(y >= 0.5, 1 - y, y) if sol else y
                    y = y[:, ::-1] if flip else y
                    if np.abs(out[i] - y).max() < 1e-5:
                        matches.append((gray, sol, flip))
        assert len(matches) == 1, matches
        gray, sol, flip = matches[0]
        counts["gray"] += gray
        counts["solarize"] += sol
        counts["flip"] += flip
        counts["gray&flip"] += gray and flip
    assert _binomial_ok(counts["gray"], n, 0.2)
    assert _binomial_ok(counts["solarize"], n, 0.3)
    assert _binomial_ok(counts["flip"], n, 0.5)
    assert _binomial_ok(counts["gray&flip"], n, 0.1)  # independent draws


def test_color_jitter_rate_within_binomial_tolerance():
    params = AugmentParams(crop_size=8, **{**IDENTITY, "color_jitter_prob": 0.8})
    n = 2000
    images = _random_images(n, 8, seed=8)
    out = _unnormalize(augment_view(jax.random.key(9), images, params), params)
    changed = np.abs(out - images / 255.0).max(axis=(1, 2, 3)) > 1e-5
    assert _binomial_ok(changed.sum(), n, 0.8)


def test_blur_with_probability_one_smooths_every_image():
    params = AugmentParams(crop_size=16, **{**IDENTITY, "gaussian_prob": 1.0})
    images = _random_images(64, 16, seed=10)
    out = _unnormalize(augment_view(jax.random.key(11), images, params), params)
    x = images / 255.0
    # Total variation per image: the sum of absolute differences between neighbouring pixels.
    total_variation = lambda a: sum(np.abs(np.diff(a, axis=k)).sum(axis=(1, 2, 3)) for k in (1, 2))
    assert np.all(total_variation(out) <= total_variation(x) + 1e-4)
    # sigma ~ U(0.1, 2): only draws below ~0.25 leave a random image nearly as it was.
    assert np.mean(total_variation(out) < 0.9 * total_variation(x)) > 0.8


def test_blur_rate_and_sigma_law_on_delta_images():
    # A delta image, blurred, has horizontal variance sigma² exactly (each extended box carries a
    # third of it, and the delta is far from the edges); unblurred, it stays a delta.
    params = AugmentParams(crop_size=16, **{**IDENTITY, "gaussian_prob": 0.5})
    n = 2000
    images = np.zeros((n, 16, 16, 3), np.uint8)
    images[:, 8, 8] = 255
    out = _unnormalize(augment_view(jax.random.key(14), images, params), params)[..., 0]
    blurred = np.abs(out - images[..., 0] / 255.0).max(axis=(1, 2)) > 1e-5
    assert _binomial_ok(blurred.sum(), n, 0.5)
    columns = out[blurred].sum(axis=1)  # (m, 16): the horizontal marginal, total mass 1
    np.testing.assert_allclose(columns.sum(axis=1), 1.0, atol=1e-4)
    sigma = np.sqrt(columns @ (np.arange(16) - 8.0) ** 2)
    assert 0.1 - 1e-3 <= sigma.min() < 0.15 and 1.95 < sigma.max() <= 2.0 + 1e-3
    uniform = np.random.default_rng(15).uniform(0.1, 2.0, 20000)
    assert _ks_distance(sigma, uniform) < _ks_critical(len(sigma), len(uniform))


def test_blur_comes_before_solarisation_and_after_grayscale():
    # Solarising a white delta first would leave a black image; blurring first leaves its spread,
    # solarised only where it is still >= 0.5. Grayscale before blur is then checked on colour.
    rates = dict(gray_scale_prob=1.0, gaussian_prob=1.0, solarization_prob=1.0)
    params = AugmentParams(crop_size=16, **{**IDENTITY, **rates})
    images = np.zeros((64, 16, 16, 3), np.uint8)
    images[:, 8, 8] = (255, 0, 0)
    out = _unnormalize(augment_view(jax.random.key(16), images, params), params)
    spread = out[..., 0].sum(axis=(1, 2))
    assert np.all(spread > 0.1)  # the red delta's luma 0.299, mostly spread into dark pixels
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)  # grey: grayscale came first
    assert out.max() <= 0.5 + 1e-6


def test_zero_probability_blur_and_solarisation_leave_the_other_draws_alone():
    # The CIFAR recipe (p = 0: both ops compiled out) gives the same views as the same recipe
    # with both ops compiled in at a probability no draw reaches: neither op consumes or shifts
    # the random numbers of the others (a shifted draw would move pixels by O(1), not by the
    # float32 ulps that XLA's different fusion of the larger program may cost).
    cifar = AugmentParams(crop_size=16)
    compiled_in = AugmentParams(crop_size=16, gaussian_prob=1e-30, solarization_prob=1e-30)
    images = _random_images(32, 16, seed=17)
    for ours, other in zip(
        two_views(jax.random.key(18), images, cifar),
        two_views(jax.random.key(18), images, compiled_in),
        strict=True,
    ):
        np.testing.assert_allclose(ours, other, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def default_views():
    params = AugmentParams(crop_size=16)
    # One smooth, asymmetric image repeated: differences between outputs come from the draws.
    cols, rows = np.meshgrid(np.linspace(0, 255, 32), np.linspace(0, 255, 32))
    image = np.stack([cols, rows, np.full_like(cols, 90.0)], axis=-1).astype(np.uint8)
    images = np.repeat(image[None], 16, axis=0)
    return params, images, two_views(jax.random.key(12), images, params)


def test_two_views_under_jit_uint8_in_float32_out(default_views):
    params, images, (view1, view2) = default_views
    assert images.dtype == np.uint8
    for view in (view1, view2):
        assert view.shape == (16, 16, 16, 3) and view.dtype == jnp.float32
        assert np.all(np.isfinite(view))
        unit = _unnormalize(view, params)
        assert unit.min() > -1e-5 and unit.max() < 1 + 1e-5


def test_same_key_same_views_and_fresh_draws_elsewhere(default_views):
    params, images, (view1, view2) = default_views
    again1, again2 = two_views(jax.random.key(12), images, params)
    np.testing.assert_array_equal(again1, view1)
    np.testing.assert_array_equal(again2, view2)
    other1, _ = two_views(jax.random.key(13), images, params)
    assert np.all(np.abs(np.asarray(other1) - np.asarray(view1)).max(axis=(1, 2, 3)) > 1e-3)
    # The two views of each image differ, and so do the 16 copies of one image in a batch.
    assert np.all(np.abs(np.asarray(view1) - np.asarray(view2)).max(axis=(1, 2, 3)) > 1e-3)
    flat = np.asarray(view1).reshape(16, -1)
    distances = np.abs(flat[:, None] - flat[None]).max(axis=-1)
    assert np.all(distances[~np.eye(16, dtype=bool)] > 1e-3)


# --------------------------------------------------------------------------------------------
# Parameters and normalisation


def test_params_from_config_hashable_and_defaults_are_the_recipe():
    config = ml_collections.ConfigDict(
        dict(crop_size=24, min_scale=0.2, hue=0.05, mean=[0.5, 0.5, 0.5], lr=0.1)
    )
    params = AugmentParams.from_config(config)
    assert (params.crop_size, params.min_scale, params.hue) == (24, 0.2, 0.05)
    assert params.mean == (0.5, 0.5, 0.5) and params.std == AugmentParams().std
    assert hash(params) == hash(AugmentParams.from_config(config))
    # The defaults are the official recipe, and the library config carries the same values.
    from simco_jax import config as config_lib

    assert AugmentParams.from_config(config_lib.base_config()) == AugmentParams()
    recipe = AugmentParams()
    assert (recipe.min_scale, recipe.brightness, recipe.hue, recipe.color_jitter_prob) == (
        0.08,
        0.4,
        0.1,
        0.8,
    )
    with pytest.raises(ValueError):
        AugmentParams(gray_scale_prob=1.5)


def test_normalize_uint8_and_unit_float_agree():
    params = AugmentParams()
    images = np.array([[[[0, 128, 255]]]], np.uint8)
    expected = (np.array([0, 128, 255]) / 255.0 - np.array(params.mean)) / np.array(params.std)
    np.testing.assert_allclose(augment.normalize(images, params)[0, 0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(
        augment.normalize(images.astype(np.float32) / 255.0, params),
        augment.normalize(images, params),
    )
