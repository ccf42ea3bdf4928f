"""The momentum frame: a rotation known from the measured momenta alone.

CEI is rotation-equivariant: rotating the momenta rotates the positions. The frame
``e1`` along p_S, ``e2`` along the part of p_C orthogonal to ``e1``, ``e3 = e1 x e2`` is
computed from the momenta, so it is available at inference time and removes the nuisance
rotation before a model sees the data. Positions are usually also taken relative to their
centre of mass (:func:`flowrecon.systems.cei.physics.remove_centre_of_mass`); that is a
separate step, the functions here only rotate.

Rotation matrices ``R`` have shape ``(..., 3, 3)`` and rows ``e1, e2, e3``, so a lab vector
maps into the frame as ``v_frame = R @ v_lab``. Like the physics functions, these accept
torch tensors or numpy arrays and return the kind they were given.
"""

from __future__ import annotations

import torch

from flowrecon.systems.cei.physics import (
    Array,
    _check_atoms,
    _check_flat,
    _from_torch,
    _to_torch,
    as_atoms,
    flatten_atoms,
)


def _normalise(v: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``v / |v|`` where ``ok``; elsewhere a finite placeholder, with finite gradients.

    The denominator is replaced by 1 where ``v`` may vanish, so that neither the value nor
    the gradient of the branch that ``torch.where`` discards is ever NaN.
    """
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v / torch.where(ok[..., None], n, torch.ones_like(n))


def momentum_frame(p: Array, tol: float | None = None) -> Array:
    """Rotation matrices into the momentum frame of each event, shape ``(..., 3, 3)``.

    Rows are ``e1`` (along p_S), ``e2`` (along the part of p_C orthogonal to ``e1``) and
    ``e3 = e1 x e2``; ``det R = +1``. Degenerate events get a deterministic frame instead of
    NaN: if p_S is negligible, ``e1`` follows p_O, then p_C, then the lab x axis; if p_C
    is (nearly) parallel to ``e1`` - as for exactly linear OCS, whose momenta are
    collinear - ``e2`` is built from the lab axis least aligned with ``e1``. Away from these
    cases the frame is a smooth, differentiable function of ``p``.

    Args:
        p: Momenta ``(..., 9)`` ordered C, O, S.
        tol: A vector counts as negligible when its length is at most ``tol`` times the
            largest momentum of its event. Defaults to the square root of the dtype's
            machine epsilon (1.5e-8 for float64).

    Example:
        >>> import numpy as np
        >>> p = np.array([0.0, 1, 0, -3, -1, 0, 3, 0, 0])
        >>> momentum_frame(p)
        array([[1., 0., 0.],
               [0., 1., 0.],
               [0., 0., 1.]])
    """
    (pt,), is_numpy = _to_torch(p)
    _check_flat(pt, "p")
    pa = as_atoms(pt)
    if tol is None:
        tol = torch.finfo(pt.dtype).eps ** 0.5
    # The frame does not depend on the momentum scale; dividing by the largest component
    # keeps squares from overflowing or underflowing for any finite input. The scale is a
    # constant for autograd, which is exact because R(p / s) = R(p) for every s > 0.
    scale = pa.detach().abs().amax(dim=(-2, -1), keepdim=True)
    pa = pa / torch.where(scale > 0, scale, torch.ones_like(scale))
    pc, po, ps = pa[..., 0, :], pa[..., 1, :], pa[..., 2, :]
    # After scaling the largest momentum of a non-zero event has length in [1, sqrt(3)].
    big = torch.linalg.vector_norm(pa, dim=-1).amax(-1)
    threshold = tol * big

    lab = torch.eye(3, dtype=pa.dtype, device=pa.device)
    ok_s = torch.linalg.vector_norm(ps, dim=-1) > threshold
    ok_o = torch.linalg.vector_norm(po, dim=-1) > threshold
    ok_c = torch.linalg.vector_norm(pc, dim=-1) > threshold
    a = torch.where(
        ok_s[..., None],
        ps,
        torch.where(ok_o[..., None], po, torch.where(ok_c[..., None], pc, lab[0].expand_as(pc))),
    )
    # Every candidate kept above is longer than the threshold (or is the unit lab axis).
    e1 = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)

    b = pc - (pc * e1).sum(-1, keepdim=True) * e1
    ok_b = torch.linalg.vector_norm(b, dim=-1) > threshold
    # Fallback: the lab axis least aligned with e1 has |axis . e1| <= 1/sqrt(3), so its
    # orthogonal part has length >= sqrt(2/3) and normalises safely. No gradient flows
    # through the argmin, which is fine: a degenerate event has no preferred e2.
    axis = lab[e1.detach().abs().argmin(dim=-1)]
    b_lab = axis - (axis * e1).sum(-1, keepdim=True) * e1
    e2 = torch.where(
        ok_b[..., None],
        _normalise(b, ok_b),
        b_lab / torch.linalg.vector_norm(b_lab, dim=-1, keepdim=True),
    )
    # A second Gram-Schmidt pass: when p_C is nearly parallel to e1, rounding in b leaves
    # e2 off-orthogonal by up to eps / tol; projecting once more brings that down to eps.
    e2 = e2 - (e2 * e1).sum(-1, keepdim=True) * e1
    e2 = e2 / torch.linalg.vector_norm(e2, dim=-1, keepdim=True)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return _from_torch(torch.stack([e1, e2, e3], dim=-2), is_numpy)


def _check_rotation(R: Array) -> None:
    if R.ndim < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3); got {tuple(R.shape)}")


def to_frame(v: Array, R: Array) -> Array:
    """Rotates each atom's 3-vector of flat ``(..., 3N)`` vectors into the frame ``R``.

    ``v`` and ``R`` broadcast over their leading shapes, so posterior samples ``v`` of
    shape ``(n, B, 9)`` work with per-event frames ``R`` of shape ``(B, 3, 3)``.

    Example:
        >>> import numpy as np
        >>> R = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # lab y becomes frame e1
        >>> to_frame(np.array([0.0, 2, 0, 0, 0, 0, 0, 0, 0]), R)[:3]
        array([2., 0., 0.])
    """
    (vt, rt), is_numpy = _to_torch(v, R)
    _check_atoms(vt, "v")
    _check_rotation(rt)
    # Row-vector form: (R @ v_i)^T = v_i^T @ R^T for every atom i at once.
    out = flatten_atoms(as_atoms(vt) @ rt.transpose(-1, -2))
    return _from_torch(out, is_numpy)


def from_frame(v: Array, R: Array) -> Array:
    """Inverse of :func:`to_frame`: frame coordinates back to the lab, ``(..., 3N)``."""
    (vt, rt), is_numpy = _to_torch(v, R)
    _check_atoms(vt, "v")
    _check_rotation(rt)
    # R is orthogonal, so R^-1 = R^T and (R^T @ v_i)^T = v_i^T @ R.
    return _from_torch(flatten_atoms(as_atoms(vt) @ rt), is_numpy)


def _negligible_norm(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1) <= threshold


def molecule_frame(p: Array, reference: tuple[int, int], tol: float | None = None) -> Array:
    """Rotations into the momentum frame of N-atom events, shape ``(..., 3, 3)``.

    The frame of :func:`momentum_frame` for any molecule: ``e1`` along the momentum of
    reference atom ``a``, ``e2`` along the part of atom ``b``'s momentum orthogonal to
    ``e1``, ``e3 = e1 x e2``; rows ``e1, e2, e3``, ``det R = +1``. It is rotation-
    equivariant (``R(p Q^T) = R(p) Q^T``) and a smooth function of ``p`` wherever p_b is
    not parallel to p_a. For OCS with ``reference = (2, 0)`` (S, C) it is
    :func:`momentum_frame`.

    Linear molecules (CO2, N2O) explode into nearly collinear momenta, where the
    azimuth about ``e1`` is fixed only by small perpendicular parts: pick ``(a, b)`` so
    that b's perpendicular part is large (:func:`choose_frame_atoms` picks the pair whose
    momenta are least collinear over a data set; for CO2 the carbon, pushed sideways
    by a bend, defines ``e2``). Degenerate events still get a deterministic, orthonormal
    frame: if p_a is negligible, ``e1`` follows the largest momentum; if p_b has no
    perpendicular part, ``e2`` follows the atom with the largest perpendicular part, and
    if every momentum is collinear, the lab axis least aligned with ``e1``.

    Args:
        p: Momenta ``(..., 3N)``.
        reference: Atom indices ``(a, b)``.
        tol: A vector counts as negligible when its length is at most ``tol`` times the
            largest momentum of its event; default the square root of machine epsilon.

    Example:
        >>> import numpy as np
        >>> p = np.array([0.0, 1, 0, -3, -1, 0, 3, 0, 0])
        >>> bool(np.allclose(molecule_frame(p, (2, 0)), momentum_frame(p)))
        True
    """
    (pt,), is_numpy = _to_torch(p)
    _check_atoms(pt, "p")
    pa = as_atoms(pt)
    n_atoms = pa.shape[-2]
    a, b = (int(i) for i in reference)
    if a == b or not (0 <= a < n_atoms and 0 <= b < n_atoms):
        raise ValueError(
            f"reference must name two different atoms in 0..{n_atoms - 1}, got {reference}"
        )
    if tol is None:
        tol = torch.finfo(pt.dtype).eps ** 0.5
    # Scale-free, as in momentum_frame: R(p / s) = R(p) for every s > 0.
    scale = pa.detach().abs().amax(dim=(-2, -1), keepdim=True)
    pa = pa / torch.where(scale > 0, scale, torch.ones_like(scale))
    norms = torch.linalg.vector_norm(pa, dim=-1)  # (..., N)
    threshold = tol * norms.amax(-1)
    lab = torch.eye(3, dtype=pa.dtype, device=pa.device)

    # e1: p_a, else the largest momentum, else the lab x axis.
    largest = torch.gather(pa, -2, norms.argmax(-1)[..., None, None].expand(*pa.shape[:-2], 1, 3))
    first = torch.where((norms[..., a] > threshold)[..., None], pa[..., a, :], largest[..., 0, :])
    first = torch.where(_negligible_norm(first, threshold)[..., None], lab[0], first)
    e1 = first / torch.linalg.vector_norm(first, dim=-1, keepdim=True)

    # e2: the part of p_b orthogonal to e1, else the largest such part, else a lab axis.
    perp = pa - (pa * e1[..., None, :]).sum(-1, keepdim=True) * e1[..., None, :]
    perp_norms = torch.linalg.vector_norm(perp, dim=-1)
    best = torch.gather(
        perp, -2, perp_norms.argmax(-1)[..., None, None].expand(*pa.shape[:-2], 1, 3)
    )[..., 0, :]
    ok_b = perp_norms[..., b] > threshold
    ok_best = perp_norms.amax(-1) > threshold
    axis = lab[e1.detach().abs().argmin(dim=-1)]
    b_lab = axis - (axis * e1).sum(-1, keepdim=True) * e1
    second = torch.where(
        ok_b[..., None], perp[..., b, :], torch.where(ok_best[..., None], best, b_lab)
    )
    # Every candidate is longer than the threshold (or the lab axis, >= sqrt(2/3)).
    e2 = second / torch.linalg.vector_norm(second, dim=-1, keepdim=True)
    # A second Gram-Schmidt pass keeps e2 orthogonal to machine precision.
    e2 = e2 - (e2 * e1).sum(-1, keepdim=True) * e1
    e2 = e2 / torch.linalg.vector_norm(e2, dim=-1, keepdim=True)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return _from_torch(torch.stack([e1, e2, e3], dim=-2), is_numpy)


def mirrored(R: Array, p: Array, atom: int) -> Array:
    """The frame ``R`` with ``e3`` reversed where atom ``atom``'s momentum has ``p . e3 < 0``.

    Coulomb dynamics commutes with reflections, so a frame may be improper as well as
    rotated: with the sign of ``e3`` taken from a third atom's momentum, both mirror images
    of a non-planar molecule (the two enantiomers of CHBrClF, the two ways the hydrogens
    of CH2I2 can sit) land on the same side of the ``e1 e2`` plane. In the plain frame the
    out-of-plane coordinates take either sign depending on the event, a two-valued
    function of the momenta that a model must learn; reflected, they are one-signed. The
    rows stay orthonormal (``det R = -1`` where reflected), so :func:`to_frame` and
    :func:`from_frame` work unchanged and the transform's ``log|det|`` stays 0. Events with
    ``p . e3 = 0`` keep ``e3``.

    Args:
        R: Frames ``(..., 3, 3)`` (rows ``e1, e2, e3``).
        p: Momenta ``(..., 3N)`` of the same events.
        atom: Index of the atom whose momentum fixes the sign of ``e3``.

    Example:
        >>> import numpy as np
        >>> p = np.array([1.0, 0, 0, 0, 1, 0, 0, 0, -1, -1, -1, 1])
        >>> R = molecule_frame(p, (0, 1))
        >>> mirrored(R, p, 2)[2].tolist()
        [-0.0, -0.0, -1.0]
    """
    (rt, pt), is_numpy = _to_torch(R, p)
    _check_rotation(rt)
    _check_atoms(pt, "p")
    n_atoms = pt.shape[-1] // 3
    if not 0 <= int(atom) < n_atoms:
        raise ValueError(f"the mirror atom must be an index in 0..{n_atoms - 1}, got {atom}")
    side = (as_atoms(pt)[..., int(atom), :] * rt[..., 2, :]).sum(-1)
    sign = torch.where(side < 0, -1.0, 1.0).to(rt.dtype)
    out = torch.cat([rt[..., :2, :], rt[..., 2:, :] * sign[..., None, None]], dim=-2)
    return _from_torch(out, is_numpy)


def choose_mirror_atom(p: Array, reference: tuple[int, int], threshold: float = 0.05) -> int | None:
    """The atom whose momentum best fixes the side of the frame plane, or None if planar.

    Every atom but the reference pair is scored by the median over events of
    ``|p . e3| / |p|`` in the frame of ``reference``. The best one is returned if its
    score is at least ``threshold``; a planar molecule (every triatomic, whose momenta
    stay in the plane of its atoms) scores about 0, or the relative noise of its momenta,
    and gets None: no reflection.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> p = rng.normal(size=(100, 12))   # four atoms, momenta in every direction
        >>> choose_mirror_atom(p, (0, 1)) in (2, 3)
        True
        >>> p[:, 2::3] = 0.0                 # every momentum in the xy plane
        >>> choose_mirror_atom(p, (0, 1)) is None
        True
    """
    (pt,), _ = _to_torch(p)
    _check_atoms(pt, "p")
    pa = pt.reshape(-1, pt.shape[-1]).detach().double()
    if pa.shape[0] == 0:
        raise ValueError("choose_mirror_atom needs at least one event")
    e3 = molecule_frame(pa, reference)[..., 2, :]
    atoms = as_atoms(pa)
    best, best_score = None, float(threshold)
    for c in range(atoms.shape[-2]):
        if c in reference:
            continue
        norm = torch.linalg.vector_norm(atoms[:, c], dim=-1)
        ratio = (atoms[:, c] * e3).sum(-1).abs() / norm.clamp_min(torch.finfo(pa.dtype).tiny)
        score = float(ratio.median())
        if score >= best_score + (1e-12 if best is not None else 0.0):
            best, best_score = c, score
    return best


def choose_frame_atoms(p: Array) -> tuple[int, int]:
    """The reference atoms ``(a, b)`` whose momenta are least collinear over a data set.

    Over events ``p`` ``(B, 3N)``, every ordered pair is scored by the median of
    ``|sin|`` of the angle between p_a and p_b: the larger it is, the better p_b's
    perpendicular part fixes ``e2`` against noise (a frame's angular error is about the
    momentum resolution over that sine). ``a`` is the one of the best pair with the larger
    median momentum. Ties go to the lower indices, so the choice is deterministic.

    Example:
        >>> import numpy as np
        >>> p = np.array([[0.0, 1, 0, -3, -0.2, 0, 3, -0.8, 0]] * 4)  # C sideways, O, S
        >>> choose_frame_atoms(p)   # O (the larger momentum) and C
        (1, 0)
    """
    (pt,), _ = _to_torch(p)
    _check_atoms(pt, "p")
    pa = as_atoms(pt.reshape(-1, pt.shape[-1]).detach()).double()
    if pa.shape[0] == 0:
        raise ValueError("choose_frame_atoms needs at least one event")
    n_atoms = pa.shape[-2]
    norms = torch.linalg.vector_norm(pa, dim=-1)
    size = norms.median(0).values
    best, best_score = (0, 1), -1.0
    for i in range(n_atoms):
        for j in range(i + 1, n_atoms):
            cross = torch.linalg.vector_norm(torch.linalg.cross(pa[:, i], pa[:, j], dim=-1), dim=-1)
            sine = cross / (norms[:, i] * norms[:, j]).clamp_min(torch.finfo(pa.dtype).tiny)
            score = float(sine.median())
            if score > best_score + 1e-12:
                best_score = score
                best = (i, j) if size[i] >= size[j] else (j, i)
    return best
