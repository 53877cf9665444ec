from typing import Optional, Tuple

import torch
import torch.distributed as dist
from fvcore.nn import smooth_l1_loss
from torch import nn

from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .build import BOX_REG_LOSS_REGISTRY

__all__ = ["SelfAdjustingSmoothL1Loss", "SmoothL1Loss"]

# Names of the regression coordinates, in the order of Box2BoxTransform's deltas.
_COORDS = ("dx", "dy", "dw", "dh")


def _foreground_residuals(pred_deltas, gt_deltas, fg_mask):
    """
    Returns ``pred_deltas - gt_deltas`` with the non-foreground elements set to zero. The
    targets of background anchors can be infinite (an image without objects gives zero-size
    matched boxes), so they are replaced rather than multiplied away, which would give NaN.
    """
    fg = fg_mask.unsqueeze(-1)
    return torch.where(fg, pred_deltas - gt_deltas, torch.zeros_like(pred_deltas))


@BOX_REG_LOSS_REGISTRY.register()
class SmoothL1Loss(nn.Module):
    """
    Smooth L1 with a fixed control point beta (Eq. 1 of RetinaMask), for ablations (Table 2).
    """

    @configurable
    def __init__(self, *, beta: float = 0.11):
        super().__init__()
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        return {"beta": cfg.MODEL.RETINAMASK.BOX_REG_LOSS.BETA}

    def forward(self, pred_deltas, gt_deltas, fg_mask):
        """
        Args:
            pred_deltas, gt_deltas (Tensor): (..., 4) predicted and target box deltas.
            fg_mask (Tensor[bool]): (...), which elements are foreground.

        Returns:
            Tensor: scalar, the loss summed over the foreground elements.
        """
        x = _foreground_residuals(pred_deltas, gt_deltas, fg_mask)
        return smooth_l1_loss(x, torch.zeros_like(x), self.beta, reduction="sum")


@BOX_REG_LOSS_REGISTRY.register()
class SelfAdjustingSmoothL1Loss(nn.Module):
    """
    Self-adjusting smooth L1 loss of RetinaMask (Sec. 3.2, Eq. 2).

    For each regression coordinate separately (the variant Sec. 4.1 found best), the running
    mean ``mu_R`` and running variance ``sigma_R^2`` of ``|pred - target|`` over the foreground
    elements of each training batch are kept with momentum ``m``::

        mu_R = m * mu_R + (1 - m) * mu_B,   sigma_R^2 = m * sigma_R^2 + (1 - m) * sigma_B^2

    where ``sigma_B^2`` is the population variance of the batch, and the smooth L1 control point
    is ``beta = clamp(mu_R - sigma_R^2, min_beta, beta_max)``. The statistics start at
    ``mu_R = beta_max`` and ``sigma_R^2 = 0``, as the reference implementation does, so training
    starts from the fixed loss with beta = beta_max. The lower bound is ``min_beta`` rather than
    Eq. 2's 0 because the quadratic branch divides by beta.

    The statistics are buffers: they are saved in checkpoints and restored on resume. They are
    updated in training mode only, from the statistics of the whole batch across all processes
    (so every replica uses the same beta), and stay unchanged for a batch without foreground.

    While an :class:`EventStorage` is active, the beta each training iteration starts with is
    put into it as ``box_reg_beta/{dx,dy,dw,dh}``, with the running statistics it comes from as
    ``box_reg_mean/...`` and ``box_reg_var/...`` (the curves of the paper's Fig. 3,
    ``tools/plot_beta.py`` draws them). The values are copied to the host without blocking at
    the end of the previous iteration, so logging never waits for the device.
    """

    @configurable
    def __init__(
        self,
        *,
        beta_max: float = 0.11,
        momentum: float = 0.9,
        min_beta: float = 1e-3,
        num_coords: int = 4,
    ):
        """
        Args:
            beta_max (float): the clamp bound beta-hat of Eq. 2 (0.11 in the paper).
            momentum (float): momentum m of the running statistics (0.9 in the paper).
            min_beta (float): lower clamp bound of beta, > 0.
            num_coords (int): size of the last dimension of the inputs.
        """
        super().__init__()
        if not 0 < min_beta <= beta_max:
            raise ValueError(
                f"Need 0 < min_beta <= beta_max, got min_beta={min_beta}, beta_max={beta_max}; "
                "set MODEL.RETINAMASK.BOX_REG_LOSS.BETA to a positive value."
            )
        if not 0 <= momentum < 1:
            raise ValueError(
                f"momentum must be in [0, 1), got {momentum}; the paper uses 0.9 "
                "(MODEL.RETINAMASK.BOX_REG_LOSS.MOMENTUM)."
            )
        self.beta_max = beta_max
        self.momentum = momentum
        self.min_beta = min_beta
        self.register_buffer("running_mean", torch.full((num_coords,), float(beta_max)))
        self.register_buffer("running_var", torch.zeros(num_coords))
        self._pending_stats: Optional[Tuple[torch.Tensor, Optional[torch.cuda.Event]]] = None

    @classmethod
    def from_config(cls, cfg):
        return {
            "beta_max": cfg.MODEL.RETINAMASK.BOX_REG_LOSS.BETA,
            "momentum": cfg.MODEL.RETINAMASK.BOX_REG_LOSS.MOMENTUM,
        }

    @property
    def beta(self) -> torch.Tensor:
        """
        Tensor: (num_coords,), the current control point of each coordinate.
        """
        return (self.running_mean - self.running_var).clamp(self.min_beta, self.beta_max)

    def forward(self, pred_deltas, gt_deltas, fg_mask):
        """
        Args:
            pred_deltas, gt_deltas (Tensor): (..., num_coords) predicted and target deltas.
            fg_mask (Tensor[bool]): (...), which elements are foreground.

        Returns:
            Tensor: scalar, the loss summed over the foreground elements.
        """
        x = _foreground_residuals(pred_deltas, gt_deltas, fg_mask).abs()
        if self.training:
            self._publish_statistics()
            self._update_statistics(x.detach().float(), fg_mask)
            self._queue_statistics_for_logging()
        beta = self.beta.to(x.dtype)
        # Background elements have x == 0 and fall in the quadratic branch with zero loss.
        loss = torch.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)
        return loss.sum()

    @torch.no_grad()
    def _update_statistics(self, x, fg_mask):
        fg = fg_mask.unsqueeze(-1).to(x.dtype)
        reduce_dims = tuple(range(x.dim() - 1))
        count_and_sum = torch.cat([fg.sum().reshape(1), x.sum(dim=reduce_dims)])
        _all_reduce_sum(count_and_sum)
        count = count_and_sum[0]
        batch_mean = count_and_sum[1:] / count.clamp(min=1)
        # Two passes rather than E[x^2] - mu^2, which loses precision for small residuals.
        squared_dev = (x - batch_mean) ** 2 * fg
        batch_var = squared_dev.sum(dim=reduce_dims)
        _all_reduce_sum(batch_var)
        batch_var = batch_var / count.clamp(min=1)

        # An empty batch carries no information: keep the statistics (no branching on the host).
        w = (1 - self.momentum) * (count > 0).to(x.dtype)
        self.running_mean.lerp_(batch_mean, w)
        self.running_var.lerp_(batch_var, w)

    def _queue_statistics_for_logging(self):
        if not _has_event_storage():
            return
        stats = torch.stack([self.beta, self.running_mean, self.running_var]).detach()
        host = stats.to("cpu", non_blocking=True, copy=True)
        event = None
        if stats.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending_stats = (host, event)

    def _publish_statistics(self):
        if self._pending_stats is None or not _has_event_storage():
            return
        host, event = self._pending_stats
        self._pending_stats = None
        if event is not None:
            event.synchronize()  # the copy was queued a whole iteration ago
        beta, mean, var = host.tolist()
        scalars = {}
        for name, values in (("beta", beta), ("mean", mean), ("var", var)):
            scalars.update({f"box_reg_{name}/{c}": v for c, v in zip(_COORDS, values)})
        get_event_storage().put_scalars(**scalars)


def _all_reduce_sum(tensor):
    if comm.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _has_event_storage() -> bool:
    try:
        get_event_storage()
    except AssertionError:
        return False
    return True
