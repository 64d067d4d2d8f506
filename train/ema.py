"""EMA of the weights: one `torch._foreach_lerp_` per step over the parameters and floating-point buffers
(BN running statistics), integer buffers (BN's num_batches_tracked) copied.

    ema = EMA(model, decay=0.9999)
    ...after each optimizer step: ema.update_parameters(model)
    evaluate(ema.module, ...)

It replaces torch.optim.swa_utils.AveragedModel, whose `n_averaged` counter is a CPU tensor read on the host
(`n_averaged == 0`) and copied to the device, blocking, once per dtype group in every update: two host syncs
per training step on a GPU. Here nothing but the two tensor lists is touched per step, all on the device.

The EMA starts as a copy of the model it is built from (W_0^EMA = W_0, torch's EMA definition), so every
update is the same lerp and no "first update copies" counter is needed. AveragedModel copied at its first
update instead: the one difference, in step 1 only.

State dict: the averaged model's keys under "module." (AveragedModel's layout, so checkpoints written with it
and without it read the same way); an old checkpoint's "n_averaged" entry is accepted and ignored.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def averaged_weights(state_dict: dict) -> dict:
    """The model's own state dict from an EMA state dict: ours and AveragedModel's (torch's, and the
    torchvision references' `model_ema`) put the averaged model under "module." and AveragedModel adds its
    step counter "n_averaged", which the lerp needs none of."""
    return {k.removeprefix("module."): v for k, v in state_dict.items() if k != "n_averaged"}


class EMA:
    """The averaged copy is `self.module` (evaluate it, broadcast its buffers); update after each step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay}: expected in (0, 1)")
        from imt.train.model import unwrap

        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).requires_grad_(False)
        self._source: nn.Module | None = None
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._others: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def _pair(self, model: nn.Module) -> None:
        """Match this EMA's tensors to `model`'s once (same order: the EMA is a deep copy of it)."""
        from imt.train.model import unwrap

        source = unwrap(model)
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*source.parameters(), *source.buffers())]
        if len(mine) != len(theirs) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
            raise ValueError("EMA.update_parameters got a model of another architecture than the EMA was built from")
        self._floats = ([a for a in mine if a.is_floating_point()], [b for a, b in zip(mine, theirs)
                                                                     if a.is_floating_point()])
        self._others = ([a for a in mine if not a.is_floating_point()], [b for a, b in zip(mine, theirs)
                                                                         if not a.is_floating_point()])
        self._source = source

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * model, for parameters and float buffers; other buffers copied."""
        from imt.train.model import unwrap

        if unwrap(model) is not self._source:  # paired once; DDP and torch.compile wrap the same tensors
            self._pair(model)
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - self.decay)
        if self._others[0]:
            torch._foreach_copy_(self._others[0], self._others[1])

    def state_dict(self) -> dict:
        return {f"module.{k}": v for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.module.load_state_dict(averaged_weights(state_dict))  # strict: another architecture is refused with the keys named
