"""Owns the survival task: penalised Cox on pooled patient embeddings, Harrell's and Uno's C of out-of-fold risks."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv

from mmkd.evaluation.stats import Outcome
from mmkd.evaluation.tasks import BOOTSTRAP_SEED

L1_RATIO = 0.5  # elastic net: the L2 half keeps the fit finite when n ~ D, the L1 half drops noise dimensions
N_ALPHAS = 12
ALPHA_MIN_RATIOS = (0.05, 0.2, 0.5)  # path floors tried in turn: small penalties diverge on separable folds


def _fit_path(x: np.ndarray, y, alphas=None) -> CoxnetSurvivalAnalysis | None:
    """A Coxnet path from the largest useful penalty down; None when every floor diverges (ArithmeticError)."""
    for ratio in ALPHA_MIN_RATIOS:
        model = CoxnetSurvivalAnalysis(l1_ratio=L1_RATIO, n_alphas=N_ALPHAS, alpha_min_ratio=ratio,
                                       alphas=alphas, max_iter=20000)
        try:
            return model.fit(x, y)
        except ArithmeticError:
            if alphas is not None:  # an explicit grid cannot be raised: keep its larger half and retry
                alphas = alphas[: max(1, len(alphas) // 2)]
    return None


def _harrell(y, risk: np.ndarray) -> float:
    try:
        return float(concordance_index_censored(y["event"], y["time"], risk)[0])
    except ValueError:  # no comparable pair (no event in the fold)
        return float("nan")


def _uno(y_train, y_test, risk: np.ndarray) -> float:
    # IPCW weights come from the training fold's censoring distribution, defined only below its last time
    tau = min(float(y_train["time"].max()), float(y_test["time"].max()))
    try:
        return float(concordance_index_ipcw(y_train, y_test, risk, tau=tau)[0])
    except (ValueError, ZeroDivisionError):
        return float("nan")


def _choose_alpha(x: np.ndarray, y, alphas: np.ndarray, seed: int, inner: int) -> float:
    """The penalty with the best mean inner-fold Harrell's C (ties: the larger penalty, the simpler model)."""
    scores = np.full((inner, len(alphas)), np.nan)
    split = StratifiedKFold(inner, shuffle=True, random_state=seed).split(x, y["event"])
    for i, (tr, va) in enumerate(split):
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
        model = _fit_path((x[tr] - mu) / sd, y[tr], alphas)
        if model is None:
            continue
        for j, a in enumerate(model.alphas_):  # a shortened grid leaves the smallest penalties NaN
            scores[i, j] = _harrell(y[va], model.predict((x[va] - mu) / sd, alpha=a))
    mean = np.nanmean(np.where(np.isnan(scores).all(0), -np.inf, scores), axis=0)
    return float(alphas[int(np.argmax(mean))])


def survival(patient_emb: np.ndarray, time: np.ndarray, event: np.ndarray, seed: int, folds: int = 5,
             inner_folds: int = 3, outcomes: dict | None = None) -> dict:
    """Stratified (by event) K-fold Cox: each patient's risk is predicted by the fold that held it out (features
    standardised in-fold, the elastic-net penalty chosen by inner CV on the fold's training part). Harrell's C of
    these out-of-fold risks, with its CI from a bootstrap over patients (the C recomputed on every resample);
    Uno's C (IPCW, the cohort's censoring) of the same risks, without a CI (sksurv's IPCW costs ~4 ms a
    resample: 4 s a unit for a secondary metric). A fold whose fit diverges predicts risk 0 (its training
    mean: no information) for its patients; `cindex_folds` counts the folds that fitted, and with none the
    C-indices are NaN. outcomes: filled with cindex_harrell's Outcome (risk, time, event per patient)."""
    x = np.asarray(patient_emb, dtype=np.float64)
    y = Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, dtype=np.float64))
    risk, chosen = np.zeros(len(x)), []
    split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y["event"])
    for k, (tr, te) in enumerate(split):
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
        model = _fit_path((x[tr] - mu) / sd, y[tr])
        if model is None:
            continue
        alpha = _choose_alpha(x[tr], y[tr], model.alphas_, seed + k, inner_folds)
        risk[te] = model.predict((x[te] - mu) / sd, alpha=alpha)
        chosen.append(alpha)
    out: dict[str, float] = {"cindex_folds": len(chosen)}
    out["cindex_alpha"] = float(np.median(chosen)) if chosen else float("nan")
    if not chosen:
        return {**out, "cindex_harrell": float("nan"), "cindex_harrell_ci_low": float("nan"),
                "cindex_harrell_ci_high": float("nan"), "cindex_uno": float("nan")}
    c = Outcome("cindex", {"risk": risk[None], "time": y["time"], "event": y["event"]},
                design="patients (out-of-fold risk)")
    plan = c.plan(BOOTSTRAP_SEED)
    try:
        c.with_ci("cindex_harrell", plan, out)
    except ValueError:  # no comparable pair at all (no event)
        out.update({"cindex_harrell": float("nan"), "cindex_harrell_ci_low": float("nan"),
                    "cindex_harrell_ci_high": float("nan")})
    out["cindex_uno"] = _uno(y, y, risk)
    if outcomes is not None and np.isfinite(out["cindex_harrell"]):
        outcomes["cindex_harrell"] = c
    return out
