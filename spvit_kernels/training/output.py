"""The training forward's output (design section 8)."""

from typing import List, NamedTuple

import torch


class TrainOutput(NamedTuple):
    """What an SPViT model returns in training mode.

    Attributes:
        logits: (B, num_classes).
        tokens: (B, P, C) the final-normed rows of the P spatial tokens in patch order, dropped ones included
            (PiT: the last stage's grid).
        decision: (B, P) float, the last stage's keep mask, detached (1 = kept; PiT: of the last stage's grid).
        decisions: list (one per stage) of (B, P_s) float keep masks carrying gradient (straight-through);
            P_s = P, or the stage's grid for PiT.
    """

    logits: torch.Tensor
    tokens: torch.Tensor
    decision: torch.Tensor
    decisions: List[torch.Tensor]
