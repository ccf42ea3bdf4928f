"""Coulomb explosion imaging of any molecule as a flowrecon `System`.

`make_system` describes CEI to the generic runs and command line: positions (bohr) from
momenta (a.u.) of a molecule (OCS by default, or a preset such as ``co2`` or
``chbrclf``, or a TOML file: `flowrecon.systems.cei.molecule`), the simulator chosen by
atom count, the canonical order of identical atoms, the built-in data set, the momentum
frame, the atom-distance error, the CEI metrics, refinement and importance weights as
evaluation options (OCS), the physics loss terms, the CEI figures, and the list of
molecules (`flowrecon molecules`).

Example:
    >>> system = make_system(charges=(2.0, 1.0, 1.0))
    >>> system.name, system.x_columns[:3], system.options["charges"]
    ('cei', ('cx', 'cy', 'cz'), [2.0, 1.0, 1.0])
    >>> make_system(molecule="co2").x_columns[3:6]
    ('o1x', 'o1y', 'o1z')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flowrecon.system import EvaluationContext, System
from flowrecon.systems.cei.metrics import atom_distances, is_ocs, metric_info, metric_layout
from flowrecon.systems.cei.molecule import (
    Molecule,
    available_molecules,
    load_molecule,
    preset_names,
)
from flowrecon.systems.cei.prior import molecule_features

__all__ = ["BUILTIN_DATASET", "CEIEvaluator", "make_system", "molecule_of"]

#: The built-in data set ``flowrecon fit`` simulates when no ``--data`` is given: the
#: molecule near equilibrium, random orientation, the run's channel, 1 % detector
#: resolution.
BUILTIN_DATASET: dict[str, Any] = {"n": 100_000, "seed": 2026, "momentum_noise": 0.01}

#: Highest charge accepted for an ion: no element has more protons than 118.
MAX_CHARGE = 118.0

#: Point metrics reported for refined predictions (with a ``refined_`` prefix), those a
#: molecule's metrics have: OCS names its two bonds, other molecules report the mean over
#: their declared bonds and angles and, if chiral, the handedness.
REFINED_KEYS = (
    "ade",
    "rmsd_com",
    "bond_error_co",
    "bond_error_cs",
    "bond_error",
    "angle_error_deg",
    "handedness_right",
    "mse",
    "energy_diff",
    "resim_residual",
)

Prior = Literal["ocs", "flat", "learned"]
Geometry = Literal["molecule", "ocs", "ball"]


def _check_charges(charges: Sequence[float], molecule: Molecule) -> tuple[float, ...]:
    values = tuple(float(q) for q in charges)
    n = molecule.n_atoms
    if len(values) != n:
        atoms = ",".join(a.label.upper() if is_ocs(molecule) else a.label for a in molecule.atoms)
        example = ",".join(f"{q:g}" for q in molecule.charges)
        raise ValueError(
            f"charges must be {n} numbers for {atoms} such as {example}; got {len(values)}"
        )
    if not all(math.isfinite(q) and 0 < q <= MAX_CHARGE for q in values):
        raise ValueError(
            f"charges must be positive and at most {MAX_CHARGE:g}; got "
            + ",".join(f"{q:g}" for q in values)
        )
    return values


def molecule_of(spec: str | Mapping[str, Any] | Molecule) -> tuple[Molecule, Any]:
    """The molecule of a ``molecule`` option and how ``config.json`` keeps it.

    A preset is kept by name; a TOML file (or a dict) by its whole content, so that a run
    does not depend on the file staying where it was.

    Example:
        >>> molecule_of("co2")[1]
        'co2'
    """
    if isinstance(spec, str) and not spec.strip():
        raise ValueError(f"molecule must be a preset ({', '.join(preset_names())}) or FILE.toml")
    molecule = load_molecule(spec.strip() if isinstance(spec, str) else spec)
    if isinstance(spec, str) and spec.strip() in preset_names():
        return molecule, spec.strip()
    return molecule, molecule.to_dict()


def mean_atom_distance(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean over the atoms of the distance between predicted and true positions.

    Example:
        >>> mean_atom_distance(np.zeros((1, 9)), np.r_[3.0, 0, 0, 0, 0, 0, 0, 0, 0][None])
        array([1.])
    """
    return atom_distances(np.asarray(pred), np.asarray(truth)).mean(-1)


def _column_hint(molecule: Molecule) -> Callable[[list[str]], str]:
    """The hint for a file without the molecule's columns: whose columns it has."""

    def hint(found: list[str]) -> str:
        have = set(found)
        fits = [
            name
            for name in preset_names()
            if name != molecule.name and set(load_molecule(name).momentum_columns) <= have
        ]
        if fits:
            return (
                f" (the file has the columns of molecule {fits[0]!r}, not of {molecule.name!r}: "
                f"give --molecule {fits[0]} or a file of {molecule.name})"
            )
        return f" (molecule {molecule.name!r} needs {', '.join(molecule.momentum_columns)})"

    return hint


def _transform(molecule: Molecule, frame: str) -> str | None:
    if frame == "lab":
        return None
    if is_ocs(molecule):
        return "cei-momentum-frame"
    if molecule.frame is None:
        return "cei-molecule-frame"  # reference atoms chosen from the training momenta
    return "cei-molecule-frame:{},{}".format(*molecule.frame)


def make_system(
    *,
    molecule: str | dict[str, Any] = "ocs",
    charges: tuple[float, ...] | None = None,
    geometry: Geometry = "molecule",
    momentum_noise: float | None = None,
    temperature: float = 0.0,
    accuracy: Literal["high", "fast"] = "high",
    frame: Literal["momentum", "lab"] = "momentum",
) -> System:
    """Coulomb explosion imaging: initial positions (bohr) from final momenta (a.u.).

    Args:
        molecule: A preset (``flowrecon molecules``: ocs, co2, n2o, so2, d2o, ch2i2,
            chbrclf) or a molecule TOML file; its atoms name the columns
            (``{label}x ...``, ``p{label}x ...``).
        charges: Ion charges, one per atom: the explosion channel (e.g. 2,1,1); default
            the molecule's.
        geometry: Geometries simulated: ``molecule`` (its reference geometry with its
            vibrational spread; ``ocs`` is the old name of that for OCS) or ``ball``
            (OCS only: the three atoms anywhere in a 4 bohr ball).
        momentum_noise: Relative detector momentum resolution of simulated data (0.01 =
            1 %); default 0 for ``simulate`` and 0.01 for the built-in data set.
        temperature: Initial thermal momenta of simulated ions, kelvin (0: from rest);
            an effective temperature can stand in for zero-point motion.
        accuracy: Simulator accuracy, ``high`` (~1e-8) or ``fast`` (float32, ~1e-5).
        frame: ``momentum``: models work in the frame built from the momenta (removes the
            nuisance rotation); ``lab``: in the user's own frame.
    """
    mol, kept = molecule_of(molecule)
    charges_ = _check_charges(mol.charges if charges is None else charges, mol)
    mol = mol.with_charges(charges_)
    ocs = is_ocs(mol)
    if momentum_noise is not None and not (math.isfinite(momentum_noise) and momentum_noise >= 0):
        raise ValueError(f"momentum_noise must be >= 0, got {momentum_noise}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 kelvin, got {temperature}")
    if frame not in ("momentum", "lab"):
        raise ValueError(f"frame must be 'momentum' or 'lab', got {frame!r}")
    if accuracy not in ("high", "fast"):
        raise ValueError(f"accuracy must be 'high' or 'fast', got {accuracy!r}")
    if geometry not in ("molecule", "ocs", "ball"):
        raise ValueError(f"geometry must be 'molecule' or 'ball', got {geometry!r}")
    if geometry != "molecule" and not ocs:
        raise ValueError(
            f"geometry {geometry!r} is for OCS only; molecule {mol.name!r} takes "
            "geometry=molecule (its own vibrational spread)"
        )
    # OCS from rest at high accuracy keeps the simulator it always had, bit for bit.
    legacy = ocs and temperature == 0 and accuracy == "high"
    if geometry == "ball" and not legacy:
        raise ValueError("geometry 'ball' simulates from rest at high accuracy only")

    def simulate(
        n: int,
        *,
        seed: int = 0,
        progress: bool = False,
        device: str = "auto",
        momentum_noise: float | None = momentum_noise,
    ) -> Any:
        from flowrecon.systems.cei.geometry import simulate_events, simulate_molecule_events

        noise = 0.0 if momentum_noise is None else momentum_noise
        if legacy:
            from flowrecon.systems.cei.data import events_to_frame

            ev = simulate_events(
                n,
                seed=seed,
                geometry="ball" if geometry == "ball" else "ocs",
                charges=charges_,
                momentum_noise=noise,
                device=device,
                progress=progress,
            )
            return events_to_frame(ev.positions, ev.momenta)
        events = simulate_molecule_events(
            mol,
            n,
            seed=seed,
            momentum_noise=noise,
            device=device,
            accuracy=accuracy,
            temperature=temperature,
            progress=progress,
        )
        return events.to_frame()

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
        return CEIEvaluator(
            context, charges_, refine, refine_samples, weights, noise, prior, molecule=mol
        )

    def sampler(
        context: EvaluationContext,
        samples: np.ndarray,
        *,
        refine: bool = False,
        noise: float | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        extra: dict[str, np.ndarray] = {}
        if refine:
            samples, extra = _refined_samples(samples, context.y, charges_, mol)
        return samples, {**extra, **_energy_columns(samples, context, mol, charges_, noise)}

    def physics_loss() -> Any:
        from flowrecon.systems.cei.losses import physics_loss as cei_physics_loss

        return cei_physics_loss(charges_, mol.masses)

    def prepare(table: Any) -> Any:
        from flowrecon.systems.cei.canonical import canonical_order_table

        return canonical_order_table(table, mol)

    def molecules() -> list[dict[str, Any]]:
        """Built-in molecules of CEI (--molecule NAME, or your own FILE.toml)"""
        return available_molecules()

    layout = metric_layout(mol)
    if ocs:
        summary = ("ade_sample", "rmsd_com", "bond_error_co", "bond_error_cs", "angle_error_deg")
    else:
        summary = (
            "ade_sample",
            "rmsd_com",
            *(("bond_error",) if mol.bonds else ()),
            *(("angle_error_deg",) if mol.angles else ()),
            *(("handedness_right",) if layout.chiral else ()),
        )
    name = "OCS" if ocs else f"{mol.name} ({mol.formula})"
    return System(
        name="cei",
        description=f"Coulomb explosion imaging of {name}",
        x_columns=mol.position_columns,
        y_columns=mol.momentum_columns,
        x_unit="bohr",
        y_unit="a.u.",
        simulate=simulate,
        builtin=builtin,
        transform=_transform(mol, frame),
        # Identical atoms are relabelled by measured momentum in every table read.
        prepare=prepare if mol.identical_groups() else None,
        error_name="ade",
        event_error=mean_atom_distance,
        failure_threshold=0.1,
        metric_info=metric_info(mol),
        summary_metrics=(*summary, "energy_diff", "resim_residual"),
        evaluator=evaluator,
        sampler=sampler,
        physics_terms=("energy_diff2", "rel_err2"),
        physics_loss=physics_loss,
        # The learned prior's internal coordinates: OCS's own (r_CO, r_CS, log bend), else
        # the molecule's Z-matrix coordinates (the same three for OCS).
        prior_features=_internal_coordinates if ocs else molecule_features(mol),
        options={
            "molecule": kept,
            "charges": list(charges_),
            "geometry": geometry,
            "momentum_noise": momentum_noise,
            "temperature": temperature,
            "accuracy": accuracy,
            "frame": frame,
        },
        cli_flags={
            "--molecule": "molecule",
            "--charges": "charges",
            "--geometry": "geometry",
            "--momentum-noise": "momentum_noise",
            "--temperature": "temperature",
            "--accuracy": "accuracy",
            "--frame": "frame",
            "--refine": "refine",
            "--refine-samples": "refine_samples",
            "--weights": "weights",
            "--noise": "noise",
            "--prior": "prior",
        },
        column_hint=_column_hint(mol),
        catalogues={"molecules": molecules},
    )


def _noise(builtin: Mapping[str, Any] | None) -> float | None:
    return (builtin or {}).get("momentum_noise")


def _energy_columns(
    samples: np.ndarray,
    context: EvaluationContext,
    molecule: Molecule,
    charges: Sequence[float],
    noise: float | None,
) -> dict[str, np.ndarray]:
    """``energy_mismatch`` |KE - PE| / KE of each draw and ``energy_flag`` (far beyond noise)."""
    from flowrecon.systems.cei.physics import energy_difference, energy_flag_threshold

    noise = noise if noise is not None else _noise(_builtin_spec(context.config))
    mismatch = np.asarray(
        energy_difference(samples, context.y, tuple(charges), tuple(molecule.masses))
    )
    return {"energy_mismatch": mismatch, "energy_flag": mismatch > energy_flag_threshold(noise)}


def _internal_coordinates(x: Any) -> tuple[np.ndarray, np.ndarray]:
    from flowrecon.systems.cei.prior import internal_coordinates

    return internal_coordinates(x)


def _ocs_only(molecule: Molecule, what: str) -> None:
    """Refuses, in one line, what only OCS has so far."""
    if not is_ocs(molecule):
        raise ValueError(
            f"{what} is implemented for OCS only so far, not for molecule {molecule.name!r} "
            f"({molecule.n_atoms} atoms); evaluate without it"
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
        prior: ``ocs`` (the simulated OCS geometry distribution), ``learned`` (the run's
            learned prior over the training geometries, `flowrecon.learned_prior`) or
            ``flat``; default ``ocs`` for runs on the built-in OCS data, else ``learned``
            (``flat`` for a run without a learned prior). Refinement uses it to choose
            among several exact solutions, and the weights weigh by it.
        molecule: The molecule (default OCS).
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
        *,
        molecule: Molecule | None = None,
    ) -> None:
        from flowrecon.systems.cei.metrics import CEIMetrics
        from flowrecon.systems.cei.physics import energy_flag_threshold

        self.molecule = molecule = load_molecule("ocs") if molecule is None else molecule
        builtin = _builtin_spec(context.config)
        on_ocs_data = builtin is not None and builtin.get("geometry") in ("ocs", "molecule")
        self.prior, self.log_prior = _resolve_prior(
            prior, on_ocs_data and is_ocs(molecule), context.log_prior
        )
        if prior == "ocs":
            _ocs_only(molecule, "the OCS prior (prior=ocs)")
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
        n, width = len(context.x), 3 * molecule.n_atoms
        self.k_refine = min(refine_samples, context.samples) if refine else 0
        self.refine_starts = np.empty((self.k_refine, n, width))
        self.weighted = {"hits50": 0.0, "hits90": 0.0, "ess": [], "mean": np.empty((n, width))}
        self.metrics = CEIMetrics(
            context.x, context.y, charges=self.charges, coverage=False, molecule=molecule
        )
        self.post_mean: np.ndarray | None = None
        self.energy_threshold = energy_flag_threshold(
            noise if noise is not None else _noise(builtin)
        )
        self.energy_flagged = np.zeros(n)

    def update(self, start: int, stop: int, samples: np.ndarray) -> None:
        from flowrecon.systems.cei.physics import energy_difference

        self.metrics.update(start, stop, samples)
        p_obs, masses = self.context.y[start:stop], tuple(self.molecule.masses)
        mismatch = energy_difference(samples, p_obs, self.charges, masses)
        self.energy_flagged[start:stop] = (mismatch > self.energy_threshold).mean(0)
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
        prior = self.log_prior if self.log_prior is not None else "flat"
        w = posterior_weights(xs, p_obs, log_q, self.noise, prior=prior, charges=self.charges,
                              masses=self.molecule.masses)  # fmt: skip
        acc["hits50"] += weighted_coverage(xs, w.weights, truth, 0.5) * (stop - start)
        acc["hits90"] += weighted_coverage(xs, w.weights, truth, 0.9) * (stop - start)
        acc["ess"].append(w.ess)
        acc["mean"][start:stop] = np.einsum("kb,kbd->bd", w.weights, xs)

    def finish(self, posterior_mean: np.ndarray) -> dict[str, Any]:
        ctx = self.context
        self.post_mean = posterior_mean
        metrics = self.metrics.finish(resim_max_events=20_000, seed=ctx.seed)
        metrics.pop("nll", None)  # the generic evaluation reports nll
        metrics["energy_flagged_samples"] = float(self.energy_flagged.mean())
        metrics["energy_flagged_events"] = float((self.energy_flagged > 0.5).mean())
        metrics["energy_flag_threshold"] = self.energy_threshold
        if self.refine:
            metrics.update(
                _refined_metrics(
                    self.refine_starts,
                    ctx.x,
                    ctx.y,
                    self.molecule,
                    self.log_prior,
                    _start_bank(ctx, self.molecule),
                )
            )
        if self.weights:
            n = len(ctx.x)
            ess = np.concatenate(self.weighted["ess"])
            w_err = np.linalg.norm(
                (self.weighted["mean"] - ctx.x).reshape(n, self.molecule.n_atoms, 3), axis=-1
            )
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

    def event_columns(self) -> dict[str, np.ndarray]:
        """Per-event columns of events.csv: the fraction of draws energy-flagged."""
        return {"energy_flagged": self.energy_flagged}

    def figures(
        self, out: Path, shown: Sequence[int], examples: np.ndarray | None
    ) -> dict[str, tuple[Path, str]]:
        from flowrecon.systems.cei.figures import (
            energy_difference_histogram,
            posterior_in_plane,
            posterior_per_atom,
        )
        from flowrecon.systems.cei.physics import energy_difference

        ctx, molecule = self.context, self.molecule
        assert self.post_mean is not None, "finish() comes before figures()"
        label = str(ctx.config.get("model", "model"))
        ediff = energy_difference(self.post_mean, ctx.y, self.charges, molecule.masses)
        figures = {
            "energy_difference": (
                energy_difference_histogram(ediff, out / "energy_difference.png", label=label),
                "|KE(observed momenta) - PE(predicted positions)| / KE",
            )
        }
        if examples is not None and len(shown) and not is_ocs(molecule):
            path = posterior_per_atom(
                examples,
                ctx.x[list(shown)],
                ctx.y[list(shown)],
                out / "posterior_per_atom.png",
                list(range(len(shown))),
                molecule,
                labels=[int(ctx.rows[i]) for i in shown] if ctx.rows is not None else None,
            )
            figures["posterior_per_atom"] = (
                path,
                "Posterior samples of random events per atom, around the truth (momentum frame)",
            )
        elif examples is not None and len(shown):
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

        text = format_metrics_table(metrics, self.molecule)
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
        return example_events_table(
            examples, ctx.x[list(shown)], range(len(shown)), labels=labels, molecule=self.molecule
        )


_BANK: dict[str, Any] = {"key": None, "bank": None}


def _start_bank(context: EvaluationContext, molecule: Molecule) -> Any:
    """The run's training events as refinement starts (`StartBank`), built once a run."""
    from flowrecon.systems.cei.refine import StartBank

    loader = context.training_rows
    if loader is None:
        return None
    if _BANK["key"] is not loader:  # chunks of one command share one loader
        x, y = loader()
        bank = StartBank(x, y, molecule.masses, _bank_reference(molecule))
        _BANK["key"], _BANK["bank"] = loader, bank
    return _BANK["bank"]


def _bank_reference(molecule: Molecule) -> tuple[int, int] | None:
    """The start bank's frame atoms: OCS's momentum frame, else the molecule's own frame."""
    return None if is_ocs(molecule) else molecule.frame


def _resolve_prior(
    prior: str | None, on_ocs_data: bool, learned: Callable | None
) -> tuple[str, Callable[[np.ndarray], np.ndarray] | None]:
    """The prior's name and log-density over positions (None for ``flat``).

    Default: the analytic OCS prior for the built-in OCS data, whose law it is; else the
    run's learned prior, which is what the training data say; flat for a run without one.
    """
    from flowrecon.systems.cei.likelihood import ocs_log_prior

    if prior is None:
        if on_ocs_data:
            prior = "ocs"
        else:
            prior = "learned" if learned is not None else "flat"
    if prior not in ("ocs", "flat", "learned"):
        raise ValueError(f"unknown prior {prior!r}; choose ocs, learned or flat")
    if prior == "learned" and learned is None:
        raise ValueError(
            "prior 'learned' needs a run with a learned prior (prior.pt); this run has none: "
            "fit it again (fit learns one unless --no-learned-prior), or use --prior ocs or flat"
        )
    return prior, {"ocs": ocs_log_prior, "learned": learned, "flat": None}[prior]


def _refined_metrics(
    starts: np.ndarray,
    x_true: np.ndarray,
    p_obs: np.ndarray,
    molecule: Molecule,
    log_prior: Callable[[np.ndarray], np.ndarray] | None,
    bank: Any = None,
) -> dict[str, Any]:
    """Refine posterior samples and compute the point metrics of the refined predictions."""
    from flowrecon.systems.cei.metrics import cei_metrics
    from flowrecon.systems.cei.refine import refine_posterior

    charges, masses = molecule.charges, molecule.masses
    refined = refine_posterior(
        starts, p_obs, charges=charges, masses=masses, log_prior=log_prior, bank=bank
    )
    # One refined prediction an event: a single "sample", so only point metrics apply.
    point = cei_metrics(
        refined.best[None],
        x_true,
        p_obs,
        charges=charges,
        masses=masses,
        resim_max_events=20_000,
        molecule=molecule,
    )
    out: dict[str, Any] = {f"refined_{k}": point[k] for k in REFINED_KEYS if k in point}
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

    for key in (k for k in REFINED_KEYS if f"refined_{k}" in metrics):
        raw, ref = metrics.get(key), metrics.get(f"refined_{key}")
        lines.append(f"  {key:<18}{fmt(raw):>12}{fmt(ref):>12}")
    return "\n".join(lines)


def _refined_samples(
    samples: np.ndarray, momenta: np.ndarray, charges: Sequence[float], molecule: Molecule
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every sample refined through the simulator, with residual, converged and solution."""
    from flowrecon.systems.cei.refine import distinct_solutions, refine_posterior

    masses = molecule.masses
    refined = refine_posterior(samples, momenta, charges=charges, masses=masses)
    ids = np.empty(refined.converged.shape, dtype=int)
    for i in range(ids.shape[1]):
        ids[:, i] = distinct_solutions(
            refined.samples[:, i], refined.residual[:, i], refined.converged[:, i], masses=masses
        ).labels
    extra = {"residual": refined.residual, "converged": refined.converged, "solution": ids}
    return refined.samples, extra
