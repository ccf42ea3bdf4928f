"""Evaluation of generated configurations against held-out Monte Carlo, condition by condition.

Generation here is the task: for a condition y = (gamma, T) the model should draw
configurations from the Boltzmann distribution, so every held-out Monte Carlo row of
that condition is one more sample of the same target, and the draws for all its rows are
pooled. Per condition (`condition_metrics`):

- energy per particle U / N (Lennard-Jones plus gravity): means of generated and Monte
  Carlo configurations, their difference, and the Wasserstein-1 distance between the two
  distributions (`scipy.stats.wasserstein_distance`); the Lennard-Jones part alone too;
- the mean height and the density profile rho(h) along the gravity axis, with the
  relative error of the profile in the bins where the Monte Carlo profile exceeds a
  tenth of its maximum (and the statistical noise of that comparison);
- the pair-distance distribution: Wasserstein-1 distance and g(r) (the pair-distance
  density over that of independent uniform points in the same box);
- the fractions of generated configurations with an overlapping pair (r < 0.8 sigma),
  with a particle outside the box, and (canonical order) not sorted by height;
- Boltzmann reweighting of the draws (models with a density): log w = -U / T - log q,
  w = 0 for draws outside the box or, with the canonical order, outside the ordered
  chamber, where the target density vanishes (`flowrecon.systems.lj.geometry` explains
  the N! factor, which cancels in self-normalised weights). Reported: the effective
  sample size (sum w)^2 / sum w^2, as a count and a fraction of the draws, and the
  reweighted mean energy per particle with its delta-method standard error;
- the negative log-likelihood of the held-out configurations, per ordered configuration
  and per labelled one (plus log N!).

The per-event error of the System (`height_rmse`) is the RMS difference between the
sorted particle heights of a held-out configuration and those of the model's mean
prediction for its condition: a configuration-by-configuration coordinate error is
meaningless for a generative task, while the expected sorted heights are what gravity
shapes. It has a thermal floor, the same quantity for Monte Carlo itself
(``height_rmse_floor`` per condition), which a perfect model reaches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowrecon.system import EvaluationContext, MetricInfo
from flowrecon.systems.lj.geometry import canonical_order, in_canonical_order, log_permutations
from flowrecon.systems.lj.latent import ANOMALY_NOISE, anomaly_metrics, latent_metrics
from flowrecon.systems.lj.physics import (
    as_configurations,
    density_profile,
    heights,
    ideal_pair_distances,
    lj_energy,
    min_pair_distance,
    outside_box,
    pair_distances,
    potential_energy,
)
from flowrecon.systems.lj.sampler import relax

__all__ = [
    "LJEvaluator",
    "METRIC_INFO",
    "condition_metrics",
    "height_rmse",
    "reweight",
    "reweighting_metrics",
]

#: Pair distance below which two particles overlap (sigma).
OVERLAP_DISTANCE = 0.8

#: Fewest effective samples for which a reweighted mean and its error are reported.
MIN_ESS = 10.0

#: Units and meanings of the summary metrics (worst condition) and per-condition keys.
METRIC_INFO: dict[str, MetricInfo] = {
    "height_rmse": MetricInfo(
        "sigma",
        "RMS difference of the sorted particle heights of a held-out configuration and of "
        "the model's mean prediction for its condition (thermal floor: height_rmse_floor)",
    ),
    "energy_diff_max": MetricInfo(
        "epsilon", "largest |mean U/N generated - Monte Carlo| over the conditions"
    ),
    "energy_w1_max": MetricInfo(
        "epsilon", "largest Wasserstein-1 distance of the U/N distributions over the conditions"
    ),
    "height_rel_error_max": MetricInfo(
        "", "largest relative error of the mean height over the conditions"
    ),
    "density_rel_error_max": MetricInfo(
        "",
        "largest relative error of the density profile rho(h), over the bins above a "
        "tenth of the Monte Carlo maximum and over the conditions",
    ),
    "pair_w1_max": MetricInfo(
        "sigma", "largest Wasserstein-1 distance of the pair-distance distributions"
    ),
    "overlap_fraction_max": MetricInfo(
        "", "largest fraction of generated configurations with a pair closer than 0.8 sigma"
    ),
    "outside_fraction_max": MetricInfo(
        "", "largest fraction of generated configurations with a particle outside the box"
    ),
    "ess_fraction_min": MetricInfo(
        "", "smallest Boltzmann-reweighting effective sample size over the draws"
    ),
    "reweighted_z_max": MetricInfo(
        "",
        "largest |reweighted mean U/N - Monte Carlo| in combined standard errors over the "
        "conditions",
    ),
    "nll_labelled": MetricInfo(
        "nats", "negative log-likelihood per labelled configuration (ordered NLL + log N!)"
    ),
    "latent_silhouette": MetricInfo(
        "",
        "silhouette score of the gamma labels in the encoder's latent means (near 0: the "
        "latent does not encode gamma, as a conditional model's need not)",
    ),
    "latent_silhouette_2pc": MetricInfo(
        "", "the same silhouette in the first two principal components of the latent means"
    ),
    "anomaly_auc": MetricInfo(
        "",
        "ROC AUC of the model's anomaly score (-log p, or the cVAE's negative ELBO) between "
        "held-out and perturbed configurations (1: separated, 0.5: not)",
    ),
    "anomaly_auc_energy": MetricInfo(
        "", "the same AUC for the exact Boltzmann score U/T: the physics reference"
    ),
}


def height_rmse(pred: np.ndarray, truth: np.ndarray, dim: int) -> np.ndarray:
    """RMS difference of sorted heights, ``(B,)``: the system's per-event error.

    Example:
        >>> height_rmse(np.array([[0.0, 1.0, 0.0, 3.0]]), np.array([[5.0, 3.0, 5.0, 1.0]]), 2)
        array([0.])
    """
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    hp = np.sort(p.reshape(*p.shape[:-1], -1, dim)[..., -1], -1)
    ht = np.sort(t.reshape(*t.shape[:-1], -1, dim)[..., -1], -1)
    return np.sqrt(((hp - ht) ** 2).mean(-1))


def reweight(log_w: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """Self-normalised importance weights: ESS and the reweighted mean of ``values``.

    ``log_w`` may hold -inf (weight zero). The standard error of the weighted mean is
    the delta-method one, sqrt(sum w^2 (v - mean)^2) / sum w.

    Example:
        >>> out = reweight(np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]))
        >>> out["ess"], out["mean"]
        (4.0, 2.5)
    """
    lw = np.asarray(log_w, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(lw)
    if not finite.any():
        return {"ess": 0.0, "ess_fraction": 0.0, "mean": math.nan, "se": math.nan}
    w = np.where(finite, np.exp(lw - lw[finite].max()), 0.0)
    total = w.sum()
    mean = float((w * v).sum() / total)
    se = float(np.sqrt((w**2 * (v - mean) ** 2).sum()) / total)
    ess = float(total**2 / (w**2).sum())
    return {"ess": ess, "ess_fraction": ess / lw.size, "mean": mean, "se": se}


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return math.nan
    return float(wasserstein_distance(a, b))


def _profile_error(
    gen: np.ndarray, mc: np.ndarray, box: float, bins: int
) -> tuple[float, float, float, np.ndarray, np.ndarray, np.ndarray]:
    """Relative error of rho(h) where the Monte Carlo profile exceeds max / 10."""
    centres, rho_mc = density_profile(mc, box, bins)
    _, rho_gen = density_profile(gen, box, bins)
    keep = rho_mc > 0.1 * rho_mc.max()
    rel = np.abs(rho_gen - rho_mc)[keep] / rho_mc[keep]
    # Poisson noise of the comparison (counts of particles per bin; particles of one
    # configuration are correlated, so this is a lower bound of the noise).
    n_mc = rho_mc * mc.shape[0] * (box / bins) * box ** (mc.shape[-1] - 1)
    n_gen = rho_gen * gen.shape[0] * (box / bins) * box ** (gen.shape[-1] - 1)
    with np.errstate(divide="ignore"):
        noise = np.sqrt(1 / n_mc[keep] + 1 / np.maximum(n_gen[keep], 1))
    return float(rel.max()), float(rel.mean()), float(noise.max()), centres, rho_mc, rho_gen


def condition_metrics(
    gen: np.ndarray,
    mc: np.ndarray,
    gamma: float,
    temperature: float,
    box: float,
    *,
    bins: int = 20,
    overlap: float = OVERLAP_DISTANCE,
    nll: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of generated configurations ``gen`` against Monte Carlo ones ``mc``.

    Both are ``(n, N, D)``; ``nll`` is the mean NLL of the Monte Carlo rows (ordered
    configurations). Returns the JSON metrics and the curves for figures.
    """
    n_particles = mc.shape[-2]
    u_gen = potential_energy(gen, gamma) / n_particles
    u_mc = potential_energy(mc, gamma) / n_particles
    lj_gen, lj_mc = lj_energy(gen) / n_particles, lj_energy(mc) / n_particles
    h_gen, h_mc = heights(gen).mean(-1), heights(mc).mean(-1)
    inside = ~outside_box(gen, box)
    rel_max, rel_mean, noise, centres, rho_mc, rho_gen = _profile_error(gen, mc, box, bins)
    mean_h = np.sort(heights(mc), -1).mean(0)
    floor = np.sqrt(((np.sort(heights(mc), -1) - mean_h) ** 2).mean(-1)).mean()
    row: dict[str, Any] = {
        "gamma": gamma,
        "temperature": temperature,
        "n_mc": int(mc.shape[0]),
        "n_generated": int(gen.shape[0]),
        "energy_mc": float(np.mean(u_mc)),
        "energy_mc_se": float(np.std(u_mc, ddof=1) / math.sqrt(max(len(u_mc), 1))),
        "energy_gen": _finite_mean(u_gen),
        "energy_diff": _finite_mean(u_gen) - float(np.mean(u_mc)),
        "energy_w1": _w1(u_gen, u_mc),
        "lj_mc": float(np.mean(lj_mc)),
        "lj_gen": _finite_mean(lj_gen),
        "height_mc": float(h_mc.mean()),
        "height_gen": float(h_gen.mean()),
        "height_rel_error": float(abs(h_gen.mean() - h_mc.mean()) / abs(h_mc.mean())),
        "density_rel_error_max": rel_max,
        "density_rel_error_mean": rel_mean,
        "density_noise": noise,
        "pair_w1": _w1(pair_distances(gen), pair_distances(mc)),
        "overlap_fraction": float((min_pair_distance(gen) < overlap).mean()),
        "overlap_fraction_mc": float((min_pair_distance(mc) < overlap).mean()),
        "outside_fraction": float((~inside).mean()),
        "unordered_fraction": float((~in_canonical_order(gen)).mean()),
        "height_rmse_floor": float(floor),
        "nll": nll,
        "nll_labelled": None if nll is None else nll + log_permutations(n_particles),
    }
    curves = {
        "u_gen": u_gen,
        "u_mc": u_mc,
        "centres": centres,
        "rho_mc": rho_mc,
        "rho_gen": rho_gen,
        "r_gen": pair_distances(gen[:2000]).reshape(-1),
        "r_mc": pair_distances(mc[:2000]).reshape(-1),
    }
    return row, curves


def reweighting_metrics(
    gen: np.ndarray,
    log_q: np.ndarray,
    gamma: float,
    temperature: float,
    box: float,
    energy_mc: float,
    energy_mc_se: float,
    *,
    ordered: bool = True,
    min_ess: float = MIN_ESS,
) -> dict[str, Any]:
    """Boltzmann reweighting of draws ``gen`` ``(n, N, D)`` with model log-density log_q.

    log w = -U / T - log q, and w = 0 outside the box or (``ordered``) outside the
    chamber of height-sorted configurations. The reweighted mean U/N is compared with
    the Monte Carlo mean in combined standard errors (``reweighted_z``). Below
    ``min_ess`` effective samples the weighted mean and its delta-method error mean
    nothing (a single dominant weight gives an error of zero), so the error and z are
    reported as NaN.
    """
    n_particles = gen.shape[-2]
    u = potential_energy(gen, gamma)
    valid = ~outside_box(gen, box) & np.isfinite(u) & np.isfinite(log_q)
    if ordered:
        valid &= in_canonical_order(gen)
    log_w = np.full(len(gen), -np.inf)
    log_w[valid] = -u[valid] / temperature - np.asarray(log_q)[valid]
    rw = reweight(log_w, np.where(valid, u / n_particles, 0.0))
    if rw["ess"] < min_ess:
        rw["se"] = math.nan
    z = (rw["mean"] - energy_mc) / math.hypot(rw["se"], energy_mc_se)
    return {
        "ess": rw["ess"],
        "ess_fraction": rw["ess_fraction"],
        "reweighted_energy": rw["mean"],
        "reweighted_energy_se": rw["se"],
        "reweighted_z": float(z),
        "reweighted_draws": int(len(gen)),
    }


def _finite_mean(a: np.ndarray) -> float:
    a = np.asarray(a)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else math.nan


def _condition_keys(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique conditions (rounded to 1e-9) and each row's index into them."""
    rounded = np.round(np.asarray(y, dtype=np.float64), 9)
    return np.unique(rounded, axis=0, return_inverse=True)


class LJEvaluator:
    """The `flowrecon.system.Evaluator` of the Lennard-Jones system.

    Draws of all rows of one condition are pooled (up to ``max_per_condition``) and
    compared with that condition's held-out Monte Carlo configurations in `finish`.

    Args:
        context: The `EvaluationContext` (model, held-out x and y, samples per row).
        n_particles, box, dim: The system.
        ordered: Whether x is in canonical (height) order, so that draws outside the
            ordered chamber get zero Boltzmann weight.
        max_per_condition: Generated configurations kept per condition.
        reweight_samples: Draws per condition whose density is evaluated for reweighting.
        bins: Bins of the density profile.
        overlap: Overlap distance (sigma).
        relax_sweeps: If positive, the pooled draws first run this many Metropolis
            sweeps at their condition (`flowrecon.systems.lj.sampler.relax`), and the
            metrics judge "generator + short Monte Carlo"; Boltzmann reweighting is then
            skipped (it needs the density of the draws themselves).
        latent_rows: Held-out configurations whose latent means are mapped (models with
            an encoder, `flowrecon.systems.lj.latent`); 0 skips the map.
        anomaly_rows: Held-out configurations scored against perturbed copies of
            themselves (models with a density or an ELBO); 0 skips it.
        anomaly_noise: Displacement of the perturbed copies (sigma per coordinate).
    """

    def __init__(
        self,
        context: EvaluationContext,
        *,
        n_particles: int,
        box: float,
        dim: int,
        ordered: bool = True,
        max_per_condition: int = 20_000,
        reweight_samples: int = 5_000,
        bins: int = 20,
        overlap: float = OVERLAP_DISTANCE,
        relax_sweeps: int = 0,
        latent_rows: int = 3000,
        anomaly_rows: int = 2000,
        anomaly_noise: float = ANOMALY_NOISE,
    ) -> None:
        if max_per_condition < 1 or reweight_samples < 0 or bins < 2 or overlap <= 0:
            raise ValueError(
                "max_per_condition >= 1, reweight_samples >= 0, bins >= 2 and overlap > 0 "
                f"are required, got {max_per_condition}, {reweight_samples}, {bins}, {overlap}"
            )
        if relax_sweeps < 0 or latent_rows < 0 or anomaly_rows < 0:
            raise ValueError(
                "relax_sweeps, latent_rows and anomaly_rows must be >= 0, got "
                f"{relax_sweeps}, {latent_rows} and {anomaly_rows}"
            )
        if not (math.isfinite(anomaly_noise) and anomaly_noise > 0):
            raise ValueError(f"anomaly_noise must be > 0 (sigma), got {anomaly_noise}")
        self.latent_rows, self.anomaly_rows = int(latent_rows), int(anomaly_rows)
        self.anomaly_noise = float(anomaly_noise)
        self.latent_map: dict[str, np.ndarray] | None = None
        self.relax_sweeps = int(relax_sweeps)
        self.context = context
        self.n_particles, self.box, self.dim, self.ordered = n_particles, box, dim, ordered
        self.max_per_condition, self.reweight_samples = max_per_condition, reweight_samples
        self.bins, self.overlap = bins, overlap
        y = np.asarray(context.y, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != 2:
            raise ValueError(f"the conditions y must be (rows, 2) = (gamma, T), got {y.shape}")
        self.conditions, self.index = _condition_keys(y)
        self.x = as_configurations(np.asarray(context.x), n_particles, dim)
        self.generated: list[list[np.ndarray]] = [[] for _ in self.conditions]
        self.kept = np.zeros(len(self.conditions), dtype=int)
        self.rows: list[dict[str, Any]] = []
        self.curves: list[dict[str, Any]] = []
        self.pooled: list[np.ndarray] = []

    def update(self, start: int, stop: int, samples: np.ndarray) -> None:
        """Pools the draws ``(n, stop - start, Dx)`` of rows start:stop by condition."""
        s = np.asarray(samples, dtype=np.float64)
        idx = self.index[start:stop]
        for c in np.unique(idx):
            room = self.max_per_condition - self.kept[c]
            if room <= 0:
                continue
            draws = s[:, idx == c].reshape(-1, s.shape[-1])[:room]
            self.generated[c].append(as_configurations(draws, self.n_particles, self.dim))
            self.kept[c] += len(draws)

    def _log_q(self, gen: np.ndarray, cond: np.ndarray) -> np.ndarray | None:
        model = self.context.model
        if not getattr(model, "has_density", False) or self.reweight_samples == 0:
            return None
        flat = gen.reshape(len(gen), -1)
        return np.asarray(model.log_prob(flat, np.broadcast_to(cond, (len(flat), 2))))

    def _nll(self, c: int) -> float | None:
        model = self.context.model
        if not getattr(model, "has_density", False):
            return None
        rows = self.x[self.index == c]
        flat = rows.reshape(len(rows), -1)
        lp = model.log_prob(flat, np.broadcast_to(self.conditions[c], (len(flat), 2)))
        return float(-np.mean(lp))

    def finish(self, posterior_mean: np.ndarray) -> dict[str, Any]:
        """Per-condition metrics and the worst condition's summary (plain JSON)."""
        self.rows, self.curves, self.pooled = [], [], []
        for c, (gamma, temp) in enumerate(self.conditions):
            mc = self.x[self.index == c]
            if not self.generated[c]:
                continue
            gen = np.concatenate(self.generated[c])
            relaxed = None
            if self.relax_sweeps:
                gen, acceptance = relax(
                    gen,
                    gamma,
                    temp,
                    sweeps=self.relax_sweeps,
                    box=self.box,
                    seed=self.context.seed,
                )
                if self.ordered:
                    gen = canonical_order(gen)
                relaxed = {"relax_sweeps": self.relax_sweeps, "relax_acceptance": acceptance}
            self.pooled.append(gen)
            sub = gen[: self.reweight_samples]
            row, curves = condition_metrics(
                gen,
                mc,
                float(gamma),
                float(temp),
                self.box,
                bins=self.bins,
                overlap=self.overlap,
                nll=self._nll(c),
            )
            log_q = None if relaxed else self._log_q(sub, self.conditions[c])
            if relaxed:
                row.update(relaxed)
            if log_q is not None:  # on the first draws only: densities cost a model pass
                row.update(
                    reweighting_metrics(
                        sub,
                        log_q,
                        float(gamma),
                        float(temp),
                        self.box,
                        row["energy_mc"],
                        row["energy_mc_se"],
                        ordered=self.ordered,
                    )
                )
            self.rows.append(row)
            self.curves.append(curves)
        return {**summarise(self.rows), **self._model_checks()}

    def _model_checks(self) -> dict[str, Any]:
        """The latent map (encoder models) and the anomaly AUC (density or ELBO models)."""
        model, out = self.context.model, {}
        flat = self.x.reshape(len(self.x), -1)
        y = np.asarray(self.context.y, dtype=np.float64)
        if self.latent_rows and getattr(model, "has_latent", False):
            metrics, self.latent_map = latent_metrics(
                model, flat, y, self.latent_rows, self.context.seed
            )
            out.update(metrics)
        scorable = getattr(model, "has_density", False) or getattr(model, "has_latent", False)
        if self.anomaly_rows and scorable:
            out.update(
                anomaly_metrics(
                    model,
                    self.x,
                    y,
                    noise=self.anomaly_noise,
                    box=self.box,
                    rows=self.anomaly_rows,
                    seed=self.context.seed,
                    ordered=self.ordered,
                )
            )
        return out

    def figures(self, out: Path, shown: Sequence[int], examples: np.ndarray | None) -> dict:
        """Energy histograms, density profiles, g(r) and snapshots, one panel a condition."""
        from flowrecon.systems.lj import figures

        if not self.rows:
            return {}
        gens = self.pooled
        mcs = [self.x[self.index == c] for c in range(len(self.conditions)) if self.generated[c]]
        made = figures.all_figures(Path(out), self.rows, self.curves, gens, mcs, self.box)
        if self.latent_map is not None:
            made["lj_latent"] = (
                figures.latent_map(self.latent_map, Path(out) / "lj_latent.png"),
                "Encoder means of held-out configurations on their first two principal "
                "components, coloured by gamma",
            )
        return made

    def table(self, metrics: Mapping[str, Any]) -> str:
        """A markdown table of the per-condition metrics, then the model checks."""
        text = condition_table(metrics.get("conditions", []))
        checks = []
        if metrics.get("latent_silhouette") is not None:
            checks.append(
                f"latent silhouette of gamma {metrics['latent_silhouette']:.3f} (2 PCs "
                f"{metrics['latent_silhouette_2pc']:.3f})"
            )
        if metrics.get("anomaly_auc") is not None:
            checks.append(
                f"anomaly AUC {metrics['anomaly_auc']:.3f} against configurations displaced "
                f"by {metrics['anomaly_noise']:g} sigma (exact U/T: "
                f"{metrics['anomaly_auc_energy']:.3f})"
            )
        return text + ("\n\n" + "; ".join(checks) if checks else "")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Worst-condition summaries plus the per-condition rows."""

    def worst(key: str, fn=max, absolute: bool = False) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
        if not vals:
            return None
        return float(fn(abs(v) for v in vals) if absolute else fn(vals))

    out: dict[str, Any] = {
        "energy_diff_max": worst("energy_diff", absolute=True),
        "energy_w1_max": worst("energy_w1"),
        "height_rel_error_max": worst("height_rel_error"),
        "density_rel_error_max": worst("density_rel_error_max"),
        "pair_w1_max": worst("pair_w1"),
        "overlap_fraction_max": worst("overlap_fraction"),
        "outside_fraction_max": worst("outside_fraction"),
        "ess_fraction_min": worst("ess_fraction", fn=min),
        "reweighted_z_max": worst("reweighted_z", absolute=True),
        "nll_labelled": (
            float(np.mean([r["nll_labelled"] for r in rows]))
            if rows and all(r.get("nll_labelled") is not None for r in rows)
            else None
        ),
        "conditions": rows,
    }
    return out


_TABLE_COLUMNS = (
    ("gamma", "gamma", "{:g}"),
    ("temperature", "T", "{:g}"),
    ("energy_mc", "U/N MC", "{:.3f}"),
    ("energy_gen", "U/N gen", "{:.3f}"),
    ("energy_w1", "W1(U/N)", "{:.3f}"),
    ("height_mc", "h MC", "{:.3f}"),
    ("height_gen", "h gen", "{:.3f}"),
    ("density_rel_error_max", "rho err", "{:.1%}"),
    ("pair_w1", "W1(r)", "{:.3f}"),
    ("overlap_fraction", "overlap", "{:.2%}"),
    ("outside_fraction", "outside", "{:.2%}"),
    ("ess_fraction", "ESS", "{:.2%}"),
    ("reweighted_energy", "U/N rew.", "{:.3f}"),
    ("reweighted_energy_se", "± se", "{:.3f}"),
    ("nll_labelled", "NLL lab.", "{:.1f}"),
)


def condition_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table, one row per condition."""
    if not rows:
        return ""
    head = "| " + " | ".join(t for _, t, _ in _TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---:|" * len(_TABLE_COLUMNS)]
    for r in rows:
        cells = []
        for key, _, fmt in _TABLE_COLUMNS:
            v = r.get(key)
            cells.append(
                "–"
                if v is None or (isinstance(v, float) and not math.isfinite(v))
                else fmt.format(v)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ideal_g_reference(box: float, dim: int) -> np.ndarray:
    """Pair distances of independent uniform points (the g(r) denominator), cached."""
    key = (float(box), int(dim))
    if key not in _IDEAL:
        _IDEAL[key] = ideal_pair_distances(box, dim)
    return _IDEAL[key]


_IDEAL: dict[tuple[float, int], np.ndarray] = {}
