"""The two-view augmentation of the official (solo-learn) recipe, on the accelerator, inside jit.

The host feeds uint8 batches (B, H, W, 3); every image draws its own parameters from its own key
(`jax.random.split` of the batch key, then `jax.vmap` of a per-image function). Per view, in the
order of the official solo-learn pipeline:

1. RandomResizedCrop to `crop_size`, scale (min_scale, max_scale), ratio (3/4, 4/3), bicubic.
2. with p = color_jitter_prob: ColorJitter(brightness, contrast, saturation, hue), random order.
3. RandomGrayscale, p = gray_scale_prob.
4. Gaussian blur (p = gaussian_prob) and solarisation (p = solarization_prob); p = 0 for CIFAR.
5. Horizontal flip, p = horizontal_flip_prob.
6. Normalise with mean / std (test images get only this step: `normalize`).

Semantics follow torchvision's functional ops on float images in [0, 1], with the choices that make
them agree with the PIL images the official code feeds them (documented where they are made):

- The crop is resampled like PIL's ``img.crop(box).resize(size, BICUBIC)``: Keys cubic, a = -0.5,
  kernel widened by the scale factor when downscaling (PIL antialiases), taps only from pixels
  inside the crop, result clipped to [0, 1] (PIL's uint8 output). We build the two separable weight
  matrices ourselves instead of calling `jax.image.scale_and_translate`, because that function
  would also take taps from pixels just outside the crop; it agrees with ours when the crop is the
  whole image. One compiled function serves every crop size, and a full-image crop at the same
  size has identity weights, so it returns the pixels exactly.
- Grayscale (RandomGrayscale and the grey image inside contrast/saturation) uses the ITU-R 601-2
  luma 0.299, 0.587, 0.114 of PIL's ``convert("L")`` (torchvision's tensor path uses 0.2989).
- Everything stays float32; PIL would round to uint8 after each op (and quantise hue to 1/255).
- Gaussian blur is MoCo v2's ``GaussianBlur`` class (moco/loader.py), which solo-learn's PIL
  pipeline copies: PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, sigma ~ U(0.1, 2.0) pixels of
  the cropped image. PIL does not convolve with a Gaussian: it runs three passes of an "extended
  box" filter per axis (Gwosdek et al., SSVM 2011) whose variance is sigma², edges replicated. We
  run the same passes in float. We do not take solo-learn's DALI/BYOL variant (a true Gaussian,
  kernel 23 at 224 px, i.e. 10 % of the image): the MoCo v2 recipe is the PIL one, and its
  kernel does not depend on the image size, so the same op serves 32 px CIFAR crops.
- Solarisation is PIL's ``ImageOps.solarize(img, 128)``: uint8 values v ≥ 128 become 255 − v.
  On floats the threshold is 127.5 / 255 = 0.5, so that x is inverted exactly when PIL, which
  rounds to uint8 first, would invert round(255·x).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as PIL's convert("L").
LUMA = (0.299, 0.587, 0.114)
# MoCo v2's GaussianBlur draws sigma ~ U(0.1, 2.0) pixels; PIL blurs with 3 box passes per axis.
BLUR_SIGMA_RANGE = (0.1, 2.0)
BLUR_PASSES = 3
# RandomResizedCrop tries this many (scale, ratio) draws before its central-crop fallback.
CROP_ATTEMPTS = 10
CROP_UNIFORMS = 2 * CROP_ATTEMPTS + 2  # scale and log-ratio per attempt, then top and left
JITTER_UNIFORMS = 8  # 4 for the order (argsort), 4 for the factors


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Augmentation settings; frozen and hashable, so it can be a static argument of `jax.jit`.

    Field names are the official solo-learn flags; `min_ratio`/`max_ratio` (torchvision's fixed
    RandomResizedCrop ratio) exist so tests can pin the aspect ratio.
    """

    crop_size: int = 32
    min_scale: float = 0.08
    max_scale: float = 1.0
    min_ratio: float = 3.0 / 4.0
    max_ratio: float = 4.0 / 3.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    color_jitter_prob: float = 0.8
    gray_scale_prob: float = 0.2
    horizontal_flip_prob: float = 0.5
    gaussian_prob: float = 0.0
    solarization_prob: float = 0.0
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.247, 0.243, 0.261)

    def __post_init__(self):
        # Lists from a config would make the dataclass unhashable (and so unusable as a static arg).
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self}")
        if not 0.0 < self.min_ratio <= self.max_ratio:
            raise ValueError(f"need 0 < min_ratio <= max_ratio, got {self}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {self.hue}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (f.name for f in dataclasses.fields(self) if f.name.endswith("_prob")):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config) -> AugmentParams:
        """Reads the fields of the same names at the top level of a ConfigDict (or dict).

        Keys the config lacks keep their defaults (the config schema has no ratio keys).
        """
        values = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        return cls(**values)


# --------------------------------------------------------------------------------------------
# RandomResizedCrop


def crop_from_uniforms(uniforms, height: int, width: int, params: AugmentParams):
    """torchvision's ``RandomResizedCrop.get_params`` driven by `CROP_UNIFORMS` U[0, 1) draws.

    Draws all `CROP_ATTEMPTS` (area, log-ratio) pairs at once and keeps the first valid one
    (argmax of the validity mask), which is distributed like torchvision's sequential loop; the
    last two draws place the top-left corner uniformly. Returns int32 scalars (top, left, h, w).
    """
    u_scale = uniforms[:CROP_ATTEMPTS]
    u_ratio = uniforms[CROP_ATTEMPTS : 2 * CROP_ATTEMPTS]
    u_top, u_left = uniforms[2 * CROP_ATTEMPTS], uniforms[2 * CROP_ATTEMPTS + 1]
    target_area = (
        height * width * (params.min_scale + (params.max_scale - params.min_scale) * u_scale)
    )
    log_lo, log_hi = math.log(params.min_ratio), math.log(params.max_ratio)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # jnp.round rounds half to even, like Python's round() in torchvision.
    ws = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    valid = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(valid)

    # Fallback: the central crop with the ratio clamped to the allowed range (static shapes).
    in_ratio = width / height
    if in_ratio < params.min_ratio:
        fallback_w, fallback_h = width, int(round(width / params.min_ratio))
    elif in_ratio > params.max_ratio:
        fallback_w, fallback_h = int(round(height * params.max_ratio)), height
    else:
        fallback_w, fallback_h = width, height

    found = valid[first]
    h = jnp.where(found, hs[first], fallback_h)
    w = jnp.where(found, ws[first], fallback_w)
    top = jnp.where(found, _uniform_int(u_top, height - h + 1), (height - fallback_h) // 2)
    left = jnp.where(found, _uniform_int(u_left, width - w + 1), (width - fallback_w) // 2)
    return top, left, h, w


def sample_crop(key, height: int, width: int, params: AugmentParams):
    """RandomResizedCrop parameters (top, left, h, w) for one (height, width) image."""
    uniforms = jax.random.uniform(key, (CROP_UNIFORMS,))
    return crop_from_uniforms(uniforms, height, width, params)


def _uniform_int(u, n):
    """An integer uniform on {0, ..., n - 1} from u ~ U[0, 1) (torch.randint(0, n))."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _keys_cubic(x):
    """Keys' cubic convolution kernel with a = -0.5 (PIL's and jax.image's bicubic)."""
    x = jnp.abs(x)
    inner = (1.5 * x - 2.5) * x * x + 1.0
    outer = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return jnp.where(x <= 1.0, inner, jnp.where(x < 2.0, outer, 0.0))


def _bicubic_weights(in_size: int, start, length, out_size: int):
    """(out_size, in_size) matrix resampling pixels [start, start + length) to out_size, as PIL.

    PIL samples output pixel o at input coordinate start + (o + 0.5)·length/out_size, widens the
    kernel by length/out_size when downscaling (antialias), uses only pixels of the cropped image,
    and normalises the taps to sum to one.
    """
    length = jnp.asarray(length, jnp.float32)
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    pixels = jnp.arange(in_size, dtype=jnp.float32)
    weights = _keys_cubic((pixels[None, :] + 0.5 - centres[:, None]) / support)
    inside = (pixels >= start) & (pixels < start + length)
    weights = jnp.where(inside[None, :], weights, 0.0)
    # The pixel nearest each centre lies in the crop with a positive weight: the sum is > 0.
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image, top, left, h, w, size: int):
    """Crops (top, left, h, w) of a float (H, W, C) image and resizes it to (size, size), bicubic.

    Equals PIL's ``crop((left, top, left + w, top + h)).resize((size, size), BICUBIC)`` in float,
    clipped to [0, 1] like PIL's uint8 output.
    """
    height, width, _ = image.shape
    rows = _bicubic_weights(height, top, h, size)
    cols = _bicubic_weights(width, left, w, size)
    # HIGHEST: a TF32 matmul on GPU would spoil the exact identity of a full-image crop.
    out = jnp.einsum("oh,hwc,pw->opc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Colour operations on float (..., 3) images in [0, 1] (torchvision functional semantics)


def rgb_to_grayscale(image):
    """Luma (..., 1) of an RGB image with PIL's ITU-R 601-2 weights."""
    luma = image[..., 0] * LUMA[0] + image[..., 1] * LUMA[1] + image[..., 2] * LUMA[2]
    return luma[..., None]


def grayscale(image):
    """RandomGrayscale's transform: the luma replicated to three channels."""
    return jnp.broadcast_to(rgb_to_grayscale(image), image.shape)


def _blend(image, other, factor):
    """torchvision's _blend: factor·image + (1 − factor)·other, clamped to [0, 1]."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
    """Blend with black: factor·image, clamped."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image, factor):
    """Blend with the mean of the grayscale image (one scalar per image)."""
    mean = jnp.mean(rgb_to_grayscale(image), axis=(-3, -2, -1), keepdims=True)
    return _blend(image, mean, factor)


def adjust_saturation(image, factor):
    """Blend with the grayscale image."""
    return _blend(image, rgb_to_grayscale(image), factor)


def rgb_to_hsv(image):
    """torchvision's _rgb2hsv, channels last; hue in [0, 1)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.max(image, axis=-1)
    minc = jnp.min(image, axis=-1)
    equal = maxc == minc
    chroma = maxc - minc
    # The where()s avoid 0/0 for grey pixels, whose hue and saturation are 0.
    s = chroma / jnp.where(equal, 1.0, maxc)
    divisor = jnp.where(equal, 1.0, chroma)
    rc = (maxc - r) / divisor
    gc = (maxc - g) / divisor
    bc = (maxc - b) / divisor
    # torchvision tests maxc == r, then maxc == g: the first channel holding the max, which is
    # argmax. Exact float equality is fragile under jit: XLA may recompute `image` in another
    # fusion with different rounding (it does when the batch is sharded), so that maxc matches
    # no channel and the pixel gets the wrong sector; argmax always picks exactly one.
    channel = jnp.argmax(image, axis=-1)
    h6 = jnp.where(channel == 0, bc - gc, jnp.where(channel == 1, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.mod(h6 / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv):
    """torchvision's _hsv2rgb, channels last."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector_float = jnp.floor(h * 6.0)
    f = h * 6.0 - sector_float
    sector = jnp.mod(sector_float.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    # Per sector (0..5) the (r, g, b) triple, as torchvision's a1, a2, a3 tables.
    table = jnp.stack(
        [
            jnp.stack([v, q, p, p, t, v], axis=-1),
            jnp.stack([t, v, v, q, p, p], axis=-1),
            jnp.stack([p, p, t, v, v, q], axis=-1),
        ],
        axis=-2,
    )  # (..., 3 channels, 6 sectors)
    index = jnp.broadcast_to(sector[..., None, None], table.shape[:-1] + (1,))
    return jnp.take_along_axis(table, index, axis=-1)[..., 0]


def adjust_hue(image, shift):
    """Rotate the hue by `shift` (a fraction of the circle, in [-0.5, 0.5]) in HSV space."""
    hsv = rgb_to_hsv(image)
    hue = jnp.mod(hsv[..., 0] + shift, 1.0)
    return hsv_to_rgb(jnp.concatenate([hue[..., None], hsv[..., 1:]], axis=-1))


def solarize(image, threshold=0.5):
    """PIL's ImageOps.solarize(img, 128) in [0, 1]: x → 1 − x where x ≥ 127.5 / 255 (see top)."""
    return jnp.where(image >= threshold, 1.0 - image, image)


def box_radius(sigma):
    """PIL's ``_gaussian_blur_radius``: (l, a) of the extended box whose passes have variance σ².

    The box has 2l + 1 taps of weight 1 and one of weight a ∈ [0, 1) at each end, all divided by
    2(l + a) + 1 (Gwosdek et al. 2011, eqs. 7, 11, 14).
    """
    sigma2 = sigma * sigma / BLUR_PASSES
    n = jnp.floor((jnp.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)  # the paper's l
    a = (2.0 * n + 1.0) * (n * (n + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (n + 1.0) ** 2))
    return n, a


# The widest box of the sigma range reaches this many pixels from its centre (2 for sigma = 2).
_BOX_REACH = int((math.sqrt(12.0 * BLUR_SIGMA_RANGE[1] ** 2 / BLUR_PASSES + 1.0) - 1.0) // 2) + 1


def gaussian_blur(image, sigma):
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` of a float (H, W, C) image, in float.

    Three extended-box passes along the width, then three along the height, each replicating the
    edge pixels, as PIL's ImagingGaussianBlur; PIL would round to uint8 after every pass. One
    static (2·_BOX_REACH + 1)-tap kernel serves every sigma in BLUR_SIGMA_RANGE (under vmap).
    """
    n, a = box_radius(jnp.asarray(sigma, jnp.float32))
    distance = jnp.abs(jnp.arange(-_BOX_REACH, _BOX_REACH + 1, dtype=jnp.float32))
    kernel = jnp.where(distance <= n, 1.0, jnp.where(distance == n + 1.0, a, 0.0))
    kernel = kernel / (2.0 * (n + a) + 1.0)
    for axis in (1,) * BLUR_PASSES + (0,) * BLUR_PASSES:
        size = image.shape[axis]
        pad = [(0, 0)] * image.ndim
        pad[axis] = (_BOX_REACH, _BOX_REACH)
        padded = jnp.pad(image, pad, mode="edge")
        image = sum(
            kernel[k] * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
            for k in range(2 * _BOX_REACH + 1)
        )
    return image


# --------------------------------------------------------------------------------------------
# ColorJitter


def jitter_from_uniforms(uniforms, params: AugmentParams):
    """ColorJitter.get_params from `JITTER_UNIFORMS` U[0, 1) draws.

    Returns (order int32[4] — a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue, the
    argsort of four uniforms, hence uniform over the 24 orders —, factors float32[4]):
    brightness/contrast/saturation factors ~ U[max(0, 1 − x), 1 + x], the hue shift ~ U[−hue, hue].
    """
    order = jnp.argsort(uniforms[:4]).astype(jnp.int32)
    strengths = (params.brightness, params.contrast, params.saturation)
    low = jnp.array([max(0.0, 1.0 - s) for s in strengths] + [-params.hue])
    high = jnp.array([1.0 + s for s in strengths] + [params.hue])
    return order, low + (high - low) * uniforms[4:8]


def sample_color_jitter(key, params: AugmentParams):
    """(order, factors) of one ColorJitter call; see `jitter_from_uniforms`."""
    return jitter_from_uniforms(jax.random.uniform(key, (JITTER_UNIFORMS,)), params)


def color_jitter(image, order, factors, params: AugmentParams):
    """Applies the four ColorJitter ops in `order` with `factors` (from `sample_color_jitter`).

    An op whose strength is 0 is skipped, as torchvision does (it sets it to None); this matters
    for hue, whose HSV round trip is not exact.
    """
    ops = [
        (params.brightness, adjust_brightness),
        (params.contrast, adjust_contrast),
        (params.saturation, adjust_saturation),
        (params.hue, adjust_hue),
    ]
    branches = [
        (lambda x, op=op, i=i: op(x, factors[i])) if strength > 0 else (lambda x: x)
        for i, (strength, op) in enumerate(ops)
    ]
    for position in range(4):
        image = jax.lax.switch(order[position], branches, image)
    return image


# --------------------------------------------------------------------------------------------
# One view, one batch


def _to_unit_float(images):
    """uint8 → float32 / 255; float input is taken to be in [0, 1] already."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(images, params: AugmentParams):
    """Step 6 only (test images): to [0, 1] float32, then (x − mean) / std per channel."""
    mean = jnp.asarray(params.mean, jnp.float32)
    std = jnp.asarray(params.std, jnp.float32)
    return (_to_unit_float(images) - mean) / std


def _maybe(u, prob: float, transform, image):
    """transform(image) if u < prob, u ~ U[0, 1): with probability `prob`; compiled out at 0."""
    if prob == 0.0:
        return image
    return jnp.where(u < prob, transform(image), image)


def _augment_image(key, image, params: AugmentParams, crop: bool = True):
    """Steps 1-5 on one float (H, W, 3) image in [0, 1]; step 1 skipped when `crop` is False.

    All of the image's randomness is one vector of uniforms, sliced per op: vmapping one threefry
    call compiles much faster on CPU than a dozen small ones, and draws the same distributions.
    The vector has the same layout whatever the probabilities, so an op at p = 0 (compiled out)
    leaves the draws of the others, and hence the CIFAR recipe's views, as they are.
    """
    u = jax.random.uniform(key, (CROP_UNIFORMS + JITTER_UNIFORMS + 6,))
    u_crop, u_jitter = u[:CROP_UNIFORMS], u[CROP_UNIFORMS : CROP_UNIFORMS + JITTER_UNIFORMS]
    u_jitter_apply, u_gray, u_blur, u_sigma, u_solarize, u_flip = u[-6:]
    height, width, _ = image.shape
    # 1. RandomResizedCrop (streamed data arrives cropped; the other draws stay where they are).
    if crop:
        top, left, h, w = crop_from_uniforms(u_crop, height, width, params)
        image = resized_crop(image, top, left, h, w, params.crop_size)
    # 2. ColorJitter, applied with color_jitter_prob.
    order, factors = jitter_from_uniforms(u_jitter, params)
    jitter = lambda x: color_jitter(x, order, factors, params)
    image = _maybe(u_jitter_apply, params.color_jitter_prob, jitter, image)
    # 3. RandomGrayscale.
    image = _maybe(u_gray, params.gray_scale_prob, grayscale, image)
    # 4. Gaussian blur, then solarisation (the order of MoCo v2's and solo-learn's pipelines).
    sigma = BLUR_SIGMA_RANGE[0] + (BLUR_SIGMA_RANGE[1] - BLUR_SIGMA_RANGE[0]) * u_sigma
    image = _maybe(u_blur, params.gaussian_prob, lambda x: gaussian_blur(x, sigma), image)
    image = _maybe(u_solarize, params.solarization_prob, solarize, image)
    # 5. Horizontal flip.
    return _maybe(u_flip, params.horizontal_flip_prob, lambda x: x[:, ::-1, :], image)


def augment_view(key, images, params: AugmentParams, crop: bool = True):
    """One augmented view of a uint8 (B, H, W, 3) batch → float32 (B, crop, crop, 3), normalised.

    Each image uses its own key (`jax.random.split(key, B)`), so images draw independently.
    `crop=False`: the images are already RandomResizedCrops of `crop_size` (cropped on the host).
    """
    keys = jax.random.split(key, images.shape[0])
    augment = lambda k, x: _augment_image(k, x, params, crop)
    return normalize(jax.vmap(augment)(keys, _to_unit_float(images)), params)


def two_views(key, images, params: AugmentParams):
    """The two views of the official recipe, each from its own independent key stream.

    `images` is a uint8 batch to crop here, or a pair of batches of host crops (streamed data:
    both views cropped from one decode), which then get steps 2-6 only.
    """
    key1, key2 = jax.random.split(key)
    if isinstance(images, tuple):
        view1, view2 = images
        return augment_view(key1, view1, params, False), augment_view(key2, view2, params, False)
    return augment_view(key1, images, params), augment_view(key2, images, params)
