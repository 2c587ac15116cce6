"""Owns the renderer registry (RENDERERS) and the grayscale scan renderers (x-ray, CT, MRI, ultrasound, OCT)."""

from __future__ import annotations

import numpy as np

from mmkd.data.draw import ellipse, grid, smooth_noise, to_rgb
from mmkd.data.render_photo import dermatology, endoscopy, fundus, pathology

# Each renderer (here and in render_photo.py): (rng, size, finding, attrs, contrast, seen=None) -> float RGB in
# [0, 1]; `seen` (a dict) receives what the renderer drew for this image (positions, counts, ratios), which the
# training caption describes. `side` is the patient's side; radiology images show patient-left on image-right.
# Optional attrs keys (cy, center, centers, cys, xs, glands, focus, nuclei, tone, shade, exudates, shift, lumen, dy,
# cdr, hair, stain) place or count what the evaluation suite (data/eval_items.py) describes. Every rng draw still happens when a key overrides it
# (`attrs.get(key, rng.draw())`), and extra draws happen only when a key is present, so the training corpus,
# which passes none of them, renders byte-identically.


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


RENDERERS = {
    "xray": xray, "ct": ct, "mri": mri, "ultrasound": ultrasound, "pathology": pathology,
    "dermatology": dermatology, "fundus": fundus, "oct": oct, "endoscopy": endoscopy,
}
