"""GALStats: the statistics of one GAL step, as detached device tensors that cost nothing until read."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from .step import TINY

# to_dict's order; the last two exist only on steps that ask for them (``detailed=True``)
NAMES = ("loss", "tentative_loss", "remainder", "accepted", "cosine", "signed_remainder", "tie", "remainder_ulps",
         "adjuster_grad_norm", "adjusted_better")
DERIVED = ("remainder", "accepted", "tie", "remainder_ulps")  # computed from the others on first read


def float32_spacing(value: Tensor) -> Tensor:
    """The gap from float32(value) to the next float32 towards +inf: the resolution float32 has at value."""
    value = value.float()
    return torch.nextafter(value, torch.full_like(value, float("inf"))) - value


def derive(loss: Tensor, tentative_loss: Tensor, signed_remainder: Tensor, accepted: Tensor | bool) -> dict:
    """The statistics that follow from the step's scalars (all of DERIVED), in the statistics' dtype."""
    remainder = signed_remainder.abs()
    return {"remainder": remainder, "accepted": _flag(accepted, loss), "tie": _flag(tentative_loss == loss, loss),
            "remainder_ulps": _in_float32_spacings(remainder, loss)}


def _flag(value: Tensor | bool, like: Tensor) -> Tensor:
    """A decision as 0.0/1.0 in ``like``'s dtype; a Python bool is the constant decision of "always"/"never"."""
    return torch.full_like(like, float(value)) if isinstance(value, bool) else value.to(like.dtype)


def _in_float32_spacings(remainder: Tensor, loss: Tensor) -> Tensor:
    return remainder / float32_spacing(loss).clamp_min(TINY)  # finite at L = 0


class GALStats:
    """Detached statistics of one GAL step; all stay on the device until ``to_dict`` is called.

    loss, tentative_loss: L and L_tent of the batch (global mode: of the global batch).
    remainder, signed_remainder: |R| and R = L_tent - L + first (its sign orients h's gradient).
    accepted: 1.0 when the model received the adjusted gradient. cosine: mean over rows of cos(g, a_hat) (for
    every proposal; with "batch" too it is per row, not the cosine of the whole batch's G and a_hat).
    tie: 1.0 when L_tent == L exactly (then the safeguard accepts on a rounding tie).
    remainder_ulps: |R| in units of float32's spacing at L (nextafter(L) - L): below 1, float32 cannot resolve R.
    adjuster_grad_norm: the norm of the gradient the step added to h's parameters (after DDP's averaging,
    unscaled; 0 without h); adjusted_better: the fraction of samples whose trial loss with the adjusted gradient
    beats the one with the plain gradient. These two cost work every step, so they are None unless the step
    was called with ``detailed=True``.

    remainder, accepted, tie and remainder_ulps are derived on first read (a step whose statistics are not read
    pays nothing for them); the compiled step computes them in its graph instead. 0/1 flags are in the
    statistics' dtype (GAL's compute dtype).
    """

    def __init__(self, loss: Tensor, tentative_loss: Tensor, signed_remainder: Tensor, accepted: Tensor | bool,
                 cosine: Tensor, adjuster_grad_norm: Tensor | None = None, adjusted_better: Tensor | None = None,
                 **derived: Tensor):
        self.loss, self.tentative_loss, self.signed_remainder = loss, tentative_loss, signed_remainder
        self.cosine, self.adjuster_grad_norm, self.adjusted_better = cosine, adjuster_grad_norm, adjusted_better
        self._accepted = accepted
        unknown = set(derived) - set(DERIVED)
        if unknown:
            raise TypeError(f"unknown statistics {sorted(unknown)}")
        self.__dict__.update(derived)  # precomputed (compiled step): the cached properties below see them

    @cached_property
    def remainder(self) -> Tensor:
        return self.signed_remainder.abs()

    @cached_property
    def accepted(self) -> Tensor:
        return _flag(self._accepted, self.loss)

    @cached_property
    def tie(self) -> Tensor:
        return _flag(self.tentative_loss == self.loss, self.loss)

    @cached_property
    def remainder_ulps(self) -> Tensor:
        return _in_float32_spacings(self.remainder, self.loss)

    def to_dict(self) -> dict[str, float]:
        """Floats for logging, in one device-to-host copy."""
        names = [name for name in NAMES if getattr(self, name) is not None]
        values = torch.stack([getattr(self, name).float() for name in names]).tolist()
        return dict(zip(names, values))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)}" for name in NAMES if getattr(self, name) is not None)
        return f"GALStats({shown})"
