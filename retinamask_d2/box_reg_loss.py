from typing import List

import torch
import torch.distributed as dist
from fvcore.nn import smooth_l1_loss
from torch import nn

from detectron2.config import configurable
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .build import BOX_REG_LOSS_REGISTRY
from .config import InputError

__all__ = ["DeferredScalars", "SelfAdjustingSmoothL1Loss", "SmoothL1Loss"]

# Names of beta, mu_R and sigma_R^2 of each coordinate, in the order of Box2BoxTransform's deltas.
_LOGGED_STATS = [
    f"box_reg_{s}/{c}" for s in ("beta", "mean", "var") for c in ("dx", "dy", "dw", "dh")
]


def _foreground_residuals(pred_deltas, gt_deltas, fg_mask):
    # Background targets can be infinite (an image without objects gives zero-size matched
    # boxes): replaced by zeros rather than multiplied away, which would give NaN.
    return torch.where(fg_mask[..., None], pred_deltas - gt_deltas, torch.zeros_like(pred_deltas))


class DeferredScalars:
    """
    Puts device scalars into the event storage one training step late, so that logging never
    waits for the device: :meth:`put` starts their copy to the host, and the next :meth:`put`
    waits only for that copy (a CUDA event), not for the step in flight. Nothing is logged
    outside an :class:`EventStorage`.
    """

    _pending = None  # (names, host copy, CUDA event or None, iteration) of the last put

    def put(self, names: List[str], values: torch.Tensor, iter_offset: int = 0):
        """
        Log ``values``, (len(names),), as ``names`` under the current iteration plus
        ``iter_offset``, and the values of the previous call.
        """
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage: training outside a trainer
            return
        if self._pending is not None:
            pending_names, host, event, it = self._pending
            if event is not None:
                event.synchronize()
            storage.put_scalars(cur_iter=it, **dict(zip(pending_names, host.tolist())))
        host = values.detach().to("cpu", non_blocking=True, copy=True)
        event = torch.cuda.Event() if values.is_cuda else None
        if event is not None:
            event.record()  # after the copy was queued
        self._pending = (names, host, event, storage.iter + iter_offset)


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
    Self-adjusting smooth L1 loss of RetinaMask (Sec. 3.2, Eq. 2). Per regression coordinate
    (the variant Sec. 4.1 found best), the mean ``mu_R`` and variance ``sigma_R^2`` of
    ``|pred - target|`` over each batch's foreground elements are kept with momentum ``m``::

        mu_R = m * mu_R + (1 - m) * mu_B,   sigma_R^2 = m * sigma_R^2 + (1 - m) * sigma_B^2

    and ``beta = clamp(mu_R - sigma_R^2, min_beta, beta_max)``, from ``mu_R = beta_max`` and
    ``sigma_R^2 = 0`` as in the reference. ``min_beta``, not Eq. 2's 0: the quadratic branch
    divides by beta.

    ``sigma_B^2`` is the unbiased variance, as the reference's ``torch.var``, and a batch with
    fewer than two foreground elements (whose unbiased variance is undefined) leaves the
    statistics, as the reference skips its NaN update (adjust_smooth_l1_loss.py). They are
    checkpointed buffers, updated in training only, from the whole batch of all processes
    (every replica uses the same beta; by design, where the reference keeps one per process).
    Each iteration's starting beta and statistics are logged as
    ``box_reg_{beta,mean,var}/{dx,dy,dw,dh}`` (the paper's Fig. 3, ``tools/plot_beta.py``).
    """

    @configurable
    def __init__(self, *, beta_max=0.11, momentum=0.9, min_beta=1e-3, num_coords=4):
        """
        Args:
            beta_max (float): the clamp bound beta-hat of Eq. 2 (0.11 in the paper).
            momentum (float): momentum m of the running statistics (0.9 in the paper).
            min_beta (float): lower clamp bound of beta, > 0.
            num_coords (int): size of the last dimension of the inputs.
        """
        super().__init__()
        if not (0 < min_beta <= beta_max and 0 <= momentum < 1):
            raise InputError(
                f"MODEL.RETINAMASK.BOX_REG_LOSS has BETA {beta_max} and MOMENTUM {momentum}; set "
                f"BETA >= {min_beta} and MOMENTUM in [0, 1), e.g. the paper's 0.11 and 0.9."
            )
        self.beta_max = beta_max
        self.momentum = momentum
        self.min_beta = min_beta
        self.register_buffer("running_mean", torch.full((num_coords,), float(beta_max)))
        self.register_buffer("running_var", torch.zeros(num_coords))
        self._log = DeferredScalars()

    @classmethod
    def from_config(cls, cfg):
        loss_cfg = cfg.MODEL.RETINAMASK.BOX_REG_LOSS
        return {"beta_max": loss_cfg.BETA, "momentum": loss_cfg.MOMENTUM}

    @property
    def beta(self) -> torch.Tensor:
        """Tensor: (num_coords,), the current control point of each coordinate."""
        return (self.running_mean - self.running_var).clamp(self.min_beta, self.beta_max)

    def forward(self, pred_deltas, gt_deltas, fg_mask):
        """As :meth:`SmoothL1Loss.forward`, with ``num_coords`` deltas per element."""
        x = _foreground_residuals(pred_deltas, gt_deltas, fg_mask).abs()
        if self.training:
            self._update_statistics(x.detach().float(), fg_mask)
            # What the next iteration starts with, logged under that iteration.
            stats = torch.cat([self.beta, self.running_mean, self.running_var])
            self._log.put(_LOGGED_STATS, stats, iter_offset=1)
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
        batch_var = ((x - batch_mean) ** 2 * fg).sum(dim=reduce_dims)
        _all_reduce_sum(batch_var)
        batch_var = batch_var / (count - 1).clamp(min=1)

        # Fewer than two elements have no unbiased variance: keep the statistics (no branching
        # on the host).
        w = (1 - self.momentum) * (count >= 2).to(x.dtype)
        self.running_mean.lerp_(batch_mean, w)
        self.running_var.lerp_(batch_var, w)


def _all_reduce_sum(tensor):
    if comm.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
