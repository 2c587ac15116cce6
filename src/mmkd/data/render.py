"""Owns the procedural image renderers: one function per modality, numpy only, deterministic per rng."""

from __future__ import annotations

import numpy as np
from PIL import Image


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1]: (yy, xx)."""
    ax = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(ax, ax, indexing="ij")


def ellipse(yy, xx, cy, cx, ry, rx, soft=0.04, angle=0.0):
    """Soft-edged filled ellipse mask in [0, 1]."""
    y, x = yy - cy, xx - cx
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        x, y = c * x + s * y, -s * x + c * y
    d = np.sqrt((y / ry) ** 2 + (x / rx) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / max(soft, 1e-3), -50, 50)))


def smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: random cells x cells field, bilinearly upsampled."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR))


def blobs(yy, xx, centers, radii, soft=0.25):
    """Sum of gaussian blobs; centers (N,2) as (cy,cx), radii (N,)."""
    if len(centers) == 0:
        return np.zeros_like(yy)
    cy = centers[:, 0][:, None, None]
    cx = centers[:, 1][:, None, None]
    r = np.asarray(radii, dtype=np.float32)[:, None, None]
    d2 = ((yy[None] - cy) ** 2 + (xx[None] - cx) ** 2) / (r**2)
    return np.clip(np.exp(-(d2**2) * (1.0 / soft)).sum(0), 0, 1)


def to_rgb(gray: np.ndarray, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    g = np.clip(gray, 0, 1)
    return np.stack([g * tint[0], g * tint[1], g * tint[2]], -1)


def finish(rgb: np.ndarray, rng, noise: float, controls: dict | None = None, seen: dict | None = None) -> np.ndarray:
    """Global exposure jitter plus sensor noise, to uint8; `controls` may fix gain and bias (the suite's exposure
    and black level), `seen` receives the values used (for the caption)."""
    controls = controls or {}
    gain = controls.get("gain", rng.uniform(0.85, 1.15))
    bias = controls.get("bias", rng.uniform(-0.05, 0.05))
    if seen is not None:
        seen.update(gain=float(gain), bias=float(bias))
    out = rgb * gain + bias + rng.normal(0, noise, rgb.shape)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


# Each renderer: (rng, size, finding, attrs, contrast, seen=None) -> float RGB in [0, 1]; `seen` (a dict) receives
# what the renderer drew for this image (positions, counts, ratios), which the training caption describes.
# `side` is the patient's side; radiology images show patient-left on image-right.
# Optional attrs keys (cy, center, centers, cys, xs, glands, focus, nuclei, tone, shade, exudates, shift, lumen, dy,
# cdr, hair, stain) place or count
# what the evaluation suite (data/eval_items.py) describes. Every rng draw still happens when a key overrides it
# (`attrs.get(key, rng.draw())`), and extra draws happen only when a key is present, so the training corpus,
# which passes none of them, renders byte-identically.
SKIN_TONES = {"light": (0.95, 0.8, 0.7), "medium": (0.85, 0.65, 0.5), "dark": (0.6, 0.42, 0.3)}
NUCLEI = {"small": (0.035, 0.05), "large": (0.075, 0.09)}  # carcinoma nuclear radius range per eval `nuclei`


def _shifted(size: int, attrs: dict, seen: dict) -> tuple[np.ndarray, np.ndarray]:
    """The grid moved by attrs["shift"] = (oy, ox) (the suite's framing; the corpus has none here)."""
    yy, xx = grid(size)
    if "shift" in attrs:
        oy, ox = attrs["shift"]
        seen["shift"] = (float(oy), float(ox))
        return yy - oy, xx - ox
    return yy, xx


def _side_x(side: str, radiological: bool) -> float:
    s = 1.0 if side == "left" else -1.0
    return s if radiological else -s


def xray(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = grid(size)
    oy, ox = attrs.get("shift", rng.uniform(-0.06, 0.06, 2))
    yy, xx = yy - oy, xx - ox
    seen["shift"] = (float(oy), float(ox))
    img = 0.12 + 0.45 * ellipse(yy, xx, 0.1, 0, 1.0, 0.9, soft=0.1)
    lungs = ellipse(yy, xx, -0.05, -0.38, 0.6, 0.28) + ellipse(yy, xx, -0.05, 0.38, 0.6, 0.28)
    img -= 0.3 * lungs
    ribs = (np.sin(yy * 22 + 3 * xx**2) > 0.55).astype(np.float32) * 0.07 * lungs
    img += ribs + 0.35 * ellipse(yy, xx, 0, 0, 1.2, 0.07)
    img += 0.22 * ellipse(yy, xx, 0.28, 0.1, 0.25, 0.28 * rng.uniform(0.9, 1.15))
    sx = _side_x(attrs["side"], radiological=True) * 0.38
    big = attrs["size"] == "large"
    if finding == "pneumonia":
        r = 0.22 if big else 0.13
        cy = attrs.get("cy", rng.uniform(-0.35, 0.2))
        seen["cy"] = float(cy)
        patch = ellipse(yy, xx, cy, sx + rng.uniform(-0.08, 0.08), r, r * 1.2, soft=0.2)
        img += 0.4 * c * patch * (0.7 + 0.3 * smooth_noise(rng, size, 8))
    elif finding == "effusion":
        level = 0.35 if big else 0.45
        side_mask = ellipse(yy, xx, -0.05, sx, 0.6, 0.28)
        meniscus = 1 / (1 + np.exp(-((yy - level + 0.6 * (xx - sx) ** 2) / 0.03)))
        img += 0.45 * c * side_mask * meniscus
    img += 0.04 * smooth_noise(rng, size, 6)
    return to_rgb(img)


def ct(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = _shifted(size, attrs, seen)
    body = ellipse(yy, xx, 0.05, 0, 0.68, 0.88, soft=0.02)
    img = 0.05 + 0.33 * body + 0.12 * ellipse(yy, xx, 0.05, 0, 0.6, 0.8)
    liver = ellipse(yy, xx, -0.12, -0.38, 0.38, 0.36)  # patient right = image left
    img += 0.12 * liver
    kid_l, kid_r = ellipse(yy, xx, 0.25, 0.42, 0.14, 0.09), ellipse(yy, xx, 0.25, -0.42, 0.14, 0.09)
    img += 0.16 * (kid_l + kid_r)
    img += 0.5 * ellipse(yy, xx, 0.48, 0, 0.13, 0.13, soft=0.02) + 0.35 * ellipse(yy, xx, 0.22, 0.05, 0.05, 0.05)
    img += 0.05 * ellipse(yy, xx, -0.1, 0.32, 0.2, 0.22) * smooth_noise(rng, size, 10)  # bowel
    big = attrs["size"] == "large"
    if finding == "liver_lesion":
        r = 0.14 if big else 0.08
        cy, cx = rng.uniform(-0.3, 0.05), rng.uniform(-0.5, -0.28)
        seen["centers"] = [(float(y), float(x)) for y, x in attrs.get("centers", [(cy, cx)])]
        for cy, cx in seen["centers"]:
            img -= 0.22 * c * ellipse(yy, xx, cy, cx, r, r)
    elif finding == "kidney_stone":
        kx = 0.42 * _side_x(attrs["side"], radiological=True)
        r = 0.06 if big else 0.035
        cy = 0.25 + rng.uniform(-0.06, 0.06)
        seen["cys"] = [float(y) for y in attrs.get("cys", [cy])]
        for cy in seen["cys"]:
            img += 0.55 * c * ellipse(yy, xx, cy, kx, r, r, soft=0.05)
    return to_rgb(img + 0.03 * smooth_noise(rng, size, 12))


def mri(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = _shifted(size, attrs, seen)
    head = ellipse(yy, xx, 0, 0, 0.88, 0.72, soft=0.02)
    brain = ellipse(yy, xx, 0, 0, 0.8, 0.64, soft=0.03)
    img = 0.55 * (head - brain) + 0.4 * brain
    theta = np.arctan2(yy, xx)
    img += 0.06 * brain * np.sin(theta * 14 + 6 * np.sqrt(yy**2 + xx**2) + rng.uniform(0, 6))
    vscale = rng.uniform(0.85, 1.2)  # normal ventricles vary, so mild hydrocephalus overlaps them
    if finding == "hydrocephalus":
        vscale = 1.1 + 0.5 * c
    seen["ventricles"] = float(vscale)
    vent = ellipse(yy, xx, -0.08, -0.12, 0.22 * vscale, 0.07 * vscale, angle=0.3) + ellipse(
        yy, xx, -0.08, 0.12, 0.22 * vscale, 0.07 * vscale, angle=-0.3
    )
    img -= 0.3 * np.clip(vent, 0, 1)
    if finding == "tumor":
        r = 0.2 if attrs["size"] == "large" else 0.12
        cx = 0.35 * _side_x(attrs["side"], radiological=True)
        cy = attrs.get("cy", rng.uniform(-0.4, 0.35))
        seen["cy"] = float(cy)
        img += 0.08 * c * ellipse(yy, xx, cy, cx, r * 1.7, r * 1.7, soft=0.15)  # edema
        img += 0.15 * c * ellipse(yy, xx, cy, cx, r, r, soft=0.05)
    return to_rgb(img + 0.03 * smooth_noise(rng, size, 10))


def ultrasound(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = _shifted(size, attrs, seen)
    ry, rx = yy + 1.0, xx  # apex at top centre
    r = np.sqrt(ry**2 + rx**2)
    ang = np.arctan2(rx, ry)
    fan = (np.abs(ang) < 0.7).astype(np.float32) * (r > 0.25) * (r < 1.9)
    speckle = rng.rayleigh(0.35, (size, size)).astype(np.float32)
    tissue = 0.35 + 0.1 * np.sin(r * 9 + smooth_noise(rng, size, 5))
    img = tissue * speckle
    big = attrs["size"] == "large"
    rad = 0.22 if big else 0.13
    cy, cx = attrs.get("center", (rng.uniform(-0.1, 0.4), rng.uniform(-0.3, 0.3)))
    if finding != "normal":
        seen["center"] = (float(cy), float(cx))
    if finding == "cyst":
        m = ellipse(yy, xx, cy, cx, rad, rad * 1.2, soft=0.05)
        img = img * (1 - 0.9 * c * m)
        img += 0.25 * c * ellipse(yy, xx, cy + rad * 2.2, cx, rad * 1.2, rad * 0.9, soft=0.2)  # enhancement
    elif finding == "mass":
        lobes = rad * (1 + 0.25 * np.sin(4 * np.arctan2(yy - cy, xx - cx)))
        m = 1 / (1 + np.exp((np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - lobes) / 0.03))
        img = img * (1 - 0.35 * c * m) + 0.05 * m
        img *= 1 - 0.5 * c * ellipse(yy, xx, cy + rad * 2.5, cx, rad * 1.6, rad * 0.8, soft=0.2)  # shadow
    return to_rgb(img * fan, tint=(1.0, 0.97, 0.9))


def pathology(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = grid(size)
    stroma = 0.5 + 0.5 * np.sin(xx * 12 + 2 * smooth_noise(rng, size, 6))
    base = np.stack([0.93 - 0.05 * stroma, 0.72 - 0.1 * stroma, 0.82 - 0.05 * stroma], -1)
    if finding == "normal":
        centers, radii = [], []
        n_glands = rng.integers(2, 4)
        glands = attrs.get("glands") or [(rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.2, 0.3))
                                         for _ in range(n_glands)]
        seen["glands"] = len(glands)
        for gy, gx, gr in glands:
            lumen = ellipse(yy, xx, gy, gx, gr * 0.6, gr * 0.6)
            base = base * (1 - 0.7 * lumen[..., None]) + 0.7 * lumen[..., None] * np.array([0.97, 0.93, 0.95])
            t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
            centers += list(zip(gy + gr * np.sin(t), gx + gr * np.cos(t)))
            radii += [0.04] * len(t)
        n_extra = 10
        tone = np.array([0.35, 0.2, 0.55])
    elif finding == "carcinoma":
        n = int(50 + 70 * c)
        centers = list(rng.uniform(-1, 1, (n, 2)))
        radii = list(rng.uniform(0.045, 0.045 + 0.04 * c, n))
        if "nuclei" in attrs:
            radii = list(rng.uniform(*NUCLEI[attrs["nuclei"]], n))
        n_extra = 0
        tone = np.array([0.3, 0.12, 0.45]) * (1 - 0.3 * c)
        seen.update(cells=n, nuclear_radius=float(np.mean(radii)))
    else:  # inflammation: many small dark lymphocytes
        n = int(60 + 90 * c)
        centers = list(rng.uniform(-1, 1, (n, 2)))
        radii = list(np.full(n, 0.028))
        n_extra = 15
        tone = np.array([0.25, 0.15, 0.5])
        seen["cells"] = n
    if "focus" in attrs and finding != "normal":  # a focal lesion: its cells gathered around (fy, fx)
        fy, fx, fr = attrs["focus"]
        seen["focus"] = (float(fy), float(fx))
        centers = [np.asarray(p) * fr + (fy, fx) for p in centers]
    extra = rng.uniform(-1, 1, (n_extra, 2))
    centers = np.array(list(centers) + list(extra), dtype=np.float32).reshape(-1, 2)
    radii = np.array(list(radii) + [0.035] * n_extra, dtype=np.float32)
    nuclei = blobs(yy, xx, centers, radii, soft=0.6)[..., None]
    stain = rng.uniform(0.85, 1.1, 3)  # staining batch variation
    stain = np.asarray(attrs.get("stain", stain), dtype=float)
    seen["stain"] = tuple(float(v) for v in stain)
    return (base * (1 - nuclei) + nuclei * tone) * stain


def dermatology(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = grid(size)
    tone = np.array(rng.choice([list(t) for t in SKIN_TONES.values()]))
    if "tone" in attrs:
        tone = np.array(SKIN_TONES[attrs["tone"]])
    seen["tone"] = next(k for k, v in SKIN_TONES.items() if np.allclose(v, tone))
    skin = tone * (1 + 0.05 * smooth_noise(rng, size, 16))[..., None]
    cy, cx = attrs.get("center", rng.uniform(-0.2, 0.2, 2))
    seen["center"] = (float(cy), float(cx))
    big = attrs["size"] == "large"
    r0 = 0.4 if big else 0.25
    theta = np.arctan2(yy - cy, xx - cx)
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    if finding == "nevus":
        m = 1 / (1 + np.exp((dist - r0 * 0.8) / 0.02))
        shade = attrs.get("shade", rng.uniform(0.6, 1.3))  # nevi range from tan to dark brown
        seen["shade"] = float(shade)
        color = np.array([0.45, 0.28, 0.18]) * shade
        lesion = np.broadcast_to(color, skin.shape) * (1 + 0.15 * smooth_noise(rng, size, 4))[..., None]
    elif finding == "melanoma":
        wobble = 1 + 0.15 * c * (np.sin(3 * theta + rng.uniform(0, 6)) + 0.6 * np.sin(7 * theta + rng.uniform(0, 6)))
        m = 1 / (1 + np.exp((dist - r0 * wobble) / 0.03))
        patches = smooth_noise(rng, size, 6)[..., None]
        dark, blue = np.array([0.15, 0.08, 0.06]), np.array([0.35, 0.35, 0.45])
        lesion = np.where(patches > 0.2, dark, np.where(patches < -0.3, blue, np.array([0.4, 0.25, 0.15])))
        lesion = 0.6 * c * lesion + (1 - 0.6 * c) * np.array([0.45, 0.28, 0.18])
    else:  # psoriasis plaque
        m = 1 / (1 + np.exp((dist - r0 * (1 + 0.1 * np.sin(5 * theta))) / 0.06))
        scale = (rng.uniform(0, 1, (size, size)) > 0.8)[..., None]
        lesion = np.where(scale, np.array([0.95, 0.92, 0.9]), np.array([0.85, 0.35, 0.35]))
        lesion = 0.5 * c * lesion + (1 - 0.5 * c) * np.array([0.5, 0.3, 0.2])
    m = m[..., None]
    hair_phase, has_hair = rng.uniform(0, 6), rng.uniform() < 0.5
    has_hair = bool(attrs.get("hair", has_hair))
    seen["hair"] = has_hair
    hair = (np.abs(np.sin(xx * 3 + yy * 9 + hair_phase)) < 0.02)[..., None] * has_hair
    out = skin * (1 - m) + m * lesion
    return out * (1 - 0.7 * hair)


def fundus(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = grid(size)
    retina = ellipse(yy, xx, 0, 0, 0.92, 0.92, soft=0.02)
    r = np.sqrt(yy**2 + xx**2)
    base = np.stack([0.85 - 0.3 * r, 0.38 - 0.15 * r, 0.15 + 0 * r], -1)
    dx = 0.45 * (1 if attrs["side"] == "right" else -1)  # optic disc sits nasally
    dy = attrs.get("dy", rng.uniform(-0.08, 0.08))
    seen["dy"] = float(dy)
    rd, phi = np.sqrt((yy - dy) ** 2 + (xx - dx) ** 2), np.arctan2(yy - dy, xx - dx)
    vessels = np.zeros_like(yy)
    for k in range(6):
        a0 = k * np.pi / 3 + rng.uniform(-0.3, 0.3)
        dphi = np.angle(np.exp(1j * (phi - a0 - 0.35 * rd)))
        vessels = np.maximum(vessels, np.exp(-((dphi * rd) ** 2) / 0.0015) * (rd > 0.1))
    out = base * (1 - 0.5 * vessels[..., None]) + 0.5 * vessels[..., None] * np.array([0.55, 0.08, 0.05])
    disc = ellipse(yy, xx, dy, dx, 0.2, 0.18, soft=0.05)[..., None]
    cdr = 0.3 + (0.25 + 0.35 * c if finding == "glaucoma" else rng.uniform(-0.05, 0.1))
    cdr = attrs.get("cdr", cdr)
    seen["cdr"] = float(cdr)
    cup = ellipse(yy, xx, dy, dx, 0.2 * cdr, 0.18 * cdr, soft=0.05)[..., None]
    out = out * (1 - disc) + disc * np.array([0.98, 0.8, 0.45])
    out = out * (1 - cup) + cup * np.array([1.0, 0.95, 0.8])
    if finding == "retinopathy":
        n = int(6 + 20 * c)
        seen["hemorrhages"] = n
        pts = rng.uniform(-0.6, 0.6, (n, 2))
        dots = blobs(yy, xx, pts, np.full(n, 0.045), soft=0.5)[..., None]
        out = out * (1 - dots) + dots * np.array([0.45, 0.02, 0.02])
        k = int(3 + 10 * c)
        ex = blobs(yy, xx, rng.uniform(-0.5, 0.5, (k, 2)), np.full(k, 0.05), soft=0.5)[..., None]
        seen["exudates"] = k if attrs.get("exudates", True) else 0
        if attrs.get("exudates", True):
            out = out * (1 - ex) + ex * np.array([0.98, 0.9, 0.45])
    return out * retina[..., None]


def oct(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = _shifted(size, attrs, seen)
    top = -0.25 + 0.18 * np.exp(-(xx**2) / 0.04) + 0.05 * smooth_noise(rng, size, 3)
    depth = yy - top
    img = np.zeros_like(yy)
    rpe_y = 0.35 + 0.03 * np.sin(xx * 2)
    if finding == "drusen":
        k = int(2 + 4 * c)
        xs = rng.uniform(-0.7, 0.7, k)
        seen["xs"] = [float(x) for x in attrs.get("xs", xs)]
        for x0 in seen["xs"]:
            rpe_y = rpe_y - 0.12 * c * np.exp(-((xx - x0) ** 2) / 0.008)
    retina = (depth > 0) & (yy < rpe_y)
    img += retina * (0.35 + 0.15 * np.sin(depth * 30))
    img += 0.7 * np.exp(-(depth**2) / 0.0015)  # nerve fibre layer
    img += 0.8 * np.exp(-((yy - rpe_y) ** 2) / 0.002)  # RPE
    img += 0.3 * (yy > rpe_y) * np.exp(-(yy - rpe_y) * 3)
    if finding == "fluid":
        k = 1 + int(2 * c)
        xs = [rng.uniform(-0.4, 0.4) for _ in range(k)]
        seen["xs"] = [float(x) for x in attrs.get("xs", xs)]
        for x0 in seen["xs"]:
            r = 0.08 + 0.12 * c * (1.3 if attrs["size"] == "large" else 0.8)
            img *= 1 - 0.95 * ellipse(yy, xx, 0.05, x0, r * 0.6, r, soft=0.05)
    speckle = rng.gamma(4.0, 0.25, (size, size))
    return to_rgb(img * speckle)


def endoscopy(rng, size, finding, attrs, c, seen=None):
    seen = {} if seen is None else seen
    yy, xx = grid(size)
    view = ellipse(yy, xx, 0, 0, 0.95, 0.95, soft=0.03)
    folds = 0.5 + 0.5 * np.sin(np.sqrt(yy**2 + (xx * 1.3) ** 2) * 10 + 3 * smooth_noise(rng, size, 4))
    ly, lx = attrs.get("lumen", (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)))
    seen["lumen"] = (float(ly), float(lx))
    lumen = ellipse(yy, xx, ly, lx, 0.25, 0.2, soft=0.2)
    base = np.stack([0.85 - 0.15 * folds, 0.45 - 0.12 * folds, 0.4 - 0.1 * folds], -1)
    base = base * (1 - 0.8 * lumen[..., None])
    cy, cx = attrs.get("center", rng.uniform(-0.5, 0.5, 2))
    r = 0.28 if attrs["size"] == "large" else 0.16
    if finding != "normal":
        seen["center"] = (float(cy), float(cx))
    if finding == "polyp":
        m = ellipse(yy, xx, cy, cx, r, r, soft=0.08)
        shade = np.clip(1 - ((yy - cy + r * 0.4) ** 2 + (xx - cx + r * 0.4) ** 2) / (r * r * 2), 0, 1)
        color = np.array([0.9, 0.55, 0.5]) * (0.7 + 0.5 * shade)[..., None]
        base = base * (1 - c * m[..., None]) + c * m[..., None] * color
    elif finding == "ulcer":
        rim = ellipse(yy, xx, cy, cx, r * 1.3, r * 1.3, soft=0.1)[..., None]
        core = ellipse(yy, xx, cy, cx, r, r * 0.8, soft=0.08)[..., None]
        base = base * (1 - c * rim) + c * rim * np.array([0.75, 0.15, 0.15])
        base = base * (1 - c * core) + c * core * np.array([0.95, 0.9, 0.65])
    spec = blobs(yy, xx, rng.uniform(-0.8, 0.8, (4, 2)), np.full(4, 0.03), soft=0.3)[..., None]
    return (base * (1 - spec) + spec) * view[..., None]


RENDERERS = {
    "xray": xray, "ct": ct, "mri": mri, "ultrasound": ultrasound, "pathology": pathology,
    "dermatology": dermatology, "fundus": fundus, "oct": oct, "endoscopy": endoscopy,
}
