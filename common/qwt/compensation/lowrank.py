"""Reduced-rank compensation (``QwTConfig.rank``): the best rank-r map from the dense fit's own statistics.

The dense fit minimises f(Θ) = ‖T − AΘ‖² + λ‖Θ‖² over Θ ((d+1)×o, the bias as last row; A = [x, 1]) with
Θ* = (G + λI)⁻¹AᵀT, G = AᵀA. Expanding around Θ*, f(Θ) = f(Θ*) + tr((Θ−Θ*)ᵀ(G+λI)(Θ−Θ*)) =
f(Θ*) + ‖M(Θ−Θ*)‖²_F with M = (G+λI)^½. Under rank(Θ) ≤ r this is the Eckart–Young problem for MΘ*: the best
rank-r approximation keeps MΘ*'s top-r right singular vectors V_r, i.e. the top-r eigenvectors of the o×o matrix
Θ*ᵀ(G+λI)Θ*, and Θ_r = Θ* V_r V_rᵀ (reduced-rank regression). Nothing beyond G, AᵀT and λ is needed, so the rank-r
map costs no extra pass over the data, and its weight is stored as two thin factors W V_r (C_in×r) and V_rᵀ
(r×C_out): r·(C_in + C_out) numbers instead of C_in·C_out. Truncating Θ*'s own SVD instead would ignore how the
features are spread (the metric G+λI) and fits worse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ReducedRank:
    """Θ_r = ``down`` @ ``up`` in FP64: ``down`` = Θ* V_r ((d+1)×r, the bias's coordinates in its last row),
    ``up`` = V_rᵀ (r×o); ``energy_kept`` is the share of tr(Θ*ᵀ(G+λI)Θ*) the r directions keep (1: nothing lost)."""

    down: torch.Tensor
    up: torch.Tensor
    energy_kept: float

    @property
    def theta(self) -> torch.Tensor:
        return self.down @ self.up


def stored_rank(rank: int, unknowns: int, outputs: int) -> int:
    """The rank the factors are stored with: ``rank``, capped where Θ* cannot have more (its rows, d+1, or its
    columns, o); at or above the cap the rank-r map is the dense one."""
    return min(rank, unknowns, outputs)


@torch.no_grad()
def reduced_rank(theta: torch.Tensor, lhs: torch.Tensor, rank: int) -> ReducedRank:
    """The rank-``rank`` minimiser of the ridge objective whose solution is ``theta`` (Θ*, (d+1)×o) and whose
    normal matrix is ``lhs`` (G + λI, (d+1)×(d+1)), both FP64 (see the module docstring)."""
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    energy = theta.T @ lhs @ theta
    values, vectors = torch.linalg.eigh((energy + energy.T) / 2)  # symmetrised: eigh reads one triangle
    r = stored_rank(rank, *theta.shape)
    top = vectors[:, -r:].flip(-1)  # eigh sorts ascending: the largest r, largest first
    total = float(values.clamp_min(0).sum())
    kept = float(values[-r:].clamp_min(0).sum()) / total if total > 0 else 1.0
    return ReducedRank(down=theta @ top, up=top.T.contiguous(), energy_kept=kept)
