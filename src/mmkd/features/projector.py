"""Owns the maps from each teacher's native embeddings to the student's space: the orthogonal maps of the shared
space (`consensus`, `shared`, `procrustes`) and the reference's multi-teacher autoencoder (`autoencoder`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from mmkd.config import AlignCfg
from mmkd.progress import progress
from mmkd import atomic


class MultiTeacherAutoencoder(nn.Module):
    """One linear in/out layer per teacher around a shared MLP encoder/decoder (the reference design)."""

    def __init__(self, dims: dict[str, int], latent: int, hidden: int, dropout: float):
        super().__init__()
        self.dims, self.latent, self.hidden = dict(dims), latent, hidden
        self.inp = nn.ModuleDict({t: nn.Linear(d, hidden) for t, d in dims.items()})
        self.encoder = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                     nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, hidden), nn.GELU())
        self.out = nn.ModuleDict({t: nn.Linear(hidden, d) for t, d in dims.items()})

    def encode(self, teacher: str, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.inp[teacher](x))

    def forward(self, teacher: str, x: torch.Tensor) -> torch.Tensor:
        return self.out[teacher](self.decoder(self.encode(teacher, x)))

    @torch.no_grad()
    def project(self, teacher: str, x: torch.Tensor, modality=None) -> torch.Tensor:
        """Student-dimension targets, L2-normalised (the reference forgot this; its MSE assumes it). One map for
        every modality: `modality` is ignored."""
        self.eval()
        return F.normalize(self.encode(teacher, x), dim=-1)


def train_projector(features: dict, latent: int, cfg: AlignCfg, seed: int,
                    pull: "Pull | None" = None) -> tuple[MultiTeacherAutoencoder, dict]:
    """features: teacher -> rows [N, D_t] (image and text rows together): a tensor, or anything with len(),
    .shape and batch indexing returning a float tensor (features.align.StoreRows streams them from the store).
    Reconstruction MSE with input noise; with `pull`, plus cfg.anchor_weight * InfoNCE toward the stage-1
    student's embedding of the pair and cfg.consistency_weight * InfoNCE toward the other teachers' projections."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dims = {t: int(x.shape[1]) for t, x in features.items()}
    model = MultiTeacherAutoencoder(dims, latent, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    model.train()
    names = list(features)
    for _ in progress(range(cfg.epochs), desc="projector", unit="epoch"):
        # every teacher's batches, shuffled together: the shared encoder never trains on one teacher for long
        batches = []
        for t in names:
            order = torch.randperm(len(features[t]), generator=gen)
            batches += [(t, order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)]
        totals = {t: [0.0, 0] for t in names}
        for k in torch.randperm(len(batches), generator=gen).tolist():
            t, rows = batches[k]
            batch = features[t][rows.sort().values]  # sorted: kinder to memory-mapped shards
            noisy = batch + cfg.noise_std * torch.randn(batch.shape, generator=gen)
            loss = F.mse_loss(model(t, noisy), batch)
            if pull is not None:
                loss = loss + pull.loss(model, t, rows.sort().values, noisy, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            totals[t][0] += loss.item() * len(batch)
            totals[t][1] += len(batch)
        losses = {t: total / max(1, count) for t, (total, count) in totals.items()}
    model.eval()
    return model, {f"recon_mse_{t}": v for t, v in losses.items()}


def _contrast(z: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE of each row against its own target among the batch's: a plain cosine pull would be met by the
    modality cluster alone (every row of a modality drawn to one point), this one needs the sample itself."""
    logits = z @ target.T / temperature
    return F.cross_entropy(logits, torch.arange(len(z)))


class Pull:
    """The autoencoder's optional contrastive pulls on its latent: toward the stage-1 student's embedding of the same
    pair (anchor) and toward the other teachers' projections of it (consistency). Row r of teacher t's rows is
    sample index[t][r % n_t] of the common train list (image rows, then text rows, as StoreRows lays them out).
    student: its (image, text) embeddings of the common list (arrays, or features.student.StudentRows: a batch's rows
    are read per step), or one [2N, d] tensor of image rows then text rows; None: no anchor."""

    def __init__(self, features: dict, index: dict[str, np.ndarray], student, eligible: dict[str, np.ndarray]):
        from mmkd.features.student import as_rows

        if isinstance(student, torch.Tensor):
            student = (student[: len(student) // 2].numpy(), student[len(student) // 2 :].numpy())
        self.student = None if student is None else as_rows(student)
        self.features, self.index, self.eligible = features, index, eligible
        # where each common sample sits in every teacher's rows (-1: no features)
        n = len(next(iter(eligible.values())))
        self.where = {}
        for t, idx in index.items():
            w = np.full(n, -1, np.int64)
            w[idx] = np.arange(len(idx))
            self.where[t] = w

    def loss(self, model: MultiTeacherAutoencoder, t: str, rows: torch.Tensor, noisy: torch.Tensor,
             cfg: AlignCfg) -> torch.Tensor:
        rows = rows.numpy()
        n_t = len(self.index[t])
        sample, is_text = self.index[t][rows % n_t], rows >= n_t
        z = F.normalize(model.encode(t, noisy), dim=-1)
        total = z.new_zeros(())
        if cfg.anchor_weight > 0 and self.student is not None:
            img, txt = self.student.rows(sample)
            y = torch.from_numpy(np.where(is_text[:, None], txt, img))
            total = total + cfg.anchor_weight * _contrast(z, y)
        if cfg.consistency_weight > 0:
            for o in self.features:
                if o == t:
                    continue
                pos = self.where[o][sample]
                ok = (pos >= 0) & self.eligible[o][sample] & self.eligible[t][sample]
                if not ok.any():
                    continue
                o_rows = pos[ok] + is_text[ok] * len(self.index[o])
                order = np.argsort(o_rows)
                with torch.no_grad():  # the other teacher's projection is the target of this step, not moved by it
                    zo = F.normalize(model.encode(o, self.features[o][torch.from_numpy(o_rows[order])]), dim=-1)
                zt = z[torch.from_numpy(np.flatnonzero(ok)[order])]
                total = total + cfg.consistency_weight * _contrast(zt, zo)
        return total


# ---------------------------------------------------------------------------------------------- orthogonal maps


def procrustes(cross: torch.Tensor) -> torch.Tensor:
    """argmax_W trace(W^T cross) over [D, d] W with orthonormal columns (D >= d) or rows (D < d): the orthogonal
    Procrustes map for cross = X^T Y (X [N, D] onto Y [N, d]); semi-orthogonal when the dims differ."""
    u, _, vh = torch.linalg.svd(cross.double(), full_matrices=False)
    return (u @ vh).float()


ALL = "*"  # the map of a teacher's rows whatever their modality


class LinearMaps(nn.Module):
    """Fixed matrices per teacher (teacher dim -> student dim): one for each of its declared modalities and one
    for all its rows (`*`: a sample of another or an unknown modality). A projection is x @ W, L2-normalised. An
    orthogonal W keeps the teacher's own geometry within a modality: cosines between its image and text rows are
    unchanged when it is narrower than the student, and a best-aligned subspace is kept when it is wider."""

    def __init__(self, dims: dict[str, int], latent: int, method: str, groups: dict[str, list[str]] | None = None):
        super().__init__()
        self.dims, self.latent, self.method = dict(dims), latent, method
        self.groups = {t: sorted({ALL, *(groups or {}).get(t, [])}) for t in dims}
        self.weights = nn.ParameterDict({f"{t}@{g}": nn.Parameter(torch.zeros(d, latent), requires_grad=False)
                                         for t, d in dims.items() for g in self.groups[t]})

    def weight(self, teacher: str, group: str = ALL) -> torch.Tensor:
        return self.weights[f"{teacher}@{group}"]

    @torch.no_grad()
    def project(self, teacher: str, x: torch.Tensor, modality=None) -> torch.Tensor:
        """modality: [n] names (None: the `*` map for every row)."""
        x = x.float()
        if modality is None:
            return F.normalize(x @ self.weight(teacher), dim=-1)
        modality = np.asarray(modality).astype(str)
        out = torch.empty(len(x), self.latent)
        for m in np.unique(modality):
            sel = torch.from_numpy(np.flatnonzero(modality == m))
            out[sel] = x[sel] @ self.weight(teacher, m if m in self.groups[teacher] else ALL)
        return F.normalize(out, dim=-1)


def save_projector(model: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(folder / "projector.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    if isinstance(model, LinearMaps):
        meta = {"kind": "linear", "method": model.method, "dims": model.dims, "latent": model.latent,
                "groups": model.groups}
    else:
        meta = {"kind": "autoencoder", "dims": model.dims, "latent": model.latent, "hidden": model.hidden}
    atomic.write_json(folder / "projector.json", meta, sort_keys=True)


def load_projector(folder: Path) -> nn.Module:
    meta = json.loads((folder / "projector.json").read_text())
    if meta.get("kind") == "linear":
        model = LinearMaps(meta["dims"], meta["latent"], meta["method"], meta["groups"])
    else:
        model = MultiTeacherAutoencoder(meta["dims"], meta["latent"], meta["hidden"], dropout=0.0)
    model.load_state_dict(load_file(folder / "projector.safetensors"))
    return model.eval()


def fit_maps(source, student, modality: np.ndarray, domains: dict[str, list[str]], method: str, cfg: AlignCfg,
             chunk: int = 4096) -> LinearMaps:
    """Orthogonal maps of every teacher into the stage-1 student's space, fitted on the train pairs.

    source: the teachers' raw train features (features.reader.TeacherFeatures: `.names`, `.dims`, `.available`
    [N, T], `.batch(idx)`); student: its unit image and text embeddings of the same N pairs (an (image, text) pair
    of [N, d] arrays, or features.student.StudentRows read chunk by chunk); modality: [N] names.
    `procrustes`: one map per teacher, its raw image and text rows onto the student's (every row it has).
    `consensus`: the same maps and centring as `shared`, found teachers first (_consensus_maps).
    `shared`: one map per teacher and declared modality (and one `*` map over all of them), fitted on that
    modality's rows with each teacher's and the student's modality means removed first (per kind: image, text),
    so that the within-modality structure, which the modality cluster otherwise outweighs, is what is aligned.
    With `cfg.shrinkage` s > 0 a modality's cross-covariance is C_m + s * (n_m / n) * C_*: the map of a modality
    with few rows or weak structure leans toward the teacher's map over all its rows (s = 1: the two weigh alike).
    Then `cfg.iterations` refits onto a consensus: the student's centred row plus `cfg.consensus_weight` times
    each other teacher's current projection of the same row, for the teachers that declare the row's modality
    (generalised Procrustes anchored on the student). Streams over the rows in chunks of `chunk`: one pass for the
    means, one per refit; what is held is a chunk and the d x d cross-covariances, whatever N is.
    """
    from mmkd.features.student import as_rows

    student = as_rows(student)
    names, dims = list(source.names), dict(zip(source.names, source.dims))
    latent = int(student.dim)
    mods = np.asarray(modality).astype(str)
    kinds, mi = np.unique(mods, return_inverse=True)
    n = len(mods)
    avail = np.asarray(source.available, bool)
    if method == "procrustes":
        fit = {t: avail[:, j] for j, t in enumerate(names)}
        groups: dict[str, list[str]] = {t: [] for t in names}
    else:
        own = {t: avail[:, j] & np.isin(mods, domains.get(t, [])) for j, t in enumerate(names)}
        fit = {t: own[t] if own[t].any() else avail[:, j] for j, t in enumerate(names)}  # no own rows: all its rows
        groups = {t: sorted(set(mods[own[t]].tolist())) for t in names}
    # per row, the map of teacher t that projects it: its modality's, else t's `*` map
    key = {t: np.array([g if g in groups[t] else ALL for g in kinds], dtype=object)[mi] for t in names}
    chunks = [np.arange(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    mu = {t: np.zeros((len(kinds), 2, dims[t])) for t in names}
    nu = np.zeros((len(kinds), 2, latent))
    if method in ("shared", "consensus"):  # pass 1: the means (teachers: over their fitted rows; student: all rows)
        counts = {t: np.zeros(len(kinds)) for t in names}
        for sel in chunks:
            parts, mine = source.batch(sel), student.rows(sel)
            for t in names:
                ok = fit[t][sel]
                for k in (0, 1):
                    np.add.at(mu[t][:, k], mi[sel][ok], np.asarray(parts[t][k], np.float64)[ok])
                counts[t] += np.bincount(mi[sel][ok], minlength=len(kinds))
            for k in (0, 1):
                np.add.at(nu[:, k], mi[sel], np.asarray(mine[k], np.float64))
        mu = {t: mu[t] / np.maximum(counts[t], 1)[:, None, None] for t in names}
        nu /= np.bincount(mi, minlength=len(kinds))[:, None, None]  # every modality of `kinds` has rows
    if method == "consensus":
        return _consensus_maps(source, student, mi, kinds, key, fit, groups, mu, nu, dims, latent, chunks, cfg)
    weights: dict[tuple[str, str], np.ndarray] = {}
    for it in range(1 + (cfg.iterations if method == "shared" else 0)):
        cross = {(t, g): np.zeros((dims[t], latent)) for t in names for g in (ALL, *groups[t])}
        rows_of = {tg: 0 for tg in cross}
        for sel in chunks:
            parts, mine = source.batch(sel), student.rows(sel)
            for k in (0, 1):
                y = np.asarray(mine[k], np.float64) - nu[mi[sel], k]
                x = {t: np.asarray(parts[t][k], np.float64) - mu[t][mi[sel], k] for t in names}
                proj = {}
                if it and cfg.consensus_weight > 0:
                    for t in names:
                        proj[t] = np.zeros((len(sel), latent))
                        for g in set(key[t][sel]):
                            rows = key[t][sel] == g
                            proj[t][rows] = x[t][rows] @ weights[(t, g)]
                for t in names:
                    target, weight = y.copy(), np.ones(len(sel))
                    for o in proj:
                        if o != t:
                            ok = fit[o][sel]
                            target[ok] += cfg.consensus_weight * proj[o][ok]
                            weight[ok] += cfg.consensus_weight
                    ok = fit[t][sel]
                    part = x[t][ok].T @ (target[ok] / weight[ok, None])
                    cross[(t, ALL)] += part
                    rows_of[(t, ALL)] += int(ok.sum())
                    for g in groups[t]:
                        rows = ok & (key[t][sel] == g)
                        cross[(t, g)] += x[t][rows].T @ (target[rows] / weight[rows, None])
                        rows_of[(t, g)] += int(rows.sum())
        if cfg.shrinkage > 0:  # each modality's map pulled toward the teacher's `*` map, per row it was fitted on
            for t in names:
                for g in groups[t]:
                    share = rows_of[(t, g)] / max(1, rows_of[(t, ALL)])
                    cross[(t, g)] = cross[(t, g)] + cfg.shrinkage * share * cross[(t, ALL)]
        weights = {tg: procrustes(torch.from_numpy(c)).double().numpy() for tg, c in cross.items()}
    maps = LinearMaps(dims, latent, method, groups)
    for (t, g), w in weights.items():
        maps.weight(t, g).data.copy_(torch.from_numpy(w).float())
    return maps.eval()


def _complement(basis: np.ndarray) -> np.ndarray:
    """[d, d - k] orthonormal columns spanning what the [d, k] orthonormal `basis` leaves out."""
    u, _, _ = np.linalg.svd(basis, full_matrices=True)
    return u[:, basis.shape[1]:]


def _consensus_maps(source, student, mi, kinds, key, fit, groups, mu, nu, dims, latent, chunks, cfg) -> LinearMaps:
    """`consensus`: per modality, the declaring teachers' maps into one common space that maximises their agreement
    (sum over teacher pairs of trace(P_a^T C_ab P_b), C_ab the centred cross-covariance of their image rows: for two
    teachers the top singular vectors of C_ab, exactly; more are refined in turn by `cfg.iterations` Procrustes
    refits onto the others), then one rotation R of that whole space onto the stage-1 student (Procrustes of the
    summed P_t^T C_ts): W_t = P_t R. The rotation is shared, so it leaves the teachers' agreement as it was; the
    student only orients the space. A teacher wider than the common space (k < its dim) also maps its remaining
    directions best aligned with the student into the student dims the common space leaves, so that it keeps as
    much of its geometry as under `shared`: min(its dim, latent) orthonormal directions (not the same ones).
    A modality one teacher declares, and every `*` map: as `shared` before its refits. One pass over the rows
    (the pair and student cross-covariances); the rest is d x d algebra."""
    names = list(dims)
    cross = {(t, g): np.zeros((dims[t], latent)) for t in names for g in (ALL, *groups[t])}  # onto the student
    pair = {}  # (a, b, g) -> d_a x d_b, for teachers a before b that both declare g
    for g in sorted({g for t in names for g in groups[t]}):
        held = [t for t in names if g in groups[t]]
        pair.update({(a, b, g): np.zeros((dims[a], dims[b])) for i, a in enumerate(held) for b in held[i + 1:]})
    for sel in chunks:
        parts, mine = source.batch(sel), student.rows(sel)
        for k in (0, 1):
            y = np.asarray(mine[k], np.float64) - nu[mi[sel], k]
            x = {t: np.asarray(parts[t][k], np.float64) - mu[t][mi[sel], k] for t in names}
            for t in names:
                ok = fit[t][sel]
                cross[(t, ALL)] += x[t][ok].T @ y[ok]
                for g in groups[t]:
                    rows = ok & (key[t][sel] == g)
                    cross[(t, g)] += x[t][rows].T @ y[rows]
            # the common space is fitted on the image rows: a modality's captions are few templates, whose shared
            # variance otherwise takes the top directions (ultrasound: held-out image gap +0.32, not +0.56)
            for (a, b, g), c in (pair.items() if k == 0 else ()):
                rows = fit[a][sel] & fit[b][sel] & (key[a][sel] == g) & (key[b][sel] == g)
                c += x[a][rows].T @ x[b][rows]

    def polar(c: np.ndarray) -> np.ndarray:
        return procrustes(torch.from_numpy(c)).double().numpy()

    weights = {(t, ALL): polar(cross[(t, ALL)]) for t in names}
    for g in sorted({g for t in names for g in groups[t]}):
        held = [t for t in names if g in groups[t]]
        if len(held) == 1:
            weights[(held[0], g)] = polar(cross[(held[0], g)])
            continue

        def between(a: str, b: str) -> np.ndarray:  # C_ab whichever order it was summed in
            return pair[(a, b, g)] if (a, b, g) in pair else pair[(b, a, g)].T

        a, b = held[0], held[1]
        if not np.any(between(a, b)):  # no pair of theirs shares a row of g: nothing to agree on; as `shared` does
            weights.update({(t, g): polar(cross[(t, g)]) for t in held})
            continue
        u, _, vh = np.linalg.svd(between(a, b), full_matrices=False)
        k = min(latent, u.shape[1])
        common = {a: u[:, :k], b: vh[:k].T}  # d_t x k, orthonormal columns
        for _ in range(cfg.iterations if len(held) > 2 else 0):
            for t in held:  # each teacher onto the others' current common coordinates (Gauss-Seidel)
                others = [o for o in held if o != t and o in common]
                common[t] = polar(sum(between(t, o) @ common[o] for o in others))
        rotate = polar(sum(common[t].T @ cross[(t, g)] for t in held))  # k x latent, onto the student
        rest = _complement(rotate.T).T  # (latent - k) x latent: the student directions the common space leaves
        for t in held:
            weights[(t, g)] = common[t] @ rotate
            if len(rest) and dims[t] > k:  # a wider teacher keeps as many of its directions as before: its spare
                spare = _complement(common[t])  # ones, those best aligned with the student, fill the rest
                weights[(t, g)] = weights[(t, g)] + spare @ polar(spare.T @ cross[(t, g)] @ rest.T) @ rest
    maps = LinearMaps(dims, latent, "consensus", groups)
    for (t, g), w in weights.items():
        maps.weight(t, g).data.copy_(torch.from_numpy(w).float())
    return maps.eval()
