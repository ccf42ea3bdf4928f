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
    """Rotates each atom's 3-vector of flat ``(..., 9)`` vectors into the frame ``R``.

    ``v`` and ``R`` broadcast over their leading shapes, so posterior samples ``v`` of
    shape ``(n, B, 9)`` work with per-event frames ``R`` of shape ``(B, 3, 3)``.

    Example:
        >>> import numpy as np
        >>> R = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # lab y becomes frame e1
        >>> to_frame(np.array([0.0, 2, 0, 0, 0, 0, 0, 0, 0]), R)[:3]
        array([2., 0., 0.])
    """
    (vt, rt), is_numpy = _to_torch(v, R)
    _check_flat(vt, "v")
    _check_rotation(rt)
    # Row-vector form: (R @ v_i)^T = v_i^T @ R^T for every atom i at once.
    out = flatten_atoms(as_atoms(vt) @ rt.transpose(-1, -2))
    return _from_torch(out, is_numpy)


def from_frame(v: Array, R: Array) -> Array:
    """Inverse of :func:`to_frame`: frame coordinates back to the lab, ``(..., 9)``."""
    (vt, rt), is_numpy = _to_torch(v, R)
    _check_flat(vt, "v")
    _check_rotation(rt)
    # R is orthogonal, so R^-1 = R^T and (R^T @ v_i)^T = v_i^T @ R.
    return _from_torch(flatten_atoms(as_atoms(vt) @ rt), is_numpy)
