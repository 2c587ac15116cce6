"""Model tests of the maps into the student's space (the autoencoder's schedule and pulls, the orthogonal shared
maps) and of the shared-space diagnostic, on small cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmkd.config import AlignCfg
from mmkd.features import diagnostics
from mmkd.features.projector import Pull, fit_maps, procrustes, train_projector


class _Recording:
    """A feature source that records which teacher each batch came from."""

    def __init__(self, name: str, rows: torch.Tensor, log: list):
        self.name, self.rows, self.log = name, rows, log
        self.shape = rows.shape

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx):
        self.log.append(self.name)
        return self.rows[idx]


def test_projector_interleaves_teachers_within_an_epoch():
    log: list[str] = []
    gen = torch.Generator().manual_seed(0)
    feats = {t: _Recording(t, torch.randn(64, d, generator=gen), log) for t, d in (("a", 8), ("b", 12), ("c", 6))}
    train_projector(feats, 4, AlignCfg(hidden=16, epochs=1, batch_size=8), seed=0)
    assert sorted(log) == ["a"] * 8 + ["b"] * 8 + ["c"] * 8
    # teacher-by-teacher would switch teacher twice in an epoch; interleaved batches switch most of the time
    switches = sum(x != y for x, y in zip(log, log[1:]))
    assert switches >= 10, log


# ------------------------------------------------------------------------------------ the shared-space diagnostic



def _orth(d_in: int, d_out: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((max(d_in, d_out), max(d_in, d_out))))
    return q[:d_in, :d_out]


def test_derangement_moves_every_sample():
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 101):
        perm = diagnostics.derangement(n, rng)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()


def test_pair_agreement_on_cases_with_known_answers():
    rng = np.random.default_rng(0)
    n, d = 400, 256
    z = rng.standard_normal((n, d))
    # the same structure, each under its own large offset (a modality cluster): uncentred both look alike,
    # centred the same sample agrees perfectly and a shuffled one not at all
    same = diagnostics.pair_agreement(z + 20 * np.ones(d), z - 20 * np.ones(d), rng)
    assert same["same"] == pytest.approx(1.0) and abs(same["shuffled"]) < 0.05 and same["nn_rate"] == 1.0
    assert same["raw_shuffled"] < -0.9  # the offsets dominate the uncentred cosine
    # unrelated projections: the gap is zero and the nearest neighbour is itself at chance
    unrelated = diagnostics.pair_agreement(z, rng.standard_normal((n, d)), rng)
    assert abs(unrelated["gap"]) < 0.02 and unrelated["nn_rate"] < 0.02
    # b = z + noise of the same variance: the centred cosine is 1/sqrt(2) in high dimension
    half = diagnostics.pair_agreement(z, z + rng.standard_normal((n, d)), rng)
    assert half["same"] == pytest.approx(1 / np.sqrt(2), abs=0.02) and abs(half["shuffled"]) < 0.02
    assert half["nn_rate"] == 1.0  # in 256 dims the noise never beats the shared part
    with pytest.raises(ValueError, match="one shape"):
        diagnostics.pair_agreement(z, z[:, :3], rng)


def test_shared_space_pairs_only_teachers_that_share_a_modality():
    rng = np.random.default_rng(1)
    n = 60
    modality = np.array(["x"] * 30 + ["y"] * 30)
    z = rng.standard_normal((n, 16))
    images = {"a": z, "b": z + 0.1 * rng.standard_normal((n, 16)), "c": rng.standard_normal((n, 16))}
    available = {t: np.ones(n, bool) for t in images}
    available["c"][30:35] = False
    domains = {"a": ["x"], "b": ["x", "y"], "c": ["y"]}
    rows = diagnostics.shared_space(images, available, modality, domains, seed=0)
    assert [(r["modality"], r["pair"], r["n"]) for r in rows] == [("x", "a|b", 30), ("y", "b|c", 25)]
    assert rows[0]["gap"] > 0.9 and rows[0]["nn_rate"] == 1.0 and abs(rows[1]["gap"]) < 0.3
    assert rows == diagnostics.shared_space(images, available, modality, domains, seed=0)  # seeded
    summ = diagnostics.summary(rows)
    assert summ["pairs"] == 2 and summ["gap_min"] == rows[1]["gap"]
    metrics = diagnostics.metric_items(rows, "space")
    assert metrics["space.x.a__b.gap"] == rows[0]["gap"] and "space.gap_min" in metrics
    assert any("a|b" in line for line in diagnostics.format_rows(rows))


def test_procrustes_recovers_a_rotation_and_is_semi_orthogonal_across_dims():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 8))
    q = _orth(8, 8, rng)
    w = procrustes(torch.from_numpy(x.T @ (x @ q))).double().numpy()
    assert np.allclose(w, q, atol=1e-5)
    wide = procrustes(torch.from_numpy(rng.standard_normal((12, 8)))).double().numpy()  # teacher wider
    assert np.allclose(wide.T @ wide, np.eye(8), atol=1e-5)
    narrow = procrustes(torch.from_numpy(rng.standard_normal((6, 8)))).double().numpy()  # teacher narrower
    assert np.allclose(narrow @ narrow.T, np.eye(6), atol=1e-5)


class _Source:
    """TeacherFeatures' reading interface over in-memory arrays."""

    def __init__(self, feats: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.feats, self.names = feats, list(feats)
        self.dims = [a.shape[1] for a, _ in feats.values()]
        self.available = np.ones((len(next(iter(feats.values()))[0]), len(feats)), bool)

    def __len__(self) -> int:
        return len(self.available)

    def batch(self, idx):
        return {t: (a[idx].astype(np.float32), b[idx].astype(np.float32)) for t, (a, b) in self.feats.items()}


def _world(seed: int, n: int = 400):
    """Two modalities; a shared latent per pair, seen by the student and two teachers (each rotated into its own
    space, with its own modality offsets and noise); teacher `a` declares modality x, `b` both."""
    rng = np.random.default_rng(seed)
    modality = np.array(["x", "y"] * (n // 2))
    z_img = rng.standard_normal((n, 6))
    z_txt = z_img + 0.3 * rng.standard_normal((n, 6))

    def view(d, noise):
        rot, off = _orth(6, d, rng), {m: 3 * rng.standard_normal(d) for m in ("x", "y")}
        shift = np.stack([off[m] for m in modality])
        return tuple(z @ rot + shift + noise * rng.standard_normal((n, d)) for z in (z_img, z_txt))

    student = tuple(v / np.linalg.norm(v, axis=1, keepdims=True) for v in view(8, 1.0))
    return modality, student, {"a": view(10, 0.5), "b": view(7, 0.5)}


def test_shared_maps_align_teachers_beyond_plain_procrustes_and_keep_their_geometry():
    modality, student, feats = _world(0)
    domains = {"a": ["x"], "b": ["x", "y"]}
    source = _Source(feats)

    def gap(method):
        maps = fit_maps(source, student, modality, domains, method, AlignCfg(method=method))
        proj = {t: maps.project(t, torch.from_numpy(a), modality).numpy() for t, (a, _) in feats.items()}
        rows = diagnostics.shared_space(proj, {t: np.ones(len(modality), bool) for t in feats}, modality, domains, 0)
        return maps, rows[0]["gap"]

    shared, g_shared = gap("shared")
    plain, g_plain = gap("procrustes")
    # the modality offsets dominate the uncentred fit; the centred one aligns the shared latent
    assert g_shared > 0.5 and g_shared > g_plain + 0.1, (g_shared, g_plain)
    # one map per declared modality plus the `*` map; Procrustes: the `*` map alone
    assert shared.groups == {"a": ["*", "x"], "b": ["*", "x", "y"]} and plain.groups == {"a": ["*"], "b": ["*"]}
    # b (7 dims) is narrower than the student (8): its maps are isometries, its own cosines are unchanged
    for g in shared.groups["b"]:
        w = shared.weight("b", g).double().numpy()
        assert np.allclose(w @ w.T, np.eye(7), atol=1e-5)
    img, txt = (torch.from_numpy(v[:6]) for v in feats["b"])
    raw = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    pi, pt = shared.project("b", img, modality[:6]), shared.project("b", txt, modality[:6])
    same = torch.from_numpy(modality[:6, None] == modality[None, :6])
    assert torch.allclose((pi @ pt.T)[same], raw.float()[same], atol=1e-5)
    # a modality the teacher does not declare, or none given, goes through its `*` map
    a_img = torch.from_numpy(feats["a"][0][:6])
    star = torch.nn.functional.normalize(a_img.float() @ shared.weight("a"), dim=1)
    assert torch.allclose(shared.project("a", a_img, ["y"] * 6), star)
    assert torch.allclose(shared.project("a", a_img), star)


def test_consensus_maps_reach_the_teachers_own_agreement_whatever_the_student_sees():
    """`consensus`: the teachers' common space first (for two teachers the top singular vectors of their centred
    image cross-covariance, exactly), then one rotation onto the student. A student that sees none of the teachers'
    shared latent cannot pull their maps apart: their agreement is the direct two-teacher fit's, above `shared`'s."""
    modality, _, feats = _world(2)
    rng = np.random.default_rng(9)
    blind = tuple(v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.standard_normal((2, len(modality), 8)))
    domains = {"a": ["x"], "b": ["x", "y"]}
    everyone = {t: np.ones(len(modality), bool) for t in feats}

    def fitted(method, teachers=feats, doms=domains, **cfg):
        maps = fit_maps(_Source(teachers), blind, modality, doms, method, AlignCfg(method=method, **cfg))
        proj = {t: maps.project(t, torch.from_numpy(a), modality).numpy() for t, (a, _) in teachers.items()}
        return maps, diagnostics.shared_space(proj, {t: everyone["a"] for t in teachers}, modality, doms, 0)

    # a 7-dim view of teacher a: both teachers as wide as their common space, so the maps are exactly P_t R
    narrow = {**feats, "a": tuple(v @ _orth(10, 7, rng) for v in feats["a"])}
    _, rows = fitted("consensus", narrow)
    _, shared_rows = fitted("shared", narrow)
    x = modality == "x"
    a, b = (narrow[t][0][x] for t in ("a", "b"))
    u, _, vh = np.linalg.svd((a - a.mean(0)).T @ (b - b.mean(0)), full_matrices=False)
    unit = diagnostics._unit  # projected as the step projects: the raw rows mapped, then L2-normalised
    direct = diagnostics.pair_agreement(unit(a @ u), unit(b @ vh.T), np.random.default_rng(0))["same"]
    assert rows[0]["same"] == pytest.approx(direct, abs=1e-5) and direct > 0.5, (rows[0]["same"], direct)
    assert rows[0]["gap"] > shared_rows[0]["gap"] + 0.1, (rows[0]["gap"], shared_rows[0]["gap"])
    # with the 10-dim teacher a the common space of x is 7-dim (b's width): a's spare directions fill the student's
    # eighth, so a keeps 8 orthonormal directions, as under `shared`; b (7 < 8) is mapped isometrically
    consensus, wide = fitted("consensus")
    wa = consensus.weight("a", "x").double().numpy()
    assert np.allclose(wa.T @ wa, np.eye(8), atol=1e-5)
    for g in consensus.groups["b"]:
        w = consensus.weight("b", g).double().numpy()
        assert np.allclose(w @ w.T, np.eye(7), atol=1e-5)
    assert wide[0]["gap"] > fitted("shared")[1][0]["gap"] + 0.1

    # two teachers with no row of x in common (disjoint coverage): each is mapped onto the student alone
    apart = _Source(feats)
    half = np.arange(len(modality)) % 4 < 2  # a has the even x rows' pairs, b the others
    apart.available = np.stack([half | (modality == "y"), ~half], axis=1)
    split = fit_maps(apart, blind, modality, domains, "consensus", AlignCfg(method="consensus"))
    alone = fit_maps(apart, blind, modality, domains, "shared", AlignCfg(method="shared"))  # no consensus possible
    for t in ("a", "b"):
        assert torch.allclose(split.weight(t, "x"), alone.weight(t, "x"), atol=1e-5)

    # three teachers declaring x: refined in turn, each pair agrees at least as well as under `shared`
    trio = {**feats, "c": (feats["a"][0] @ _orth(10, 9, rng) + 0.3 * rng.standard_normal((len(modality), 9)),
                           feats["a"][1] @ _orth(10, 9, rng))}
    doms3 = {**domains, "c": ["x"]}
    _, rows3 = fitted("consensus", trio, doms3)
    _, shared3 = fitted("shared", trio, doms3)
    gaps = {r["pair"]: r["gap"] for r in rows3 if r["modality"] == "x"}
    assert len(gaps) == 3 and all(gaps[r["pair"]] >= r["gap"] - 1e-6 for r in shared3 if r["modality"] == "x")


def test_shrinkage_leans_each_modality_map_toward_the_teachers_map_over_all_its_rows():
    modality, student, feats = _world(1, n=200)
    domains = {"a": ["x"], "b": ["x", "y"]}

    def maps(s):
        return fit_maps(_Source(feats), student, modality, domains, "shared", AlignCfg(shrinkage=s, iterations=1))

    def dist(m, g):
        return float((m.weight("b", g) - m.weight("b", "*")).norm())

    free, some, full = maps(0.0), maps(1.0), maps(1e6)
    assert torch.equal(free.weight("b", "x"), maps(0.0).weight("b", "x"))  # deterministic; 0 is the old fit
    assert dist(free, "x") > 0.1 and dist(free, "y") > 0.1  # each modality has a map of its own
    assert dist(full, "x") < 1e-3 and dist(full, "y") < 1e-3  # overwhelming shrinkage: the `*` map everywhere
    assert dist(full, "x") < dist(some, "x") < dist(free, "x")
    assert dist(full, "y") < dist(some, "y") < dist(free, "y")


def test_linear_maps_save_and_load(tmp_path):
    from mmkd.features.projector import load_projector, save_projector

    modality, student, feats = _world(3, n=100)
    maps = fit_maps(_Source(feats), student, modality, {"a": ["x"], "b": ["x", "y"]}, "shared", AlignCfg())
    save_projector(maps, tmp_path)
    again = load_projector(tmp_path)
    x = torch.from_numpy(feats["b"][0])
    assert torch.equal(again.project("b", x, modality), maps.project("b", x, modality))


def test_autoencoder_pulls_bring_teachers_together():
    modality, student, feats = _world(1, n=200)
    domains = {"a": ["x"], "b": ["x", "y"]}
    both = torch.from_numpy(np.concatenate(student)).float()
    rows = {t: torch.from_numpy(np.concatenate(v)).float() for t, v in feats.items()}
    index = {t: np.arange(len(modality)) for t in feats}
    eligible = {t: np.isin(modality, domains[t]) for t in feats}

    def gap(**weights):
        cfg = AlignCfg(method="autoencoder", hidden=32, epochs=6, batch_size=50, dropout=0.0, **weights)
        model, _ = train_projector(rows, 8, cfg, seed=0, pull=Pull(rows, index, both, eligible))
        proj = {t: model.project(t, torch.from_numpy(a).float()).numpy() for t, (a, _) in feats.items()}
        return diagnostics.shared_space(proj, {t: np.ones(len(modality), bool) for t in feats}, modality,
                                        domains, 0)[0]["gap"]

    plain, pulled = gap(), gap(anchor_weight=1.0, consistency_weight=1.0)
    assert pulled > plain + 0.1, (plain, pulled)
