"""Muon and AdamW as one `torch.optim.Optimizer` (one schedule, one state dict): what `training.optimizer: muon`
builds (muon.py)."""

from __future__ import annotations

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer. Its param_groups are Muon's groups then AdamW's, the very same dicts, so the
    schedule and a resume's settings reach both; its state is one dict that both update (their parameters are
    disjoint), so `state_dict` and `load_state_dict` are torch's own, over all the groups in that order."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (again after `load_state_dict` replaced them)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()
