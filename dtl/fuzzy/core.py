"""A Mamdani fuzzy inference system on the features of a double-transfer model (pure numpy).

``features -> standardise -> PCA to k dims (fitted on train only) -> fuzzy c-means
(scikit-fuzzy's ``cmeans``) -> one Gaussian membership function per (cluster, dimension),
centred on the cluster centre with the cluster's fuzzy spread -> one rule per cluster:``

    IF z1 is A_1j AND ... AND zk is A_kj THEN class_c is HIGH (weight w_jc) AND class_c is LOW (weight 1 - w_jc)

for every class ``c``, where ``w_jc`` is the class-balanced fuzzy co-occurrence of cluster
``j`` and class ``c`` on train. AND is the min or product t-norm; each rule's activation
clips the consequent term (Mamdani min implication); rules are aggregated with max; each
class output is defuzzified by its centroid over a discretised universe [0, 1]. The class
with the highest crisp output wins; ``probabilities`` are the crisp outputs normalised to
sum to 1. The **firing strength** (the strongest rule activation) says how well the
training clusters cover an input: low firing = "unknown", the abstention signal.

Everything is vectorised over a batch; :func:`control_system` builds the same system with
``skfuzzy.control`` (one sample at a time) as the reference implementation.
"""

from __future__ import annotations

import numpy as np
import skfuzzy as fuzz

from dtl.model.fuzzy import COVER, TNORMS, UNIVERSE_POINTS, FuzzySystem, output_terms

SIGMA_FLOOR = 0.05  # in units of the first component's std: a cluster never collapses to a spike


def fuzzy_spreads(z: np.ndarray, centres: np.ndarray, u: np.ndarray, m: float, cover: float = COVER) -> np.ndarray:
    """Per-cluster, per-dimension Gaussian sigma: the fuzzy standard deviation
    sqrt(sum u^m (z - v)^2 / sum u^m), widened where needed so that every train point has
    membership >= ``cover`` in every dimension of the cluster it belongs to most (so no train
    point falls outside the rule base), and never below ``SIGMA_FLOOR``."""
    um = u ** m  # (J, n)
    dev = np.abs(z[None] - centres[:, None, :])  # (J, n, k)
    var = (um[:, :, None] * dev ** 2).sum(1) / um.sum(1, keepdims=True)
    own = u.argmax(0)  # each point's cluster
    reach = np.zeros_like(centres)
    np.maximum.at(reach, own, dev[own, np.arange(len(own))])  # farthest own point per (cluster, dim)
    # gaussmf(v + d) >= cover  <=>  sigma >= d / sqrt(2 ln(1/cover))
    return np.maximum.reduce([np.sqrt(var), reach / np.sqrt(2 * np.log(1 / cover)), np.full_like(var, SIGMA_FLOOR)])


def consequents(u: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """(J, C) weight of "class c is HIGH" in rule j: the cluster's membership mass per class,
    divided by the class size (so a large class does not own every cluster), normalised per
    cluster so that its dominant class gets 1."""
    onehot = np.eye(n_classes)[y]  # (n, C)
    counts = np.maximum(onehot.sum(0), 1)
    mass = (u @ onehot) / counts  # (J, C)
    return mass / np.maximum(mass.max(1, keepdims=True), 1e-12)


def fit(features: np.ndarray, y: np.ndarray, classes: list[str], k: int, n_clusters: int, m: float = 2.0,
        tnorm: str = "min", seed: int = 0, n_points: int = UNIVERSE_POINTS) -> FuzzySystem:
    """Fit projection, clusters, membership functions and consequents on training features."""
    if tnorm not in TNORMS:
        raise ValueError(f"tnorm={tnorm!r}; valid: {', '.join(TNORMS)}")
    x = np.asarray(features, dtype=np.float64)
    k = int(min(k, x.shape[1], len(x) - 1))
    mean = x.mean(0)
    std = np.maximum(x.std(0), 1e-6)
    # PCA by SVD of the standardised train matrix, scaled so that the first component has unit
    # variance. Not whitened: whitening would blow the minor (mostly noise) components up to the
    # size of the class-separating ones and c-means would cluster the noise.
    _, s, vt = np.linalg.svd((x - mean) / std, full_matrices=False)
    scale = max(s[0] / np.sqrt(max(len(x) - 1, 1)), 1e-6)
    projection = (vt[:k].T / std[:, None]) / scale
    z = (x - mean) @ projection
    centres, u, *_ = fuzz.cluster.cmeans(z.T, int(n_clusters), float(m), error=1e-5, maxiter=300, seed=seed)
    return FuzzySystem(list(classes), mean, projection, centres, fuzzy_spreads(z, centres, u, m),
                       consequents(u, np.asarray(y), len(classes)), tnorm, float(m), n_points)


# ----------------------------------------------------------------------------- abstention

def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and selective risk (error rate of the kept items) when keeping the most
    confident items first; ties broken stably by input order."""
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    errors = 1.0 - np.asarray(correct, dtype=np.float64)[order]
    kept = np.arange(1, len(order) + 1)
    return kept / len(order), np.cumsum(errors) / kept


def selective_accuracy(correct: np.ndarray, confidence: np.ndarray, coverage: float) -> float:
    """Accuracy on the ``coverage`` share of items with the highest confidence."""
    cov, risk = risk_coverage(correct, confidence)
    i = max(int(np.ceil(coverage * len(cov))) - 1, 0)
    return float(1.0 - risk[i])


def abstention_metrics(correct: np.ndarray, confidence: np.ndarray, prefix: str) -> dict[str, float]:
    """AUROC of the signal for detecting errors (low confidence = error), area under the
    risk-coverage curve, and selective accuracy at 90/80/50% coverage."""
    from sklearn.metrics import roc_auc_score  # deferred: scikit-learn, only for these metrics

    correct = np.asarray(correct, dtype=bool)
    cov, risk = risk_coverage(correct, confidence)
    out = {f"{prefix}_aurc": float(risk.mean())}
    out[f"{prefix}_abstain_auroc"] = (float(roc_auc_score(~correct, -np.asarray(confidence)))
                                      if 0 < correct.sum() < len(correct) else float("nan"))
    for c in (0.9, 0.8, 0.5):
        out[f"{prefix}_selective_accuracy_{int(c * 100)}"] = selective_accuracy(correct, confidence, c)
    return out


# ----------------------------------------------------------------------------- reference

def control_system(fs: FuzzySystem, margin: float = 4.0, points: int = 801):
    """The same rule base as a ``skfuzzy.control`` simulation (one sample per ``compute``).

    Inputs are fuzzified on a sampled universe (``points`` over the centres ± ``margin``
    sigmas) and skfuzzy refines the output universe at the clipping points, so its outputs
    match :meth:`FuzzySystem.infer` up to discretisation."""
    from skfuzzy import control as ctrl  # deferred: scikit-fuzzy, only for the fuzzy head

    lo = (fs.centres - margin * fs.sigmas).min(0)
    hi = (fs.centres + margin * fs.sigmas).max(0)
    ants = []
    for d in range(fs.centres.shape[1]):
        a = ctrl.Antecedent(np.linspace(lo[d], hi[d], points), f"z{d + 1}")
        for j in range(len(fs.centres)):
            a[f"A{j + 1}"] = fuzz.gaussmf(a.universe, fs.centres[j, d], fs.sigmas[j, d])
        ants.append(a)
    cons = []
    for c in fs.classes:
        out = ctrl.Consequent(fs.universe, f"class_{c}", defuzzify_method="centroid")
        out["LOW"], out["HIGH"] = output_terms(out.universe)
        cons.append(out)
    and_func = np.fmin if fs.tnorm == "min" else np.multiply
    rules = []
    for j in range(len(fs.centres)):
        ante = ants[0][f"A{j + 1}"]
        for a in ants[1:]:
            ante = ante & a[f"A{j + 1}"]
        terms = [t for i, out in enumerate(cons)
                 for t in (out["HIGH"] % float(fs.weights[j, i]), out["LOW"] % float(1.0 - fs.weights[j, i]))]
        rules.append(ctrl.Rule(ante, terms, label=f"R{j + 1}", and_func=and_func))
    return ctrl.ControlSystemSimulation(ctrl.ControlSystem(rules))


def control_infer(sim, fs: FuzzySystem, z: np.ndarray) -> np.ndarray:
    """Crisp class outputs (n, C) from the skfuzzy simulation, one sample at a time."""
    out = np.zeros((len(z), len(fs.classes)))
    for i, row in enumerate(z):
        for d, v in enumerate(row):
            sim.input[f"z{d + 1}"] = float(v)
        sim.compute()
        out[i] = [sim.output.get(f"class_{c}", 0.0) for c in fs.classes]
    return out
