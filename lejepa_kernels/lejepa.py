"""LeJEPA model: a timm backbone, an MLP projector and the SIGReg loss.

Checkpoint-compatible with stable-pretraining's ``LeJEPA`` (same state_dict keys:
``backbone.*``, ``projector.0.*``, ``projector.1.{0,1,4,5,8}.*``, ``sigreg.global_step``,
``sigreg.ep.{t,phi,weights}``), with the SIGReg term computed by the fused
:class:`~lejepa_kernels.modules.FusedSlicedEppsPulley` by default.

Example::

    model = LeJEPA("vit_small_patch16_224").train()
    out = model(global_views=[g1, g2], local_views=[l1, l2, l3, l4])
    out.loss.backward()
    features = model.eval()(images=x).embedding  # [B, embed_dim]

Reference: Balestriero & LeCun, "LeJEPA: Provable and Scalable Self-Supervised Learning
Without the Heuristics", 2025, https://arxiv.org/abs/2511.08544.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn

try:
    import timm
except ImportError as error:
    raise ImportError(f"LeJEPA builds its backbone with timm: pip install timm ({error})") from error

from lejepa_kernels.modules import FusedSlicedEppsPulley
from lejepa_kernels.reference import SlicedEppsPulley

__all__ = ["MLP", "LeJEPAOutput", "LeJEPA"]

_SIGREG_CHOICES = {"fused": FusedSlicedEppsPulley, "reference": SlicedEppsPulley}
SIGREG_VIEWS = ("concat", "per_view")
"""SIGReg over all views' embeddings together (the seed), or the mean of each view's (the paper)."""
LOSS_WEIGHTINGS = ("seed", "paper")
"""``inv + lamb * sigreg`` (the seed) or ``(1 - lamb) * inv + lamb * sigreg`` (the paper)."""


class MLP(nn.Sequential):
    """Projection MLP: ``[Linear, BatchNorm1d, ReLU, Dropout]`` per hidden layer, then
    ``[Linear, Dropout]`` for the last one. Input [N, in_channels] -> [N, hidden_channels[-1]].

    Child indices match stable-pretraining's ``MLP`` (e.g. 512 -> [2048, 2048, 512] has
    Linear at 0, 4, 8 and BatchNorm1d at 1, 5), so checkpoints load unchanged.
    """

    def __init__(self, in_channels: int, hidden_channels: Sequence[int], dropout: float = 0.0):
        if len(hidden_channels) == 0:
            raise ValueError("MLP needs at least one entry in hidden_channels, got an empty list")
        layers: list[nn.Module] = []
        dim = in_channels
        for hidden in hidden_channels[:-1]:
            layers += [
                nn.Linear(dim, hidden),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            dim = hidden
        layers += [nn.Linear(dim, hidden_channels[-1]), nn.Dropout(dropout)]
        super().__init__(*layers)


@dataclass
class LeJEPAOutput:
    """Output of :meth:`LeJEPA.forward`.

    ``loss``: scalar ``inv_loss + lamb * sigreg_loss``, or ``(1 - lamb) * inv_loss + lamb *
    sigreg_loss`` with ``loss_weighting="paper"`` (0 in eval mode);
    ``embedding``: backbone features, [n_global*B, D] (train, detached) or [B, D] (eval);
    ``inv_loss``, ``sigreg_loss``: scalar loss terms (0 in eval mode).

    Like ``transformers.ModelOutput``: ``out.loss``, ``out["loss"]``, ``out[0]`` and
    ``out.to_tuple()`` / iteration / ``keys()`` over the fields that are not None.
    """

    loss: Optional[torch.Tensor] = None
    embedding: Optional[torch.Tensor] = None
    inv_loss: Optional[torch.Tensor] = None
    sigreg_loss: Optional[torch.Tensor] = None

    def keys(self) -> list[str]:
        """Names of the fields that are not None, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """Values of the fields that are not None, in declaration order."""
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


def _check_views(views: Any, name: str) -> list[torch.Tensor]:
    """Validate a list of [B, C, H, W] views sharing one shape; return it as a list."""
    if views is None or isinstance(views, torch.Tensor) or len(views) == 0:
        got = "None" if views is None else (
            f"a tensor of shape {tuple(views.shape)}" if isinstance(views, torch.Tensor) else "an empty list"
        )
        raise ValueError(f"{name} must be a non-empty list of [B, C, H, W] tensors in training mode, got {got}")
    views = list(views)
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{name}[{i}] must be a 4-D [B, C, H, W] tensor, got {got}")
        if v.shape != views[0].shape:
            raise ValueError(
                f"all {name} must have the same shape (batch size and resolution), "
                f"got {tuple(views[0].shape)} for {name}[0] and {tuple(v.shape)} for {name}[{i}]"
            )
    return views


class LeJEPA(nn.Module):
    """LeJEPA: multi-view invariance + sliced Epps-Pulley SIGReg.

    Backbone: timm model with ``num_classes=0`` (pooled features [N, embed_dim]).
    Projector: ``Linear(embed_dim, 512)`` then ``MLP(512, [2048, 2048, 512])`` unless given.
    Loss: ``inv_loss + lamb * sigreg_loss`` (``loss_weighting="paper"``: ``(1 - lamb) * inv_loss
    + lamb * sigreg_loss``); the invariance term is the MSE between each view's projection and
    the mean of the global views' projections; SIGReg is taken over all views' rows together
    (``sigreg_views="concat"``) or is the mean of each view's statistic (``"per_view"``, the
    views as groups of one call, on the same directions).

    :param encoder_name: timm model name (e.g. ``"vit_base_patch16_224"``).
    :param projector: optional projection head [N, embed_dim] -> [N, K].
    :param n_slices: random directions of the sliced test.
    :param t_max: Epps-Pulley integration upper bound.
    :param n_points: Epps-Pulley quadrature nodes (odd).
    :param lamb: SIGReg weight.
    :param pretrained: load timm's pretrained weights.
    :param drop_path_rate: stochastic depth rate of the backbone.
    :param sigreg: ``"fused"`` (:class:`FusedSlicedEppsPulley`) or ``"reference"``
        (:class:`SlicedEppsPulley`, the seed's pure-PyTorch implementation).
    :param directions: ``"seed"`` (the seed's directions) or ``"blockwise"`` (drawn block by
        block, memory independent of ``n_slices``); ``"fused"`` only.
    :param orthogonal: orthonormalise each group of at most K directions; ``"fused"`` only.
    :param unbiased: the unbiased form of the statistic (its expectation is 0 for Gaussian
        embeddings, see :func:`~lejepa_kernels.functional.epps_pulley_statistic`); ``"fused"`` only.
    :param sigreg_views: ``"concat"`` (the seed: one statistic over the V*B rows) or
        ``"per_view"`` (the LeJEPA paper and its code: the mean of the V per-view statistics).
    :param loss_weighting: ``"seed"`` (``inv + lamb * sigreg``) or ``"paper"`` (``(1 - lamb) *
        inv + lamb * sigreg``; needs ``lamb <= 1``).
    """

    def __init__(
        self,
        encoder_name: str = "vit_base_patch16_224",
        projector: Optional[nn.Module] = None,
        n_slices: int = 1024,
        t_max: float = 3.0,
        n_points: int = 17,
        lamb: float = 0.02,
        pretrained: bool = False,
        drop_path_rate: float = 0.1,
        *,
        sigreg: str = "fused",
        directions: str = "seed",
        orthogonal: bool = False,
        unbiased: bool = False,
        sigreg_views: str = "concat",
        loss_weighting: str = "seed",
    ) -> None:
        super().__init__()
        if sigreg not in _SIGREG_CHOICES:
            raise ValueError(f"sigreg must be one of {sorted(_SIGREG_CHOICES)}, got {sigreg!r}")
        fused_options = dict(directions=directions, orthogonal=orthogonal, unbiased=unbiased)
        if sigreg == "reference" and (directions, orthogonal, unbiased) != ("seed", False, False):
            raise ValueError("directions='blockwise', orthogonal=True and unbiased=True need sigreg='fused'")
        if sigreg_views not in SIGREG_VIEWS:
            raise ValueError(f"sigreg_views must be one of {SIGREG_VIEWS}, got {sigreg_views!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if isinstance(lamb, bool) or not isinstance(lamb, (int, float)) or not (0 <= lamb < math.inf):
            raise ValueError(f"lamb (the SIGReg weight) must be a finite number >= 0, got {lamb!r}")
        if loss_weighting == "paper" and lamb > 1:
            raise ValueError(f"loss_weighting='paper' weighs the invariance by 1 - lamb: lamb must be <= 1, got {lamb}")
        # Names with a source prefix ("hf-hub:...", "local-dir:...") are resolved by timm itself.
        if ":" not in encoder_name and not timm.is_model(encoder_name):
            raise ValueError(f"unknown timm model name {encoder_name!r} (see timm.list_models())")
        self.backbone = timm.create_model(
            encoder_name,
            pretrained=pretrained,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            **({"dynamic_img_size": True} if "vit" in encoder_name else {}),
        )
        # Width of forward()'s output with num_classes=0 (== embed_dim for ViTs; differs from
        # num_features for models with a pre-logits head such as MobileNetV3).
        embed_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        if projector is None:
            projector = nn.Sequential(nn.Linear(embed_dim, 512), MLP(512, [2048, 2048, 512], dropout=0.0))
        self.projector = projector
        self.sigreg = _SIGREG_CHOICES[sigreg](
            num_slices=n_slices, t_max=t_max, n_points=n_points, **(fused_options if sigreg == "fused" else {})
        )
        self.lamb = lamb
        self.sigreg_views = sigreg_views
        self.loss_weighting = loss_weighting
        self.embed_dim = embed_dim

    @staticmethod
    def _compute_loss(
        all_projected: torch.Tensor,
        n_global: int,
        sigreg: nn.Module,
        lamb: float,
        sigreg_views: str = "concat",
        loss_weighting: str = "seed",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LeJEPA loss from projections [V, B, K] whose first ``n_global`` views are global.

        :return: ``(loss, inv_loss, sigreg_loss)``, scalars; ``sigreg`` is called once (on the
            V*B rows together, or on [V, B, K] as V groups for ``"per_view"``, its mean over
            views and slices) and so advances its ``global_step`` by one.
        """
        centers = all_projected[:n_global].mean(0)  # [B, K]
        inv_loss = (centers.unsqueeze(0) - all_projected).square().mean()
        if sigreg_views == "per_view":
            sigreg_loss = sigreg(all_projected)
        else:
            sigreg_loss = sigreg(all_projected.reshape(-1, all_projected.size(-1)))
        if loss_weighting == "paper":
            return (1 - lamb) * inv_loss + lamb * sigreg_loss, inv_loss, sigreg_loss
        return inv_loss + lamb * sigreg_loss, inv_loss, sigreg_loss

    def forward(
        self,
        global_views: Optional[Sequence[torch.Tensor]] = None,
        local_views: Optional[Sequence[torch.Tensor]] = None,
        images: Optional[torch.Tensor] = None,
    ) -> LeJEPAOutput:
        """Train mode: ``global_views`` / ``local_views`` lists of [B, C, H, W] (each list of one
        resolution, the two may differ) -> losses and ``embedding`` [n_global*B, embed_dim]
        (detached global-view features). Eval mode: ``images`` [B, C, H, W] -> ``embedding``
        [B, embed_dim] and zero losses.
        """
        if not self.training:
            if images is None:
                raise ValueError(
                    "images ([B, C, H, W] tensor) must be given in eval mode, got None "
                    "(call model.train() to pass global_views/local_views)"
                )
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
                raise ValueError(f"images must be a 4-D [B, C, H, W] tensor, got {got}")
            zero = torch.zeros((), device=images.device)
            return LeJEPAOutput(loss=zero, embedding=self.backbone(images), inv_loss=zero, sigreg_loss=zero)

        global_views = _check_views(global_views, "global_views")
        local_views = _check_views(local_views, "local_views")
        bs = global_views[0].size(0)
        if local_views[0].size(0) != bs:
            raise ValueError(
                f"global and local views must have the same batch size, got {bs} for global_views "
                f"and {local_views[0].size(0)} for local_views"
            )
        g_features = self.backbone(torch.cat(global_views))  # [n_global*B, D]
        l_features = self.backbone(torch.cat(local_views))  # [n_local*B, D]
        all_projected = self.projector(torch.cat([g_features, l_features]))  # [V*B, K]
        n_views = len(global_views) + len(local_views)
        all_projected = all_projected.reshape(n_views, bs, -1)
        loss, inv_loss, sigreg_loss = self._compute_loss(
            all_projected, len(global_views), self.sigreg, self.lamb, self.sigreg_views, self.loss_weighting
        )
        return LeJEPAOutput(
            loss=loss, embedding=g_features.detach(), inv_loss=inv_loss, sigreg_loss=sigreg_loss
        )
