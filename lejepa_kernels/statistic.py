"""The Epps-Pulley statistic from ECF sums, and its reductions: shared by the seed directions'
path (`functional`) and the blockwise one (`blockwise`)."""

from __future__ import annotations

import torch


def ecf_distance(
    cos_sums: torch.Tensor,
    sin_sums: torch.Tensor,
    n_rows: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    unbiased: bool = False,
) -> torch.Tensor:
    """The Epps-Pulley statistic over n, (*, S): sum_k w_k |phi_hat(t_k) - phi(t_k)|^2 from (*, S, T)
    ECF sums over n_rows (*) rows per group (see `epps_pulley_statistic`); phi, weights: [T]."""
    n = n_rows[..., None, None]
    cos_mean, sin_mean = cos_sums / n, sin_sums / n
    err = (cos_mean - phi).square() + sin_mean.square()
    if unbiased:
        # (n |phi_hat|^2 - 1) / (n - 1) - |phi_hat|^2, written so that nothing cancels
        err = err - (1 - cos_mean.square() - sin_mean.square()) / (n - 1)
    return err @ weights


def epps_pulley_statistic(
    cos_sums: torch.Tensor,
    sin_sums: torch.Tensor,
    n_rows: torch.Tensor,
    phi: torch.Tensor,
    weights: torch.Tensor,
    unbiased: bool = False,
) -> torch.Tensor:
    """The Epps-Pulley statistic per group and slice, (*, S), from (*, S, T) ECF sums over
    n_rows (*) rows per group; phi, weights: [T].

    stat = n sum_k w_k |phi_hat(t_k) - phi(t_k)|^2 with phi_hat = (cos_sums + i sin_sums) / n.
    unbiased: |phi_hat|^2 in it is replaced by its unbiased estimate
    (|cos_sums + i sin_sums|^2 - n) / (n (n - 1)), that is, (n |phi_hat|^2 - 1) / (n - 1); the
    statistic then has expectation exactly n sum_k w_k |phi_X(t_k) - phi(t_k)|^2 for n i.i.d.
    rows of characteristic function phi_X (0 under the null), where the plug-in's adds
    sum_k w_k (1 - |phi_X(t_k)|^2). Needs n >= 2.
    """
    return ecf_distance(cos_sums, sin_sums, n_rows, phi, weights, unbiased) * n_rows[..., None]


def reduce_statistic(statistic: torch.Tensor, reduction: str) -> torch.Tensor:
    """The (*, S) statistics' mean ("mean": the seed's loss) or sum (0-d), or themselves ("none")."""
    if reduction == "mean":
        return statistic.mean()
    if reduction == "sum":
        return statistic.sum()
    return statistic
