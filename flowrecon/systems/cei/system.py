"""Coulomb explosion imaging of OCS as a flowrecon `System`.

`make_system` describes CEI to the generic runs and command line: positions (bohr) from
momenta (a.u.), the simulator, the built-in data set, the momentum frame, the atom-distance
error, the CEI metrics, refinement and importance weights as evaluation options, the
physics loss terms, and the CEI figures.

Example:
    >>> system = make_system(charges=(2.0, 1.0, 1.0))
    >>> system.name, system.x_columns[:3], system.options["charges"]
    ('cei', ('cx', 'cy', 'cz'), [2.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flowrecon.system import EvaluationContext, System
from flowrecon.systems.cei.constants import (
    ATOMS,
    DEFAULT_CHARGES,
    MASSES,
    MOMENTUM_COLUMNS,
    POSITION_COLUMNS,
)
from flowrecon.systems.cei.metrics import METRIC_INFO

__all__ = ["BUILTIN_DATASET", "CEIEvaluator", "make_system"]

#: The built-in data set ``flowrecon fit`` simulates when no ``--data`` is given:
#: OCS near equilibrium, random orientation, the run's channel, 1 % detector resolution.
BUILTIN_DATASET: dict[str, Any] = {"n": 100_000, "seed": 2026, "momentum_noise": 0.01}

#: Highest charge accepted for an ion: no element has more protons than 118.
MAX_CHARGE = 118.0

#: Point metrics reported for refined predictions (with a ``refined_`` prefix).
REFINED_KEYS = (
    "ade",
    "rmsd_com",
    "bond_error_co",
    "bond_error_cs",
    "angle_error_deg",
    "mse",
    "energy_diff",
    "resim_residual",
)

Prior = Literal["ocs", "flat"]


def _check_charges(charges: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(q) for q in charges)
    if len(values) != len(ATOMS):
        raise ValueError(
            f"charges must be {len(ATOMS)} numbers for C,O,S such as 2,2,2; got {len(values)}"
        )
    if not all(math.isfinite(q) and 0 < q <= MAX_CHARGE for q in values):
        raise ValueError(
            f"charges must be positive and at most {MAX_CHARGE:g}; got "
            + ",".join(f"{q:g}" for q in values)
        )
    return values  # type: ignore[return-value]


def mean_atom_distance(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean over the three atoms of the distance between predicted and true positions.

    Example:
        >>> mean_atom_distance(np.zeros((1, 9)), np.r_[3.0, 0, 0, 0, 0, 0, 0, 0, 0][None])
        array([1.])
    """
    d = (np.asarray(pred) - np.asarray(truth)).reshape(*np.shape(pred)[:-1], 3, 3)
    return np.sqrt((d * d).sum(-1)).mean(-1)


def make_system(
    *,
    charges: tuple[float, ...] = DEFAULT_CHARGES,
    geometry: Literal["ocs", "ball"] = "ocs",
    momentum_noise: float | None = None,
    frame: Literal["momentum", "lab"] = "momentum",
) -> System:
    """Coulomb explosion imaging of OCS: initial positions (bohr) from final momenta (a.u.).

    Args:
        charges: Ion charges of C, O, S: the explosion channel (e.g. 2,1,1).
        geometry: Geometries simulated: ``ocs`` (near-linear OCS with vibrational
            spread) or ``ball`` (atoms anywhere in a 4 bohr ball).
        momentum_noise: Relative detector momentum resolution of simulated data (0.01 =
            1 %); default 0 for ``simulate`` and 0.01 for the built-in data set.
        frame: ``momentum``: models work in the frame built from the momenta (removes the
            nuisance rotation); ``lab``: in the user's own frame.
    """
    charges = _check_charges(charges)
    if momentum_noise is not None and not (math.isfinite(momentum_noise) and momentum_noise >= 0):
        raise ValueError(f"momentum_noise must be >= 0, got {momentum_noise}")
    if frame not in ("momentum", "lab"):
        raise ValueError(f"frame must be 'momentum' or 'lab', got {frame!r}")

    def simulate(
        n: int,
        *,
        seed: int = 0,
        progress: bool = False,
        device: str = "auto",
        momentum_noise: float | None = momentum_noise,
    ) -> Any:
        from flowrecon.systems.cei.data import events_to_frame
        from flowrecon.systems.cei.geometry import simulate_events

        ev = simulate_events(
            n,
            seed=seed,
            geometry=geometry,
            charges=charges,
            momentum_noise=0.0 if momentum_noise is None else momentum_noise,
            device=device,
            progress=progress,
        )
        return events_to_frame(ev.positions, ev.momenta)

    builtin = dict(BUILTIN_DATASET)
    if momentum_noise is not None:
        builtin["momentum_noise"] = momentum_noise

    def evaluator(
        context: EvaluationContext,
        *,
        refine: bool = False,
        refine_samples: int = 8,
        weights: bool = False,
        noise: float | None = None,
        prior: Prior | None = None,
    ) -> CEIEvaluator:
        return CEIEvaluator(context, charges, refine, refine_samples, weights, noise, prior)

    def sampler(
        context: EvaluationContext, samples: np.ndarray, *, refine: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _refined_samples(samples, context.y, charges) if refine else (samples, {})

    def physics_loss() -> Any:
        from flowrecon.systems.cei.losses import physics_loss as cei_physics_loss

        return cei_physics_loss(charges, MASSES)

    return System(
        name="cei",
        description="Coulomb explosion imaging of OCS",
        x_columns=POSITION_COLUMNS,
        y_columns=MOMENTUM_COLUMNS,
        x_unit="bohr",
        y_unit="a.u.",
        simulate=simulate,
        builtin=builtin,
        transform="cei-momentum-frame" if frame == "momentum" else None,
        error_name="ade",
        event_error=mean_atom_distance,
        failure_threshold=0.1,
        metric_info=METRIC_INFO,
        summary_metrics=(
            "ade_sample",
            "rmsd_com",
            "bond_error_co",
            "bond_error_cs",
            "angle_error_deg",
            "energy_diff",
            "resim_residual",
        ),
        evaluator=evaluator,
        sampler=sampler,
        physics_terms=("energy_diff2", "rel_err2"),
        physics_loss=physics_loss,
        options={
            "charges": list(charges),
            "geometry": geometry,
            "momentum_noise": momentum_noise,
            "frame": frame,
        },
        cli_flags={
            "--charges": "charges",
            "--geometry": "geometry",
            "--momentum-noise": "momentum_noise",
            "--frame": "frame",
            "--refine": "refine",
            "--refine-samples": "refine_samples",
            "--weights": "weights",
            "--noise": "noise",
            "--prior": "prior",
        },
    )


def _builtin_spec(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    data = config.get("data")
    spec = data.get("builtin") if isinstance(data, Mapping) else None
    return spec if isinstance(spec, Mapping) else None


class CEIEvaluator:
    """The CEI part of ``flowrecon evaluate``: metrics, refinement, importance weights.

    Args:
        context: The evaluation (model, events, run configuration).
        charges: The explosion channel.
        refine: Also refine ``refine_samples`` posterior samples per event through the
            simulator and report the refined predictions under ``refined_`` keys.
        refine_samples: Samples per event that are refined.
        weights: Also weight the samples by the detector likelihood and the prior over
            the model's density; report the weighted coverage and effective sample size.
        noise: Relative momentum resolution for the weights; default the built-in data
            set's.
        prior: ``ocs`` (the simulated OCS geometry distribution) or ``flat``; default
            ``ocs`` for runs on the built-in OCS data, else ``flat``. Refinement uses it to
            choose among several exact solutions.
    """

    def __init__(
        self,
        context: EvaluationContext,
        charges: Sequence[float],
        refine: bool,
        refine_samples: int,
        weights: bool,
        noise: float | None,
        prior: Prior | None,
    ) -> None:
        from flowrecon.systems.cei.metrics import CEIMetrics

        builtin = _builtin_spec(context.config)
        self.prior = prior or ("ocs" if builtin and builtin.get("geometry") == "ocs" else "flat")
        if refine_samples < 1:
            raise ValueError(f"refine_samples must be at least 1, got {refine_samples}")
        if weights:
            if not context.model.has_density:
                raise ValueError(
                    f"weights need a model with a density; {context.model.model_} has none"
                )
            noise = noise if noise is not None else (builtin or {}).get("momentum_noise")
            if not noise or not (math.isfinite(noise) and noise > 0):
                raise ValueError("weights need the data's momentum noise: give --noise SIGMA (> 0)")
        self.context, self.charges = context, tuple(charges)
        self.refine, self.weights, self.noise = refine, weights, noise
        n = len(context.x)
        self.k_refine = min(refine_samples, context.samples) if refine else 0
        self.refine_starts = np.empty((self.k_refine, n, 9))
        self.weighted = {"hits50": 0.0, "hits90": 0.0, "ess": [], "mean": np.empty((n, 9))}
        self.metrics = CEIMetrics(context.x, context.y, charges=self.charges, coverage=False)
        self.post_mean: np.ndarray | None = None

    def update(self, start: int, stop: int, samples: np.ndarray) -> None:
        self.metrics.update(start, stop, samples)
        self.refine_starts[:, start:stop] = samples[: self.k_refine]
        if self.weights:
            self._weigh(start, stop, samples)

    def _weigh(self, start: int, stop: int, xs: np.ndarray) -> None:
        """Importance-weight one chunk of posterior samples and accumulate its summaries."""
        from flowrecon.evaluation.weights import weighted_coverage
        from flowrecon.systems.cei.likelihood import posterior_weights

        acc, ctx = self.weighted, self.context
        p_obs, truth = ctx.y[start:stop], ctx.x[start:stop]
        log_q = ctx.model.log_prob(xs, np.broadcast_to(p_obs, xs.shape))
        w = posterior_weights(xs, p_obs, log_q, self.noise, prior=self.prior, charges=self.charges)
        acc["hits50"] += weighted_coverage(xs, w.weights, truth, 0.5) * (stop - start)
        acc["hits90"] += weighted_coverage(xs, w.weights, truth, 0.9) * (stop - start)
        acc["ess"].append(w.ess)
        acc["mean"][start:stop] = np.einsum("kb,kbd->bd", w.weights, xs)

    def finish(self, posterior_mean: np.ndarray) -> dict[str, Any]:
        ctx = self.context
        self.post_mean = posterior_mean
        metrics = self.metrics.finish(resim_max_events=20_000, seed=ctx.seed)
        metrics.pop("nll", None)  # the generic evaluation reports nll
        if self.refine:
            metrics.update(
                _refined_metrics(
                    self.refine_starts, ctx.x, ctx.y, self.charges, self.prior, _start_bank(ctx)
                )
            )
        if self.weights:
            n = len(ctx.x)
            ess = np.concatenate(self.weighted["ess"])
            w_err = np.linalg.norm((self.weighted["mean"] - ctx.x).reshape(-1, 3, 3), axis=-1)
            metrics.update(
                {
                    "weighted_coverage_50": self.weighted["hits50"] / n,
                    "weighted_coverage_90": self.weighted["hits90"] / n,
                    "weighted_ade": float(w_err.mean()),
                    "weights_ess_median": float(np.median(ess)),
                    "weights_ess_mean": float(ess.mean()),
                    "weights_noise": float(self.noise),
                    "weights_prior": self.prior,
                }
            )
        return metrics

    def figures(
        self, out: Path, shown: Sequence[int], examples: np.ndarray | None
    ) -> dict[str, tuple[Path, str]]:
        from flowrecon.systems.cei.figures import energy_difference_histogram, posterior_in_plane
        from flowrecon.systems.cei.physics import energy_difference

        ctx = self.context
        assert self.post_mean is not None, "finish() comes before figures()"
        label = str(ctx.config.get("model", "model"))
        ediff = energy_difference(self.post_mean, ctx.y, self.charges)
        figures = {
            "energy_difference": (
                energy_difference_histogram(ediff, out / "energy_difference.png", label=label),
                "|KE(observed momenta) - PE(predicted positions)| / KE",
            )
        }
        if examples is not None and len(shown):
            path = posterior_in_plane(
                examples,
                ctx.x[list(shown)],
                ctx.y[list(shown)],
                out / "posterior_in_plane.png",
                events=list(range(len(shown))),
                labels=[int(ctx.rows[i]) for i in shown] if ctx.rows is not None else None,
            )
            figures["posterior_in_plane"] = (
                path,
                "Posterior samples of random events in the molecular plane",
            )
        return figures

    def table(self, metrics: Mapping[str, Any]) -> str:
        from flowrecon.systems.cei.metrics import format_metrics_table

        text = format_metrics_table(metrics)
        if self.refine:
            text += "\n" + _format_refined(metrics)
        if self.weights:
            text += (
                f"\nImportance-weighted posterior (noise {self.noise:g}, prior {self.prior}): "
                f"coverage_50 {metrics['weighted_coverage_50']:.3f}, coverage_90 "
                f"{metrics['weighted_coverage_90']:.3f}, ade {metrics['weighted_ade']:.4g} "
                f"bohr, effective sample size median {metrics['weights_ess_median']:.1f} of "
                f"{self.context.samples}"
            )
        return text

    def examples_text(self, examples: np.ndarray, shown: Sequence[int]) -> str:
        from flowrecon.systems.cei.metrics import example_events_table

        ctx = self.context
        labels = [int(ctx.rows[i]) for i in shown] if ctx.rows is not None else list(shown)
        return example_events_table(examples, ctx.x[list(shown)], range(len(shown)), labels=labels)


_BANK: dict[str, Any] = {"key": None, "bank": None}


def _start_bank(context: EvaluationContext) -> Any:
    """The run's training events as refinement starts (`StartBank`), built once a run."""
    from flowrecon.systems.cei.refine import StartBank

    loader = context.training_rows
    if loader is None:
        return None
    if _BANK["key"] is not loader:  # chunks of one command share one loader
        x, y = loader()
        _BANK["key"], _BANK["bank"] = loader, StartBank(x, y)
    return _BANK["bank"]


def _refined_metrics(
    starts: np.ndarray,
    x_true: np.ndarray,
    p_obs: np.ndarray,
    charges: tuple[float, ...],
    prior: str | None,
    bank: Any = None,
) -> dict[str, Any]:
    """Refine posterior samples and compute the point metrics of the refined predictions."""
    from flowrecon.systems.cei.likelihood import ocs_log_prior
    from flowrecon.systems.cei.metrics import cei_metrics
    from flowrecon.systems.cei.refine import refine_posterior

    log_prior = ocs_log_prior if prior == "ocs" else None
    refined = refine_posterior(starts, p_obs, charges=charges, log_prior=log_prior, bank=bank)
    # One refined prediction an event: a single "sample", so only point metrics apply.
    point = cei_metrics(refined.best[None], x_true, p_obs, charges=charges, resim_max_events=20_000)
    out: dict[str, Any] = {f"refined_{k}": point[k] for k in REFINED_KEYS}
    n_starts = refined.converged.size
    # Yardsticks of exact recovery: every atom within 1e-5 bohr of the truth and a
    # momentum residual <= 1e-8.
    atom_err = refined.atom_error(x_true)
    best_res = refined.best_residual
    out.update(
        {
            "refine_samples": int(starts.shape[0]),
            "refine_converged_fraction": float(refined.converged.mean()),
            "refine_events_with_solution": float((refined.n_solutions > 0).mean()),
            "refine_events_multiple_solutions": float((refined.n_solutions > 1).mean()),
            "refine_events_within_1e-5_bohr": float((atom_err <= 1e-5).mean()),
            "refine_events_truth_among_solutions": float(
                (refined.nearest_solution_error(x_true) <= 1e-5).mean()
            ),
            "refine_start_bank": 0 if bank is None else len(bank),
            "refine_events_residual_below_1e-8": float((best_res <= 1e-8).mean()),
            "refined_median_atom_error": float(np.median(atom_err)),
            "refine_samples_per_s": n_starts / max(refined.seconds, 1e-12),
        }
    )
    return out


def _format_refined(metrics: Mapping[str, Any]) -> str:
    """The refined predictions' metrics beside the raw ones, as text."""
    lines = [
        f"Refined through the simulator ({metrics['refine_samples']} samples an event, "
        f"{metrics['refine_samples_per_s']:,.0f} samples/s): "
        f"{100 * metrics['refine_converged_fraction']:.1f} % of samples converged, "
        f"{100 * metrics['refine_events_multiple_solutions']:.2f} % of events have more "
        "than one solution;",
        f"{100 * metrics['refine_events_within_1e-5_bohr']:.2f} % of events within 1e-5 bohr "
        f"of the truth ({100 * metrics['refine_events_truth_among_solutions']:.2f} % with the "
        f"truth among their solutions), {100 * metrics['refine_events_residual_below_1e-8']:.2f}"
        " % with "
        f"momentum residual <= 1e-8 (median atom error "
        f"{metrics['refined_median_atom_error']:.2g} bohr)",
        f"  {'metric':<18}{'raw':>12}{'refined':>12}",
    ]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    for key in REFINED_KEYS:
        raw, ref = metrics.get(key), metrics.get(f"refined_{key}")
        lines.append(f"  {key:<18}{fmt(raw):>12}{fmt(ref):>12}")
    return "\n".join(lines)


def _refined_samples(
    samples: np.ndarray, momenta: np.ndarray, charges: Sequence[float]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every sample refined through the simulator, with residual, converged and solution."""
    from flowrecon.systems.cei.refine import distinct_solutions, refine_posterior

    refined = refine_posterior(samples, momenta, charges=charges)
    ids = np.empty(refined.converged.shape, dtype=int)
    for i in range(ids.shape[1]):
        ids[:, i] = distinct_solutions(
            refined.samples[:, i], refined.residual[:, i], refined.converged[:, i]
        ).labels
    extra = {"residual": refined.residual, "converged": refined.converged, "solution": ids}
    return refined.samples, extra
