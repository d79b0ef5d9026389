"""The relative-position tables of the 2-D relative logits (Bello et al., Section 3.2).

    S_W[i, j] = q_i . r^W[jx - ix + W - 1],   S_H[i, j] = q_i . r^H[jy - iy + H - 1]

factorized by key column and key row into per-query tables s_w [HW, W] and s_h [HW, H], so that the
(HW)x(HW) logits never have to be materialized.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relative_offsets_index(size: int, device: torch.device | None = None) -> Tensor:
    """[size, size] long tensor idx[i, j] = j - i + size - 1: the table row of offset j - i."""
    pos = torch.arange(size, device=device)
    return pos[None, :] - pos[:, None] + (size - 1)


def relative_logit_tables(q: Tensor, rel_h: Tensor, rel_w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-query relative logits, factorized by key column and key row.

    q: [B, Nh, H, W, d]; rel_h: [2H-1, d]; rel_w: [2W-1, d].
    Returns (s_w, s_h): s_w[b, n, iy, ix, jx] = q . rel_w[jx - ix + W - 1]  -> [B, Nh, H, W, W]
                        s_h[b, n, iy, ix, jy] = q . rel_h[jy - iy + H - 1]  -> [B, Nh, H, W, H]
    so that S_W[i, j] = s_w[i, jx] and S_H[i, j] = s_h[i, jy]. Cost O(HW (H + W) d).
    """
    h, w = q.shape[2], q.shape[3]
    r_w = rel_w.to(q.dtype)[relative_offsets_index(w, q.device)]  # [W(ix), W(jx), d]
    r_h = rel_h.to(q.dtype)[relative_offsets_index(h, q.device)]  # [H(iy), H(jy), d]
    s_w = torch.einsum("bnyxd,xjd->bnyxj", q, r_w)
    s_h = torch.einsum("bnyxd,yjd->bnyxj", q, r_h)
    return s_w, s_h


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or None: the dtype a backend computes in."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
