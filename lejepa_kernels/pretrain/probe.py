"""The linear probe of ``lejepa-kernels pretrain``: logistic regression on frozen features."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..lejepa import LeJEPA
from .data import SPLIT_SEED, Normalize
from .device import autocast

__all__ = ["embed", "linear_probe"]


def embed(model: LeJEPA, loader: DataLoader, normalize: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features of every (uint8 image [B, 3, H, W], label [B]) batch of ``loader``.

    :return: features [N, embed_dim] fp32 and labels [N] int64, on the CPU.
    """
    model.eval()
    features, labels = [], []
    with torch.no_grad(), autocast(normalize.device):
        for images, target in loader:
            features.append(model(images=normalize(images)).embedding.float().cpu())
            labels.append(target)
    return torch.cat(features), torch.cat(labels)


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int,
    init: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on x [N, D]: mean cross-entropy plus
    ``weight_decay / 2 * ||W||^2``, by full-batch L-BFGS (deterministic, no learning rate to tune),
    started from ``init`` or zero. Returns (W [D, C], b [C])."""
    weight, bias = init if init is not None else (torch.zeros(x.size(1), num_classes), torch.zeros(num_classes))
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(params: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x @ params[0] + params[1]).argmax(1) == y).float().mean().item()


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    weight_decays: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5), max_iter: int = 500,
) -> float:
    """Test accuracy of a linear classifier (logistic regression) on standardised frozen features.

    :param train_x: [N, D] features, ``train_y`` [N] class indices; ``test_x``/``test_y`` likewise.
    :param weight_decays: L2 strengths tried; the one with the best accuracy on a held-out fifth of
        the training features is kept (so each encoder gets its own, and none is chosen on the
        test set), then the probe is refitted on all training features.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    weight_decay, params = weight_decays[0], None
    if len(weight_decays) > 1:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val, fit = order[: len(train_x) // 5], order[len(train_x) // 5 :]
        best = -1.0
        # Strongest penalty first, each fit started from the last: a regularisation path, which
        # L-BFGS walks in a fraction of the iterations that cold starts take.
        for wd in sorted(weight_decays, reverse=True):
            params = _fit_logistic(train_x[fit], train_y[fit], num_classes, wd, max_iter, params)
            accuracy = _accuracy(params, train_x[val], train_y[val])
            if accuracy > best:
                best, weight_decay, best_params = accuracy, wd, params
        params = best_params
    params = _fit_logistic(train_x, train_y, num_classes, weight_decay, max_iter, params)
    return _accuracy(params, test_x, test_y)
