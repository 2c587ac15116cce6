"""Owns the colour renderers (pathology, dermatology, fundus, endoscopy): numpy only, deterministic per rng."""

from __future__ import annotations

import numpy as np

from mmkd.data.draw import blobs, ellipse, grid, smooth_noise

# The renderer contract and the attrs convention are render.py's (it holds the registry, RENDERERS).
SKIN_TONES = {"light": (0.95, 0.8, 0.7), "medium": (0.85, 0.65, 0.5), "dark": (0.6, 0.42, 0.3)}
NUCLEI = {"small": (0.035, 0.05), "large": (0.075, 0.09)}  # carcinoma nuclear radius range per eval `nuclei`


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
