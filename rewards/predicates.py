"""Success predicates: pure torch functions over batched simulator state (CPU or GPU backends).

Inputs are batched tensors: positions ``[N, 3]``, finger gaps ``[N]``; outputs are bool ``[N]``.
Predicates compose with ``&`` / ``|``; see :mod:`vla_rl.rewards.outcome`.
"""

from __future__ import annotations

import torch


def lifted(obj_pos: torch.Tensor, height: float) -> torch.Tensor:
    """The object's centre is above ``height`` (table top is z = 0)."""
    return obj_pos[:, 2] > height


def in_region(obj_pos: torch.Tensor, center: torch.Tensor, half_extent, max_z: float | None = None) -> torch.Tensor:
    """The object's centre lies in an axis-aligned xy box around ``center`` (and below ``max_z``)."""
    half = torch.as_tensor(half_extent, dtype=obj_pos.dtype, device=obj_pos.device)
    inside = ((obj_pos[:, :2] - center[:, :2]).abs() <= half).all(-1)
    if max_z is not None:
        inside &= obj_pos[:, 2] <= center[:, 2] + max_z
    return inside


def grasped(
    obj_pos: torch.Tensor,
    tcp_pos: torch.Tensor,
    finger_gap: torch.Tensor,
    obj_width: float,
    tol: float = 0.03,
    slack: float = 0.012,
) -> torch.Tensor:
    """The object sits between the fingers (near the tool centre point) and the fingers are closed on it.

    ``finger_gap`` is the distance between the finger inner faces; "closed on it" means the gap is
    no wider than the object plus ``slack`` (an empty closed gripper would be narrower still, so we
    also require the object near the tcp).
    """
    near = (obj_pos - tcp_pos).norm(dim=-1) < tol
    closed = finger_gap < obj_width + slack
    return near & closed


def released(finger_gap: torch.Tensor, obj_width: float, margin: float = 0.015) -> torch.Tensor:
    """The gripper is open wider than the object by ``margin`` (it cannot be holding it)."""
    return finger_gap > obj_width + margin
