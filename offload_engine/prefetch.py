"""Speculation policy: which experts a layer will want, guessed one layer early, and whether a guess is worth a copy.

Consecutive layers' residual streams are close (each layer adds a small update), so a layer's router applied
to the *previous* layer's hidden state usually names the experts it will pick (the reference system's
observation). We guess layer l+1 from the residual stream right after layer l's attention — before layer l's
experts run, so the copies overlap layer l's expert compute and layer l+1's attention — and layer 0 from the
token embeddings. The guess feeds layer l+1's own router through layer l+1's own norm (the one in front of
its router), which is the input the router was trained on. One layer ahead is the distance that pays: on the
demo model one guess is right 79 % of the time one MoE layer ahead, 60 % two ahead and 39 % three ahead
(`scripts/profile_cache.py --guess-distances 1 2 3`), and only guesses right ~90 % of the time pay for their copy.
"""

from __future__ import annotations

import math

import torch


def guess_experts(router_logits: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` experts with the most router probability summed over the tokens.  [T, E] -> [count]."""
    if router_logits.shape[0] == 1:  # decode: the softmax keeps the order, so one op instead of four
        return torch.topk(router_logits[0], count).indices
    probs = torch.softmax(router_logits.float(), dim=-1).sum(dim=0)  # [E]
    return torch.topk(probs, count).indices


class PrefetchGate:
    """Which layers' guesses are worth a copy (the cache asks before it copies a guess).

    A wrong guess costs a whole expert copy on a link that demand copies mostly keep busy, and sits in front of
    the next demand copies; a right one only starts a copy some compute earlier. So prefetch pays only above a
    break-even precision, which the timed replay measures (replay.py, scripts/throughput_model.py: 0.86-0.97
    for one guess one layer ahead on a T4-class link, depending on the host and the link). A layer's guesses
    are copied once `warmup` of them have been scored and while the precision measured on its recent guesses
    (every guess is scored, copied or not, so a layer can earn prefetch back), less two standard errors (a layer
    right 80 % of the time must not open the gate on a lucky run), is at least `min_precision`.
    `min_precision` 0 copies every guess from the start.
    """

    def __init__(self, num_layers: int, min_precision: float = 0.0, warmup: int = 32, half_life: float = 256.0):
        if not 0.0 <= min_precision <= 1.0:
            raise ValueError(f"min_precision must be in [0, 1], got {min_precision!r}")
        self.min_precision, self.warmup = min_precision, warmup
        self.decay = 0.5 ** (1.0 / half_life)  # per guess: old guesses fade, so the gate follows drift
        self.scored = [0] * num_layers
        self.guessed = [0.0] * num_layers  # decayed counts
        self.correct = [0.0] * num_layers

    def score(self, layer: int, guessed: int, correct: int) -> None:
        fade = self.decay ** guessed
        self.scored[layer] += guessed
        self.guessed[layer] = self.guessed[layer] * fade + guessed
        self.correct[layer] = self.correct[layer] * fade + correct

    def precision(self, layer: int) -> float | None:
        return self.correct[layer] / self.guessed[layer] if self.guessed[layer] else None

    def open(self, layer: int) -> bool:
        if self.min_precision <= 0.0:
            return True
        if self.scored[layer] < self.warmup:
            return False
        n, precision = self.guessed[layer], self.precision(layer)
        return precision - 2.0 * math.sqrt(precision * (1.0 - precision) / n) >= self.min_precision
