"""Physics refinement: polish geometries until their simulated explosion matches the data.

For noise-free momenta the inverse problem has an exact answer: positions whose
explosion reproduces the observed momenta. `refine` finds it by batched
Levenberg-Marquardt on the momentum residual, started from posterior samples (which are
already close), and `distinct_solutions` merges the samples that converge to the same
geometry, so an event with two or three geometries that explain its momenta shows them
all.

Parametrisation: the six relative coordinates r_CO = x_O - x_C and r_CS = x_S - x_C; the
centre of mass, which momenta cannot observe, stays where the starting geometry had it.

Jacobians come from forward differences of the simulator on a coarse step grid (12
instead of 56 steps, accurate to ~1e-4): the base geometry and its six displaced copies
run as one batch through the fused simulator, about four times cheaper than reverse-mode
autograd through the same grid. The residual always comes from the full-accuracy
simulator, so the iteration converges to the exact solution of the full simulator; an
approximate Jacobian only makes it converge linearly instead of quadratically, with a
rate of about the Jacobian's relative error.
Because the Jacobian changes little near the solution, it is recomputed only for events
whose last step did not cut their squared residual at least a hundredfold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flowrecon.systems.cei.constants import DEFAULT_CHARGES, MASSES
from flowrecon.systems.cei.simulator import IntegratorSettings, asymptotic_momenta

__all__ = [
    "JACOBIAN_SETTINGS",
    "RefineResult",
    "RefinedPosterior",
    "Solutions",
    "distinct_solutions",
    "refine",
    "refine_posterior",
    "solution_log_mass",
]

#: The coarse grid used for Jacobians only.
JACOBIAN_SETTINGS = IntegratorSettings(steps=12, sigma_end=7.0, grid_power=1.5)

# A step that cuts the squared residual by less than this factor renews the Jacobian: a
# good frozen Jacobian cuts it by ~1e-6 a step (its relative error, squared), so anything
# short of 1e-2 means it has gone stale.
_SLOW = 1e-2
# Levenberg-Marquardt damping (relative to diag(J^T J)): start, and factors after a good
# and after a failed step. Starts from posterior samples are close, so the iteration
# starts nearly as Gauss-Newton and relaxes the damping fast: damping that lingers holds
# back the weakly determined direction of nearly folded geometries (ill-conditioned
# J^T J), which then creeps to the solution by a factor of ~3 an iteration. Measured on
# 2,000 posterior means of a zuko-nsf model: 6.8 iterations an event with (1e-3, 1/3),
# 3.9 with these; starts 0.05 bohr off still all converge (1e-6 loses 2 %).
_LAM0, _LAM_DOWN, _LAM_UP = 1e-4, 0.1, 4.0


@dataclass(frozen=True)
class RefineResult:
    """Refined geometries and how well they explain the momenta.

    Attributes:
        positions: refined positions (B, 9), bohr.
        residual: |p_sim - p_obs| / |p_obs| per event (norms of the 9-vectors).
        converged: residual below the tolerance.
        iterations: Levenberg-Marquardt iterations each event used.
    """

    positions: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor


def _masses(masses: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(masses, dtype=like.dtype, device=like.device)


def _to_relative(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 9) positions -> relative coordinates (B, 6) and centre of mass (B, 3)."""
    a = x.reshape(-1, 3, 3)
    com = (m[:, None] * a).sum(1) / m.sum()
    return torch.cat([a[:, 1] - a[:, 0], a[:, 2] - a[:, 0]], 1), com


def _to_positions(q: torch.Tensor, com: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r1, r2 = q[:, :3], q[:, 3:]
    c = com - (m[1] * r1 + m[2] * r2) / m.sum()
    return torch.cat([c, c + r1, c + r2], 1)


#: Finite-difference step of the Jacobian, bohr. The coarse simulator is a smooth map
#: (a fixed grid, no step-size control), so a forward difference is accurate to about
#: h |f''| ~ 1e-6 relative plus round-off ~ 1e-15 / h ~ 1e-9: far below the 1e-4 by which
#: the coarse grid itself differs from the full one.
_FD_STEP = 1e-6


def _jacobian(
    q: torch.Tensor,
    com: torch.Tensor,
    m: torch.Tensor,
    charges: Sequence[float],
    compile: bool,
    settings: IntegratorSettings | None = JACOBIAN_SETTINGS,
) -> torch.Tensor:
    """d p / d q on the coarse grid (or ``settings``), (B, 9, 6), by forward differences.

    The base geometry and its six displaced copies go through the coarse simulator as one
    batch of 7B events: no autograd graph, and on CPU the fused (compiled) planar path,
    which is several times cheaper than reverse mode through the eager 3-D path.
    """
    b = q.shape[0]
    steps = torch.cat([torch.zeros(1, 6, dtype=q.dtype, device=q.device),
                       _FD_STEP * torch.eye(6, dtype=q.dtype, device=q.device)])  # fmt: skip
    qq = (q[None] + steps[:, None]).reshape(7 * b, 6)
    p = asymptotic_momenta(
        _to_positions(qq, com.repeat(7, 1), m),
        charges=charges,
        masses=m.tolist(),
        settings=settings,
        compile=compile,
    ).reshape(7, b, 9)
    return ((p[1:] - p[0]) / _FD_STEP).permute(1, 2, 0)


def refine(
    positions: torch.Tensor | np.ndarray,
    momenta: torch.Tensor | np.ndarray,
    *,
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    tol: float = 1e-9,
    max_iter: int = 25,
    compile: bool | None = None,
    jacobian_chunk: int = 16384,
) -> RefineResult:
    """Levenberg-Marquardt on |simulate(x) - p_obs|, batched over events.

    Args:
        positions: starting geometries (B, 9), bohr (e.g. posterior samples).
        momenta: observed momenta (B, 9), a.u.; row i is the target of geometry i.
        charges: ion charges (C, O, S).
        masses: ion masses in electron masses.
        tol: relative momentum residual at which an event counts as converged.
        max_iter: iteration limit.
        compile: fuse the simulator (see `asymptotic_momenta`); None: on CPU from
            16,384 events.
        jacobian_chunk: events per Jacobian pass (each runs seven coarse simulations).

    Returns:
        A `RefineResult` on the input's device (float64).

    Example:
        >>> from flowrecon.systems.cei.geometry import sample_ocs
        >>> x = sample_ocs(4, torch.Generator().manual_seed(0))
        >>> p = asymptotic_momenta(x)
        >>> res = refine(x + 0.02, p)        # a shifted start; the shift is a pure COM move
        >>> bool(res.converged.all())
        True
    """
    x0 = torch.as_tensor(positions, dtype=torch.float64)
    p_obs = torch.as_tensor(momenta, dtype=torch.float64, device=x0.device)
    if x0.shape != p_obs.shape or x0.shape[-1:] != (9,) or x0.dim() != 2:
        raise ValueError(
            f"positions and momenta must both have shape (B, 9); got {tuple(x0.shape)} and "
            f"{tuple(p_obs.shape)}"
        )
    m = _masses(masses, x0)
    q, com = _to_relative(x0, m)
    n = q.shape[0]
    if compile is None:
        # The residual is simulated about ten times an event: fusing pays off earlier
        # than for a single simulation.
        compile = x0.device.type == "cpu" and n >= 16384

    def simulate(qq: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        return asymptotic_momenta(
            _to_positions(qq, cc, m), charges=charges, masses=masses, compile=compile
        )

    scale = p_obs.norm(dim=1).clamp_min(1e-300)
    r = simulate(q, com) - p_obs
    cost = (r * r).sum(1)
    lam = torch.full((n,), _LAM0, dtype=q.dtype, device=q.device)
    jac = torch.zeros(n, 9, 6, dtype=q.dtype, device=q.device)
    stale = torch.ones(n, dtype=torch.bool, device=q.device)  # needs a new Jacobian
    fresh = torch.zeros(n, dtype=torch.bool, device=q.device)  # Jacobian taken at q
    iterations = torch.zeros(n, dtype=torch.long, device=q.device)
    converged = cost.sqrt() / scale < tol
    rejected = torch.zeros(n, dtype=torch.long, device=q.device)  # consecutive failures
    for _ in range(max_iter):
        # An event whose damping had to grow 4^6-fold in a row is stuck: give it up, so
        # that a few hopeless starts do not keep the whole batch iterating.
        active = (~converged & (rejected < 6)).nonzero().flatten()
        if active.numel() == 0:
            break
        renew = active[stale[active]]
        # Reverse mode keeps the coarse graph of every event: bound it by chunks.
        for chunk in renew.split(jacobian_chunk) if renew.numel() else ():
            jac[chunk] = _jacobian(q[chunk], com[chunk], m, charges, compile)
        stale[renew] = False
        fresh[renew] = True
        ja, ra = jac[active], r[active]
        a = ja.transpose(1, 2) @ ja
        g = (ja.transpose(1, 2) @ ra[:, :, None])[..., 0]
        damping = lam[active, None, None] * torch.diag_embed(torch.diagonal(a, dim1=1, dim2=2))
        try:
            step = torch.linalg.solve(a + damping, -g)
        except torch._C._LinAlgError:  # a singular system: fall back to least squares
            step = torch.linalg.lstsq(a + damping, -g[..., None]).solution[..., 0]
        q_try = q[active] + step
        r_try = simulate(q_try, com[active]) - p_obs[active]
        cost_try = (r_try * r_try).sum(1)
        better = torch.isfinite(cost_try) & (cost_try < cost[active])
        keep = active[better]
        # Slow progress (squared residual not cut by _SLOW) means the Jacobian, frozen
        # since it was last computed, is off; unless it was taken at this very point.
        slow = ~better | (cost_try > _SLOW * cost[active])
        stale[active[slow & (better | ~fresh[active])]] = True
        fresh[keep] = False
        q[keep], r[keep], cost[keep] = q_try[better], r_try[better], cost_try[better]
        lam[active] = torch.where(better, lam[active] * _LAM_DOWN, lam[active] * _LAM_UP).clamp(
            1e-15, 1e10
        )
        rejected[active] = torch.where(better, 0, rejected[active] + 1)
        iterations[active] += 1
        converged = cost.sqrt() / scale < tol
    return RefineResult(
        positions=_to_positions(q, com, m),
        residual=cost.sqrt() / scale,
        converged=converged,
        iterations=iterations,
    )


@dataclass(frozen=True)
class Solutions:
    """The distinct geometries found for one event.

    Attributes:
        positions: (S, 9) geometries, bohr, ordered by how many samples reached them.
        residual: (S,) relative momentum residual of each.
        count: (S,) how many refined samples converged to each.
        labels: (K,) which solution each sample reached (-1: it did not converge).
    """

    positions: np.ndarray
    residual: np.ndarray
    count: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.count)


def distinct_solutions(
    refined: torch.Tensor | np.ndarray,
    residual: torch.Tensor | np.ndarray,
    converged: torch.Tensor | np.ndarray,
    *,
    masses: Sequence[float] = MASSES,
    merge_tol: float = 1e-4,
) -> Solutions:
    """Merge the converged samples of ONE event that reached the same geometry.

    Two geometries are the same when every atom, after removing the centre of mass,
    lies within ``merge_tol`` bohr. Unconverged samples are ignored.

    Args:
        refined: refined positions of the event's K samples, (K, 9).
        residual: their residuals, (K,).
        converged: their convergence flags, (K,).
        masses: for the centre of mass.
        merge_tol: distance below which two solutions are one, bohr.
    """
    original = np.asarray(torch.as_tensor(refined).cpu(), dtype=float).reshape(-1, 9)
    res = np.asarray(torch.as_tensor(residual).cpu(), dtype=float)
    ok = np.asarray(torch.as_tensor(converged).cpu(), dtype=bool)
    m = np.asarray(masses, dtype=float)
    x = original.reshape(-1, 3, 3)
    x = x - (m[None, :, None] * x).sum(1, keepdims=True) / m.sum()
    reps: list[int] = []
    members: list[list[int]] = []
    for i in np.flatnonzero(ok):
        for j, rep in enumerate(reps):
            if np.linalg.norm(x[i] - x[rep], axis=-1).max() < merge_tol:
                members[j].append(i)
                break
        else:
            reps.append(i)
            members.append([i])
    order = np.argsort([-len(g) for g in members], kind="stable")
    best = [min(members[j], key=lambda i: res[i]) for j in order]
    labels = np.full(len(original), -1, dtype=int)
    for label, j in enumerate(order):
        labels[members[j]] = label
    return Solutions(
        positions=original[best] if best else np.zeros((0, 9)),
        residual=res[best] if best else np.zeros(0),
        count=np.array([len(members[j]) for j in order], dtype=int),
        labels=labels,
    )


@dataclass(frozen=True)
class RefinedPosterior:
    """Refinement of K posterior samples for each of B events.

    Attributes:
        samples: refined samples (M, B, 9), the first M of the K given (M = K unless
            ``refine_samples`` said fewer); unconverged ones are left where they ended.
        residual: (M, B) relative momentum residuals.
        converged: (M, B) flags.
        best: (B, 9) each event's refined prediction: the refined posterior mean (which
            lies nearer the heavier mode when the posterior has several), else the
            solution most samples reached, else the raw posterior mean.
        best_residual: (B,) relative momentum residual of ``best`` (inf where nothing
            converged).
        n_solutions: (B,) distinct solutions found per event.
        seconds: wall time of the refinement.
    """

    samples: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    best: np.ndarray
    best_residual: np.ndarray
    n_solutions: np.ndarray
    seconds: float

    def atom_error(self, truth: np.ndarray, masses: Sequence[float] = MASSES) -> np.ndarray:
        """(B,) largest atom distance of ``best`` from ``truth``, bohr.

        Both centres of mass are removed first: momenta cannot observe them.
        """
        return _atom_distance(self.best, truth, masses)

    def nearest_solution_error(
        self, truth: np.ndarray, masses: Sequence[float] = MASSES
    ) -> np.ndarray:
        """(B,) largest atom distance from ``truth`` of the nearest exact solution found.

        Considers ``best`` and every converged refined sample: an event whose momenta two
        geometries explain equally well counts as recovered when the true one is among
        the solutions reported, although ``best`` may be the other.
        """
        per_sample = np.where(self.converged, _atom_distance(self.samples, truth, masses), np.inf)
        return np.minimum(self.atom_error(truth, masses), per_sample.min(0, initial=np.inf))


def _atom_distance(x: np.ndarray, truth: np.ndarray, masses: Sequence[float]) -> np.ndarray:
    """Largest atom distance between geometries ``(..., B, 9)`` and ``truth`` ``(B, 9)``,
    centres of mass removed, shape ``(..., B)``."""
    from flowrecon.systems.cei.physics import remove_centre_of_mass

    diff = remove_centre_of_mass(np.asarray(x, dtype=float), masses) - remove_centre_of_mass(
        np.asarray(truth, dtype=float), masses
    )
    return np.linalg.norm(diff.reshape(*diff.shape[:-1], 3, 3), axis=-1).max(-1)


def solution_log_mass(
    positions: np.ndarray | torch.Tensor,
    log_prior: Callable[[np.ndarray], np.ndarray],
    *,
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
) -> np.ndarray:
    """Log posterior mass of exact solutions x_s of one event, up to a common constant.

    With noise-free momenta p = f(q) the posterior is a sum of point masses at the
    solutions, each weighing prior(q_s) / sqrt(det J_s^T J_s), J_s = dp/dq (the momenta
    span six dimensions, like q): a solution where the momenta change fast with the
    geometry is less probable. ``log_prior`` must be a density over the relative
    coordinates (as `flowrecon.systems.cei.likelihood.ocs_log_prior` is), so that
    the two factors refer to the same coordinates.

    Args:
        positions: solutions (S, 9), bohr.
        log_prior: log prior density of geometries (S, 9) -> (S,).
    """
    x = torch.as_tensor(np.asarray(torch.as_tensor(positions).cpu(), dtype=float))
    m = _masses(masses, x)
    q, com = _to_relative(x, m)
    jac = _jacobian(q, com, m, charges, compile=False, settings=None)  # the full grid
    log_volume = 0.5 * torch.logdet(jac.transpose(1, 2) @ jac).numpy()
    return np.asarray(log_prior(x.numpy()), dtype=float) - log_volume


def refine_posterior(
    samples: np.ndarray | torch.Tensor,
    momenta: np.ndarray | torch.Tensor,
    *,
    charges: Sequence[float] = DEFAULT_CHARGES,
    masses: Sequence[float] = MASSES,
    tol: float = 1e-9,
    merge_tol: float = 1e-4,
    chunk_size: int = 1 << 17,
    compile: bool | None = None,
    refine_samples: int | None = None,
    log_prior: Callable[[np.ndarray], np.ndarray] | None = None,
) -> RefinedPosterior:
    """Refine K posterior samples per event and merge those that reach one geometry.

    Args:
        samples: posterior samples (K, B, 9), bohr (e.g. from ``model.sample``).
        momenta: observed momenta (B, 9), a.u.
        charges: ion charges (C, O, S).
        masses: ion masses in electron masses.
        tol: convergence tolerance of the relative momentum residual.
        merge_tol: samples closer than this (bohr, every atom) are one solution.
        chunk_size: samples refined together.
        compile: see `asymptotic_momenta`.
        refine_samples: refine only the first this many samples (all by default); the
            posterior mean of all K is always refined too.
        log_prior: log density of the geometry prior over relative coordinates (e.g.
            `flowrecon.systems.cei.likelihood.ocs_log_prior`). When given, an event with
            several solutions takes the one of largest posterior mass
            (`solution_log_mass`) as ``best``; without it, the refined posterior mean.
    """
    import time

    raw = np.asarray(torch.as_tensor(samples).cpu(), dtype=float)
    p = np.asarray(torch.as_tensor(momenta).cpu(), dtype=float)
    # The posterior mean is refined too, as an extra start: on 5,000 noise-free test
    # events it recovered the true geometry more often (99.1 %) than a single sample
    # (98.6 %), since for a two-mode posterior it sits nearer the heavier mode.
    m = raw.shape[0] if refine_samples is None else min(refine_samples, raw.shape[0])
    xs = np.concatenate([raw.mean(0, keepdims=True), raw[:m]])
    k, b = xs.shape[:2]
    flat_x = xs.reshape(k * b, 9)
    flat_p = np.tile(p, (k, 1))  # row j * b + i is event i, like flat_x
    out_x = np.empty_like(flat_x)
    out_r = np.empty(k * b)
    out_c = np.empty(k * b, dtype=bool)
    t0 = time.perf_counter()
    for start in range(0, k * b, chunk_size):
        stop = min(start + chunk_size, k * b)
        res = refine(
            torch.from_numpy(flat_x[start:stop]),
            torch.from_numpy(flat_p[start:stop]),
            charges=charges,
            masses=masses,
            tol=tol,
            compile=compile,
        )
        out_x[start:stop] = res.positions.cpu().numpy()
        out_r[start:stop] = res.residual.cpu().numpy()
        out_c[start:stop] = res.converged.cpu().numpy()
    seconds = time.perf_counter() - t0
    refined_all = out_x.reshape(k, b, 9)
    residual_all = out_r.reshape(k, b)
    converged_all = out_c.reshape(k, b)
    best = np.where(converged_all[0, :, None], refined_all[0], xs[0])
    best_residual = np.where(converged_all[0], residual_all[0], np.inf)
    n_solutions = np.zeros(b, dtype=int)
    for i in range(b):
        if converged_all[:, i].any():
            sol = distinct_solutions(
                refined_all[:, i],
                residual_all[:, i],
                converged_all[:, i],
                masses=masses,
                merge_tol=merge_tol,
            )
            if log_prior is not None and len(sol) > 1:
                j = int(np.argmax(solution_log_mass(sol.positions, log_prior, charges=charges,
                                                    masses=masses)))  # fmt: skip
                best[i], best_residual[i] = sol.positions[j], sol.residual[j]
            elif not converged_all[0, i]:
                best[i], best_residual[i] = sol.positions[0], sol.residual[0]
            n_solutions[i] = len(sol)
    return RefinedPosterior(
        refined_all[1:],
        residual_all[1:],
        converged_all[1:],
        best,
        best_residual,
        n_solutions,
        seconds,
    )
