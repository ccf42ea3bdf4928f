"""Metrics of CEI reconstructions, in the user's own frame and units (bohr, a.u.).

`cei_metrics` computes the keys that ``flowrecon evaluate`` writes to ``metrics.json``
(DESIGN section 3) from posterior samples of the 3N initial positions of a molecule
(OCS by default: 9 positions). Samples may be an array ``(n, B, 3N)`` or a function
``draw(start, stop) -> (n, stop - start, 3N)``, so that a million events with a hundred
draws each are evaluated chunk by chunk and never held in memory at once.
`format_metrics_table` and `example_events_table` turn the results into text a physicist
can read.

Keys for any molecule (`metric_layout`): ``ade`` and one ``ade_{label}`` per atom; one
``bond_error_{a}{b}`` per declared bond (OCS: ``bond_error_co``, ``bond_error_cs``) and
their mean ``bond_error``; ``angle_error_deg`` (the one declared angle, or the mean over
several) and, with several angles, one ``angle_error_{a}{b}{c}_deg`` each; for a chiral
molecule ``handedness_right`` (posterior mean) and ``handedness_right_sample`` (single
draws), the fractions of events whose triple-product sign is the true one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowrecon.evaluation.metrics import coverage_curve, relative_errors, to_numpy
from flowrecon.evaluation.metrics import nll as mean_nll
from flowrecon.system import MetricInfo
from flowrecon.systems.cei.constants import ATOMS
from flowrecon.systems.cei.molecule import Molecule, load_molecule
from flowrecon.systems.cei.physics import (
    bond_angles,
    bond_lengths,
    energy_difference,
    energy_difference_squared,
    handedness,
    internal_coordinates,
    remove_centre_of_mass,
)
from flowrecon.systems.cei.simulator import asymptotic_momenta

__all__ = [
    "METRIC_INFO",
    "CEIMetrics",
    "DESIGN_KEYS",
    "EXTRA_KEYS",
    "MetricLayout",
    "atom_distances",
    "cei_metrics",
    "example_events_table",
    "format_metrics_table",
    "is_ocs",
    "metric_layout",
]

ArrayLike = np.ndarray | torch.Tensor
#: Posterior draws: an array ``(n, B, 9)`` or ``draw(start, stop) -> (n, stop - start, 9)``.
Samples = ArrayLike | Callable[[int, int], ArrayLike]
Metrics = dict[str, float | int | None]

#: The keys of ``metrics.json`` that DESIGN section 3 requires, in its order.
DESIGN_KEYS: tuple[str, ...] = (
    "n", "ade", "ade_sample", "rmsd_com", "bond_error_co", "bond_error_cs",
    "angle_error_deg", "mre", "mre2", "mse", "energy_diff", "energy_diff2",
    "resim_residual", "coverage_50", "coverage_90", "nll",
)  # fmt: skip

#: Further keys `cei_metrics` always returns.
EXTRA_KEYS: tuple[str, ...] = (
    "n_samples", "ade_c", "ade_o", "ade_s", "posterior_std",
    "mre_small_coordinates", "mre_small_threshold", "resim_events",
)  # fmt: skip

#: Coverage levels that are always reported (``coverage_50``, ``coverage_90``).
_REQUIRED_LEVELS: tuple[float, ...] = (0.5, 0.9)

_OCS = "ocs"


def is_ocs(molecule: Molecule) -> bool:
    """Whether ``molecule`` is the OCS preset (in any explosion channel).

    OCS keeps its own paths (planar simulator defaults, momentum frame, refinement,
    metric names), bit for bit as before other molecules existed.

    Example:
        >>> is_ocs(load_molecule("ocs").with_charges((2, 1, 1))), is_ocs(load_molecule("co2"))
        (True, False)
    """
    reference = load_molecule(_OCS)
    if molecule.n_atoms != reference.n_atoms:
        return False
    return molecule.with_charges(reference.charges) == reference


@dataclass(frozen=True)
class MetricLayout:
    """The metric keys of one molecule: per atom, per declared bond and angle, chirality.

    Attributes:
        molecule: The molecule.
        atom_keys: ``ade_{label}`` per atom.
        bond_keys: ``bond_error_{a}{b}`` per declared bond.
        angle_keys: ``angle_error_deg`` for a single declared angle, else
            ``angle_error_{a}{b}{c}_deg`` per angle.
        design_keys: The DESIGN keys for this molecule, in order.
        extra_keys: Further keys always returned.
    """

    molecule: Molecule
    atom_keys: tuple[str, ...]
    bond_keys: tuple[str, ...]
    angle_keys: tuple[str, ...]
    design_keys: tuple[str, ...]
    extra_keys: tuple[str, ...]

    @property
    def width(self) -> int:
        return 3 * self.molecule.n_atoms

    @property
    def chiral(self) -> bool:
        return self.molecule.chirality is not None


def _unique(keys: list[str], fallback: list[str]) -> tuple[str, ...]:
    """``keys``, or ``fallback`` if two coincide (labels ``c`` + ``o1`` vs ``co`` + ``1``)."""
    return tuple(keys) if len(set(keys)) == len(keys) else tuple(fallback)


def metric_layout(molecule: Molecule | str = _OCS) -> MetricLayout:
    """The metric keys of a molecule; OCS keeps DESIGN's names exactly.

    Example:
        >>> metric_layout("co2").bond_keys, metric_layout("co2").angle_keys
        (('bond_error_co1', 'bond_error_co2'), ('angle_error_deg',))
        >>> metric_layout("ocs").design_keys == DESIGN_KEYS
        True
    """
    m = load_molecule(molecule)
    labels = m.labels
    bond_keys = _unique(
        [f"bond_error_{labels[i]}{labels[j]}" for i, j in m.bonds],
        [f"bond_error_{labels[i]}_{labels[j]}" for i, j in m.bonds],
    )
    if len(m.angles) == 1:
        angle_keys: tuple[str, ...] = ("angle_error_deg",)
    else:
        angle_keys = _unique(
            [f"angle_error_{''.join(labels[n] for n in a)}_deg" for a in m.angles],
            [f"angle_error_{'_'.join(labels[n] for n in a)}_deg" for a in m.angles],
        )
    mean_angle = () if len(m.angles) == 1 else (("angle_error_deg",) if m.angles else ())
    design = (
        "n", "ade", "ade_sample", "rmsd_com", *bond_keys, *angle_keys, "mre", "mre2", "mse",
        "energy_diff", "energy_diff2", "resim_residual", "coverage_50", "coverage_90", "nll",
    )  # fmt: skip
    chiral = ("handedness_right", "handedness_right_sample") if m.chirality else ()
    # OCS keeps exactly its keys of before; other molecules also get the mean bond error.
    means = () if is_ocs(m) else (*(("bond_error",) if m.bonds else ()), *mean_angle)
    extra = (
        "n_samples", *(f"ade_{label}" for label in labels), *means, *chiral, "posterior_std",
        "mre_small_coordinates", "mre_small_threshold", "resim_events",
    )  # fmt: skip
    return MetricLayout(
        m, tuple(f"ade_{label}" for label in labels), bond_keys, angle_keys, design, extra
    )


def _coverage_key(level: float) -> str:
    return f"coverage_{level * 100:g}"


def _flat(
    values: ArrayLike, name: str, layout: MetricLayout, n_events: int | None = None
) -> np.ndarray:
    a = to_numpy(values, name)
    width, m = layout.width, layout.molecule
    if a.ndim != 2 or a.shape[1] != width:
        order = " ".join(m.position_columns) if width == 9 else f"{m.n_atoms} atoms x, y, z"
        raise ValueError(f"{name} must have shape (B, {width}) ordered {order}; got {a.shape}")
    if n_events is not None and a.shape[0] != n_events:
        raise ValueError(f"{name} has {a.shape[0]} events but positions_true has {n_events}")
    return a


def _drawer(samples: Samples, n_events: int, width: int = 9) -> Callable[[int, int], np.ndarray]:
    """A ``draw(start, stop)`` that returns checked float64 numpy chunks ``(n, k, 3N)``."""
    if callable(samples) and not isinstance(samples, np.ndarray | torch.Tensor):
        source = samples
    else:
        shape = tuple(samples.shape)
        if len(shape) != 3 or shape[1] != n_events or shape[2] != width:
            raise ValueError(
                f"samples must have shape (n, B, {width}) = (n, {n_events}, {width}), "
                f"sample-first; got {shape}"
            )

        def source(start: int, stop: int) -> ArrayLike:
            return samples[:, start:stop]

    n_draws: list[int] = []

    def draw(start: int, stop: int) -> np.ndarray:
        s = to_numpy(source(start, stop), "samples")
        if s.ndim != 3 or s.shape[1:] != (stop - start, width) or s.shape[0] == 0:
            raise ValueError(
                f"samples for events {start}:{stop} must have shape (n, {stop - start}, "
                f"{width}) with n >= 1; got {s.shape}"
            )
        if n_draws and s.shape[0] != n_draws[0]:
            raise ValueError(
                f"samples for events {start}:{stop} hold {s.shape[0]} draws, "
                f"earlier events {n_draws[0]}; every event needs the same number"
            )
        n_draws[:1] = [s.shape[0]]
        return s

    return draw


def atom_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-atom Euclidean distances ``(..., N)`` between flat ``(..., 3N)`` geometries.

    Example:
        >>> atom_distances(np.zeros(6), np.r_[3.0, 4, 0, 0, 0, 1])
        array([5., 1.])
    """
    shape = np.broadcast_shapes(a.shape, b.shape)
    d = (a - b).reshape(*shape[:-1], shape[-1] // 3, 3)
    return np.sqrt((d * d).sum(-1))


def _finite_or_none(key: str, value: float | None) -> float | None:
    """Plain float for JSON; a non-finite value becomes None, loudly."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        warnings.warn(f"metric {key!r} is {value}; reported as None", RuntimeWarning, stacklevel=3)
        return None
    return value


def _simulate(
    positions: Any, molecule: Molecule, charges: Sequence[float], masses: Sequence[float]
) -> Any:
    """Final momenta: OCS through its own simulator defaults, others by atom count."""
    from flowrecon.systems.cei.nbody import molecule_momenta

    if is_ocs(molecule):
        return asymptotic_momenta(positions, charges=charges, masses=masses)
    return molecule_momenta(positions, molecule, charges=charges)


def _resim_residuals(
    x_pred: np.ndarray,
    p_obs: np.ndarray,
    charges: Sequence[float],
    masses: Sequence[float],
    device: str | torch.device | None,
    molecule: Molecule | None = None,
) -> np.ndarray:
    """Per-event ``|p_sim - p_obs| / |p_obs|`` of 3N-vectors; a failed event counts as inf."""
    molecule = load_molecule(_OCS) if molecule is None else molecule
    residual = np.full(len(x_pred), np.inf)
    # The simulator refuses NaN/Inf positions; such an event is simply wrong, and
    # counting it as inf keeps it in the median instead of dropping it.
    ok = np.isfinite(x_pred).all(axis=1)
    if ok.any():
        positions = x_pred[ok] if device is None else torch.as_tensor(x_pred[ok], device=device)
        p_sim = to_numpy(_simulate(positions, molecule, charges, masses))
        with np.errstate(divide="ignore", invalid="ignore"):  # |p_obs| = 0 gives inf
            residual[ok] = np.linalg.norm(p_sim - p_obs[ok], axis=1) / np.linalg.norm(
                p_obs[ok], axis=1
            )
    return np.where(np.isnan(residual), np.inf, residual)


class CEIMetrics:
    """The CEI metrics of one molecule, accumulated over chunks of posterior draws.

    ``update`` takes the draws of consecutive events; ``finish`` computes the metrics.
    With ``coverage=False`` the coverage keys are left out (the generic evaluation of
    `flowrecon.runs` computes them once for every system).

    Example:
        >>> x = np.array([[0.0, 0, 0, -2.19, 0, 0, 2.95, 0, 0]])
        >>> acc = CEIMetrics(x, asymptotic_momenta(x), charges=(2, 2, 2))
        >>> acc.update(0, 1, np.stack([x, x]))
        >>> acc.finish()["ade"]
        0.0
    """

    def __init__(
        self,
        positions_true: ArrayLike,
        momenta_obs: ArrayLike,
        *,
        charges: Sequence[float],
        masses: Sequence[float] | None = None,
        levels: Sequence[float] = _REQUIRED_LEVELS,
        coverage: bool = True,
        eps: float = 1e-10,
        molecule: Molecule | str = _OCS,
    ) -> None:
        self.layout = metric_layout(molecule)
        self.molecule = self.layout.molecule
        self.x_true = _flat(positions_true, "positions_true", self.layout)
        self.n_events = self.x_true.shape[0]
        if self.n_events == 0:
            raise ValueError("positions_true holds no events")
        self.p_obs = _flat(momenta_obs, "momenta_obs", self.layout, self.n_events)
        self.charges, self.eps = charges, eps
        self.masses = self.molecule.masses if masses is None else masses
        self.levels = np.array(sorted({float(v) for v in (*_REQUIRED_LEVELS, *levels)}))
        self.coverage = coverage
        self.x_mean = np.empty_like(self.x_true)
        self.inside = np.zeros(self.levels.size)
        self.ade_sample_sum = self.std_sum = self.hand_sum = 0.0
        self.n_draws = 0
        self.true_hand = self._handedness(self.x_true)

    def _handedness(self, x: np.ndarray) -> np.ndarray | None:
        chirality = self.molecule.chirality
        return None if chirality is None else np.asarray(handedness(x, *chirality))

    def update(self, start: int, stop: int, s: np.ndarray) -> None:
        """Takes the draws ``(n, stop - start, 3N)`` of events ``start:stop``."""
        self.n_draws = s.shape[0]
        t = self.x_true[start:stop]
        self.x_mean[start:stop] = s.mean(axis=0)
        self.std_sum += float(s.std(axis=0).sum())
        self.ade_sample_sum += float(atom_distances(s, t).sum())
        if self.true_hand is not None:
            drawn = self._handedness(s)
            self.hand_sum += float((drawn == self.true_hand[start:stop]).sum())
        if self.coverage:
            self.inside += coverage_curve(s, t, self.levels)[1] * t.size

    def _geometry_errors(self) -> dict[str, float | None]:
        """Mean absolute errors of the declared bonds and angles, and their means."""
        m, layout = self.molecule, self.layout
        out: dict[str, float | None] = {}
        if m.bonds:
            err = np.abs(bond_lengths(self.x_mean, m.bonds) - bond_lengths(self.x_true, m.bonds))
            out.update(zip(layout.bond_keys, err.mean(0)))
            out["bond_error"] = err.mean()
        if m.angles:
            err = np.abs(bond_angles(self.x_mean, m.angles) - bond_angles(self.x_true, m.angles))
            out.update(zip(layout.angle_keys, err.mean(0)))
            out.setdefault("angle_error_deg", err.mean())
        return out

    def _ocs_geometry_errors(self) -> dict[str, float | None]:
        # OCS keeps the computation it always had, so its numbers stay bit for bit.
        ic_pred, ic_true = internal_coordinates(self.x_mean), internal_coordinates(self.x_true)
        return {
            "bond_error_co": np.abs(ic_pred.r_co - ic_true.r_co).mean(),
            "bond_error_cs": np.abs(ic_pred.r_cs - ic_true.r_cs).mean(),
            "angle_error_deg": np.abs(ic_pred.angle_ocs_deg - ic_true.angle_ocs_deg).mean(),
        }

    def finish(
        self,
        *,
        log_prob: ArrayLike | None = None,
        resimulate: bool = True,
        resim_max_events: int | None = None,
        seed: int = 0,
        resim_device: str | torch.device | None = None,
    ) -> Metrics:
        """The metrics of every event seen; arguments as in `cei_metrics`."""
        x_mean, x_true, n_events = self.x_mean, self.x_true, self.n_events
        n_atoms = self.molecule.n_atoms
        dist = atom_distances(x_mean, x_true)  # (B, N)
        com_diff = remove_centre_of_mass(x_mean, self.masses) - remove_centre_of_mass(
            x_true, self.masses
        )
        rmsd = np.sqrt((com_diff.reshape(-1, n_atoms, 3) ** 2).sum(-1).mean(-1))
        ocs = is_ocs(self.molecule)
        geometry = self._ocs_geometry_errors() if ocs else self._geometry_errors()
        rel = relative_errors(x_mean, x_true, eps=self.eps)
        resim, resim_events = self._resim(resimulate, resim_max_events, seed, resim_device)
        coverage = {
            _coverage_key(v): float(c / x_true.size) for v, c in zip(self.levels, self.inside)
        }
        charges, masses, p_obs = self.charges, self.masses, self.p_obs
        values: dict[str, float | None] = {
            "ade": dist.mean(),
            "ade_sample": self.ade_sample_sum / (self.n_draws * n_events * n_atoms),
            "rmsd_com": rmsd.mean(),
            **geometry,
            "mre": rel.mre,
            "mre2": rel.mre2,
            "mse": np.mean((x_mean - x_true) ** 2),
            "energy_diff": energy_difference(x_mean, p_obs, charges, masses).mean(),
            "energy_diff2": energy_difference_squared(x_mean, p_obs, charges, masses).mean(),
            "resim_residual": resim,
            "coverage_50": coverage.pop("coverage_50"),
            "coverage_90": coverage.pop("coverage_90"),
            "nll": _mean_nll(log_prob, n_events),
            **{key: dist[:, i].mean() for i, key in enumerate(self.layout.atom_keys)},
            "posterior_std": self.std_sum / x_true.size,
            "mre_small_threshold": rel.threshold,
            **coverage,
        }
        if self.true_hand is not None:
            values["handedness_right"] = float((self._handedness(x_mean) == self.true_hand).mean())
            values["handedness_right_sample"] = self.hand_sum / (self.n_draws * n_events)
        counts = {
            "n_samples": self.n_draws,
            "mre_small_coordinates": rel.n_small,
            "resim_events": resim_events,
        }
        metrics: Metrics = {"n": n_events}
        layout = self.layout
        for key in (*layout.design_keys[1:], *layout.extra_keys, *coverage):
            if key.startswith("coverage_") and not self.coverage:
                continue
            metrics[key] = counts[key] if key in counts else _finite_or_none(key, values[key])
        return metrics

    def _resim(
        self,
        resimulate: bool,
        resim_max_events: int | None,
        seed: int,
        device: str | torch.device | None,
    ) -> tuple[float | None, int]:
        if not resimulate:
            return None, 0
        idx = np.arange(self.n_events)
        if resim_max_events is not None and self.n_events > resim_max_events:
            rng = np.random.default_rng(seed)
            idx = np.sort(rng.choice(self.n_events, size=resim_max_events, replace=False))
        if not idx.size:
            return None, 0
        residual = _resim_residuals(
            self.x_mean[idx], self.p_obs[idx], self.charges, self.masses, device, self.molecule
        )
        return float(np.median(residual)), int(idx.size)


def _mean_nll(log_prob: ArrayLike | None, n_events: int) -> float | None:
    """Mean negative log-likelihood, or None without densities or with a NaN among them."""
    if log_prob is None:
        return None
    lp = to_numpy(log_prob, "log_prob")
    if lp.shape != (n_events,):
        raise ValueError(f"log_prob must have shape ({n_events},); got {lp.shape}")
    n_nan = int(np.isnan(lp).sum())
    if n_nan:
        warnings.warn(
            f"log_prob holds {n_nan} NaN of {n_events}; nll reported as None",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return mean_nll(lp)


def cei_metrics(
    samples: Samples,
    positions_true: ArrayLike,
    momenta_obs: ArrayLike,
    *,
    charges: Sequence[float],
    masses: Sequence[float] | None = None,
    log_prob: ArrayLike | None = None,
    resimulate: bool = True,
    resim_max_events: int | None = None,
    levels: Sequence[float] = _REQUIRED_LEVELS,
    chunk_size: int = 8192,
    eps: float = 1e-10,
    seed: int = 0,
    resim_device: str | torch.device | None = None,
    molecule: Molecule | str = _OCS,
) -> Metrics:
    """All CEI metrics for posterior samples of initial positions (see `CEIMetrics`).

    Point metrics use the posterior mean of each event; ``ade_sample`` and the coverages
    use every draw. Energies take KE from the observed momenta and PE from the predicted
    positions with the given charges. ``resim_residual`` explodes the posterior-mean
    geometry with `asymptotic_momenta` and compares with the observed momenta (norms of
    the 9-vectors, median over events; an event whose mean geometry cannot be simulated
    counts as an infinite residual). ``rmsd_com`` removes each geometry's mass-weighted
    centre of mass but does not rotate: orientation is observable from the momenta.

    Args:
        samples: Posterior draws in the user's frame, ``(n, B, 3N)`` bohr (OCS: 9), or a
            function ``draw(start, stop) -> (n, stop - start, 3N)``. The function is called exactly
            once per chunk, in order, covering every event once, so it may accumulate
            its own summaries of the draws it hands out.
        positions_true: True initial positions, ``(B, 3N)`` bohr.
        momenta_obs: Observed final momenta, ``(B, 3N)`` a.u.
        charges: Ion charges of the explosion channel, one per atom.
        masses: Masses in electron masses, one per atom; default the molecule's.
        log_prob: The model's ``log_prob(positions_true, momenta_obs)``, ``(B,)``, or
            None for a model without a density (``nll`` is then None).
        resimulate: Compute ``resim_residual`` (None otherwise).
        resim_max_events: Re-simulate at most this many events, drawn at random with
            ``seed``; None re-simulates all.
        levels: Central-interval levels for ``coverage_<percent>`` keys; 0.5 and 0.9 are
            always included.
        chunk_size: Events per chunk; memory is about ``n * chunk_size * 9 * 8`` bytes
            a copy.
        eps: The seed decks' guard of the relative errors.
        seed: Seed of the re-simulation subset.
        resim_device: Device for the re-simulation (e.g. ``"cuda"``); None runs on CPU.
        molecule: The molecule (a `Molecule`, preset name or TOML file); default OCS.

    Returns:
        A dict of plain ints, floats and None (JSON-serialisable): `DESIGN_KEYS`, then
        `EXTRA_KEYS` and any extra coverage keys. Undefined or non-finite values are
        None, with a `RuntimeWarning` naming the key.

    Example:
        >>> x = np.array([[0.0, 0, 0, -2.19, 0, 0, 2.95, 0, 0]])
        >>> p = asymptotic_momenta(x)
        >>> m = cei_metrics(np.stack([x, x]), x, p, charges=(2, 2, 2))
        >>> m["ade"], m["resim_residual"] < 1e-12, m["coverage_90"]
        (0.0, True, 1.0)
    """
    acc = CEIMetrics(
        positions_true,
        momenta_obs,
        charges=charges,
        masses=masses,
        levels=levels,
        eps=eps,
        molecule=molecule,
    )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    draw = _drawer(samples, acc.n_events, acc.layout.width)
    for start in range(0, acc.n_events, chunk_size):
        stop = min(start + chunk_size, acc.n_events)
        acc.update(start, stop, draw(start, stop))
    return acc.finish(
        log_prob=log_prob,
        resimulate=resimulate,
        resim_max_events=resim_max_events,
        seed=seed,
        resim_device=resim_device,
    )


#: Metrics of a CEI evaluation, in the order ``metrics.json`` lists them.
METRIC_INFO: dict[str, MetricInfo] = {
    "n": MetricInfo("events", "test events"),
    "ade": MetricInfo("bohr", "mean atom distance, posterior mean"),
    "ade_median": MetricInfo("bohr", "median over events of the mean atom distance"),
    "ade_p95": MetricInfo("bohr", "95th percentile over events of the mean atom distance"),
    "failure_rate": MetricInfo("fraction", "events with ade > 0.1 bohr or not finite"),
    "ade_sample": MetricInfo("bohr", "mean atom distance, single draws"),
    "rmsd_com": MetricInfo("bohr", "RMSD after centre-of-mass removal"),
    "bond_error_co": MetricInfo("bohr", "mean |r_CO error|"),
    "bond_error_cs": MetricInfo("bohr", "mean |r_CS error|"),
    "angle_error_deg": MetricInfo("deg", "mean |O-C-S angle error|"),
    "mre": MetricInfo("%", "mean |error| / |truth| (seed decks)"),
    "mre2": MetricInfo("%", "mean (error / truth)^2 (seed decks)"),
    "mse": MetricInfo("bohr^2", "mean squared coordinate error"),
    "energy_diff": MetricInfo("ratio", "mean |KE - PE| / KE, KE observed, PE predicted"),
    "energy_diff2": MetricInfo("ratio", "mean ((KE - PE) / KE)^2"),
    "energy_flagged_samples": MetricInfo(
        "fraction", "draws whose |KE - PE| / KE is far beyond the momentum noise"
    ),
    "energy_flagged_events": MetricInfo(
        "fraction", "events with more than half of their draws energy-flagged"
    ),
    "energy_flag_threshold": MetricInfo("ratio", "|KE - PE| / KE above which a draw is flagged"),
    "resim_residual": MetricInfo("ratio", "median |p_sim - p_obs| / |p_obs|, re-simulated"),
    "coverage_50": MetricInfo("fraction", "true coordinates inside the central 50 % interval"),
    "coverage_90": MetricInfo("fraction", "true coordinates inside the central 90 % interval"),
    "nll": MetricInfo("nats", "mean negative log-likelihood of the true positions"),
    "n_samples": MetricInfo("draws", "posterior draws per event"),
    "ade_c": MetricInfo("bohr", "mean distance of C"),
    "ade_o": MetricInfo("bohr", "mean distance of O"),
    "ade_s": MetricInfo("bohr", "mean distance of S"),
    "posterior_std": MetricInfo("bohr", "mean posterior std of a coordinate"),
    "mre_small_coordinates": MetricInfo("count", "true coordinates near zero (mre unreliable)"),
    "mre_small_threshold": MetricInfo("bohr", "|x| below which a coordinate counts as near zero"),
    "resim_events": MetricInfo("events", "events re-simulated for resim_residual"),
}

#: Rows of `format_metrics_table`, in order (units and meanings from `METRIC_INFO`).
_TABLE_KEYS: tuple[str, ...] = (
    "ade", "ade_median", "ade_p95", "failure_rate", "ade_sample", "rmsd_com", "bond_error_co",
    "bond_error_cs", "angle_error_deg", "posterior_std", "mse", "mre", "mre2", "energy_diff",
    "energy_diff2", "resim_residual",
)  # fmt: skip


def _name(labels: Sequence[str]) -> str:
    """``C-O1``: atom labels as a physicist writes a bond or angle."""
    return "-".join(label.upper() if len(label) == 1 else label.capitalize() for label in labels)


def metric_info(molecule: Molecule | str = _OCS) -> dict[str, MetricInfo]:
    """Units and meanings of a molecule's metrics, in ``metrics.json`` order.

    OCS gets `METRIC_INFO` itself; other molecules their own atoms, bonds and angles.

    Example:
        >>> list(metric_info("co2"))[7:10]
        ['bond_error_co1', 'bond_error_co2', 'angle_error_deg']
    """
    layout = metric_layout(molecule)
    m = layout.molecule
    if is_ocs(m):
        return dict(METRIC_INFO)
    labels = m.labels
    geometry: dict[str, MetricInfo] = {}
    for key, (i, j) in zip(layout.bond_keys, m.bonds):
        geometry[key] = MetricInfo("bohr", f"mean |r({_name([labels[i], labels[j]])}) error|")
    for key, angle in zip(layout.angle_keys, m.angles):
        geometry[key] = MetricInfo("deg", f"mean |{_name([labels[n] for n in angle])} angle error|")
    if len(m.angles) > 1:
        geometry["angle_error_deg"] = MetricInfo("deg", "mean |angle error| over the angles")
    out: dict[str, MetricInfo] = {}
    for key, info in METRIC_INFO.items():
        if key == "bond_error_co":
            out.update(geometry)
        elif key in ("bond_error_cs", "angle_error_deg") or key in ("ade_c", "ade_o", "ade_s"):
            continue
        elif key == "posterior_std":
            for label, atom_key in zip(labels, layout.atom_keys):
                out[atom_key] = MetricInfo("bohr", f"mean distance of {_name([label])}")
            if m.bonds:
                out["bond_error"] = MetricInfo("bohr", "mean |bond length error| over the bonds")
            if m.chirality is not None:
                out["handedness_right"] = MetricInfo(
                    "fraction", "events whose posterior mean has the true handedness"
                )
                out["handedness_right_sample"] = MetricInfo(
                    "fraction", "single draws with the true handedness"
                )
            out[key] = info
        else:
            out[key] = info
    return out


def _fmt(value: float | int | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def format_metrics_table(metrics: Metrics, molecule: Molecule | str = _OCS) -> str:
    """A short aligned plain-text table of `cei_metrics` results, with units.

    One row a metric: its ``metrics.json`` key, value, unit and meaning. Missing keys are
    skipped, None shows as ``n/a``. A warning follows when near-zero true coordinates
    make MRE and MRE2 meaningless.

    Example:
        >>> print(format_metrics_table({"n": 2, "ade": 0.1234567, "nll": None}))
        CEI metrics: 2 events
          ade  0.1235  bohr  mean atom distance, posterior mean
          nll     n/a  nats  mean negative log-likelihood of the true positions
    """
    layout = metric_layout(molecule)
    m = layout.molecule
    info_of = metric_info(m)
    header = f"CEI metrics: {metrics.get('n', '?')} events"
    if not is_ocs(m):
        header = f"CEI metrics of {m.name}: {metrics.get('n', '?')} events"
    if metrics.get("n_samples") is not None:
        header += f", {metrics['n_samples']} posterior draws each"
    keys = list(_TABLE_KEYS)
    if not is_ocs(m):
        means = [k for k in ("bond_error", "angle_error_deg") if k in info_of]
        geometry = [*layout.bond_keys, *means, *layout.angle_keys]
        hand = ["handedness_right", "handedness_right_sample"] if layout.chiral else []
        at = keys.index("bond_error_co")
        keys[at : at + 3] = [*dict.fromkeys(geometry), *hand]
    rows: list[tuple[str, str, str, str]] = []
    for key in keys:
        if key not in metrics:
            continue
        unit, meaning = info_of[key].unit, info_of[key].description
        if key == "ade" and all(k in metrics for k in layout.atom_keys):
            per_atom = ", ".join(
                f"{_name([label])} {_fmt(metrics[k])}"
                for label, k in zip(m.labels, layout.atom_keys)
            )
            meaning = f"{meaning} ({per_atom})"
        n_resim = metrics.get("resim_events")
        if key == "resim_residual" and n_resim and n_resim != metrics.get("n"):
            meaning = f"{meaning} ({n_resim} events)"
        rows.append((key, _fmt(metrics[key]), unit, meaning))
    coverage_keys = [k for k in metrics if k.startswith("coverage_")]
    for key in sorted(coverage_keys, key=lambda k: float(k[len("coverage_") :])):
        percent = float(key[len("coverage_") :])
        value = metrics[key]
        shown = "n/a" if value is None else f"{value:.3f}"
        meaning = (
            f"true coordinates inside the central {percent:g} % interval (ideal {percent / 100:g})"
        )
        rows.append((key, shown, "", meaning))
    if "nll" in metrics:
        info = METRIC_INFO["nll"]
        rows.append(("nll", _fmt(metrics["nll"]), info.unit, info.description))

    widths = [max((len(r[c]) for r in rows), default=0) for c in range(3)]
    lines = [header] + [
        f"  {k:<{widths[0]}}  {v:>{widths[1]}}  {u:<{widths[2]}}  {m}" for k, v, u, m in rows
    ]
    n_small = metrics.get("mre_small_coordinates")
    if n_small:
        threshold = metrics.get("mre_small_threshold")
        cut = "" if threshold is None else f" (|x| <= {threshold:.3g} bohr)"
        plural = "s" if n_small != 1 else ""
        lines += [
            f"warning: mre and mre2 are dominated by {n_small} near-zero true "
            f"coordinate{plural}{cut}:",
            "  relative errors divide by ~0 there; read ade, rmsd_com and mse instead",
        ]
    return "\n".join(line.rstrip() for line in lines)


def example_events_table(
    samples: Samples,
    truth: ArrayLike,
    idx: Sequence[int] = (0, 1, 2),
    labels: Sequence[object] | None = None,
    molecule: Molecule | str = _OCS,
) -> str:
    """True and predicted (posterior mean ± std) positions of a few events, per atom.

    Args:
        samples: Posterior draws ``(n, B, 3N)`` or ``draw(start, stop)``, as in
            `cei_metrics`.
        truth: True positions ``(B, 3N)``, bohr.
        idx: The events to list.
        labels: Names printed for those events (e.g. their row in the data file);
            default their indices.
        molecule: The molecule; default OCS. Its declared bonds and angles (and its
            handedness, if chiral) follow the atoms.

    Example:
        >>> x = np.array([[0.0, 0, 0, -2.19, 0, 0, 2.95, 0, 0]])
        >>> print(example_events_table(np.stack([x - 0.1, x + 0.1]), x, [0]))
        event 0
          atom  true (bohr)                 posterior mean ± std (bohr)
          C     ( 0.000,  0.000,  0.000)    ( 0.000 ± 0.100,  0.000 ± 0.100,  0.000 ± 0.100)
          O     (-2.190,  0.000,  0.000)    (-2.190 ± 0.100,  0.000 ± 0.100,  0.000 ± 0.100)
          S     ( 2.950,  0.000,  0.000)    ( 2.950 ± 0.100,  0.000 ± 0.100,  0.000 ± 0.100)
          r_CO, r_CS (bohr), O-C-S angle (deg): true 2.190, 2.950, 180.0; mean 2.190, 2.950, 180.0
    """
    layout = metric_layout(molecule)
    x_true = _flat(truth, "truth", layout)
    draw = _drawer(samples, x_true.shape[0], layout.width)
    idx = [int(i) for i in idx]
    labels = idx if labels is None else list(labels)
    if len(labels) != len(idx):
        raise ValueError(f"labels has {len(labels)} entries for {len(idx)} events")
    blocks = []
    for i, label in zip(idx, labels):
        if not -x_true.shape[0] <= i < x_true.shape[0]:
            raise IndexError(f"event {i} out of range for {x_true.shape[0]} events")
        i %= x_true.shape[0]
        s = draw(i, i + 1)[:, 0]
        mean, std, t = s.mean(0), s.std(0), x_true[i]
        lines = [f"event {label}", f"  atom  {'true (bohr)':<26}  posterior mean ± std (bohr)"]
        names = ATOMS if is_ocs(layout.molecule) else [_name([a]) for a in layout.molecule.labels]
        for a, atom in enumerate(names):
            c = slice(3 * a, 3 * a + 3)
            true_xyz = ", ".join(f"{v:6.3f}" for v in t[c])
            pred_xyz = ", ".join(f"{m:6.3f} ± {d:.3f}" for m, d in zip(mean[c], std[c]))
            lines.append(f"  {atom:<4}  ({true_xyz})    ({pred_xyz})")
        lines.extend(_internal_lines(layout.molecule, t, mean))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _internal_lines(molecule: Molecule, true: np.ndarray, mean: np.ndarray) -> list[str]:
    """The declared bonds and angles (and handedness) of one event: true and mean."""
    if is_ocs(molecule):
        internal = [
            ", ".join(f"{float(v):.3f}" for v in ic[:2]) + f", {float(ic[2]):.1f}"
            for ic in (internal_coordinates(true), internal_coordinates(mean))
        ]
        return [f"  r_CO, r_CS (bohr), O-C-S angle (deg): true {internal[0]}; mean {internal[1]}"]
    labels, lines = molecule.labels, []
    if molecule.bonds:
        names = ", ".join(_name([labels[i], labels[j]]) for i, j in molecule.bonds)
        t, p = bond_lengths(true, molecule.bonds), bond_lengths(mean, molecule.bonds)
        lines.append(
            f"  bonds {names} (bohr): true {', '.join(f'{v:.3f}' for v in t)}; "
            f"mean {', '.join(f'{v:.3f}' for v in p)}"
        )
    if molecule.angles:
        names = ", ".join(_name([labels[n] for n in a]) for a in molecule.angles)
        t, p = bond_angles(true, molecule.angles), bond_angles(mean, molecule.angles)
        lines.append(
            f"  angles {names} (deg): true {', '.join(f'{v:.1f}' for v in t)}; "
            f"mean {', '.join(f'{v:.1f}' for v in p)}"
        )
    if molecule.chirality is not None:
        t, p = (float(handedness(v, *molecule.chirality)) for v in (true, mean))
        lines.append(f"  handedness (triple-product sign): true {t:+.0f}; mean {p:+.0f}")
    return lines
