"""Exponential moving average of the trained parameters.

Written here rather than using diffusers' `EMAModel` because that keeps the shadow copy on the parameters' device;
users with 8-12 GB cards want the copy in CPU memory (`train.ema_on_cpu`), which needs a cross-device update.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, device: torch.device | None = None):
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().to(device or p.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        # Warm-up: (1 + n) / (10 + n), capped at `decay` (the schedule of diffusers' EMAModel without power
        # warm-up, itself from TensorFlow's ExponentialMovingAverage with num_updates), so early averages are not
        # dominated by the random initialisation.
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - d)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the model (for saving or sampling)."""
        backup = [p.detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            for b, p in zip(backup, self.params):
                p.copy_(b)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, the model trains {len(self.shadow)}")
        self.updates = state["updates"]
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t.to(s.device))
