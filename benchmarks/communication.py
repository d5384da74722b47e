"""Bytes on the wire per training step: counted in tpfx's collectives, against the analytic figures.

Three figures that must agree exactly: what the collectives were handed in a real step (through
:func:`tpfx.collectives.add_observer`), the communication table tpfx derives from the rewritten graph
(:func:`tpfx.passes.comm_table.comm_table`), and the closed form below. A ring all-gather of a full
tensor of n bytes moves n·(tp-1)/tp bytes out of every rank; a ring all-reduce of n bytes moves
2·n·(tp-1)/tp (:func:`tpfx.passes.comm_table.ring_traffic`). Per block and step (T tokens, width h, FFN width f):

==========  ==========================================  =================================
mode        collectives (forward; backward)              ring elements per rank
==========  ==========================================  =================================
gather      all-gather 3h and f; all-reduce h twice      (3h + f + 4h)·T·(tp-1)/tp  (11hT·(tp-1)/tp at f=4h)
megatron    all-reduce h twice; all-reduce h twice       8hT·(tp-1)/tp
==========  ==========================================  =================================
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from examples.gpt import GPTConfig
from tpfx.passes.comm_table import ring_traffic
from tpfx.collectives import add_observer


@dataclass
class TrafficCounter:
    """What the collectives saw: calls per collective and the ring bytes they imply for one rank."""

    tp: int
    calls: Counter = field(default_factory=Counter)
    ring_bytes: Fraction = Fraction(0)

    def observe(self, name: str, tensor: torch.Tensor) -> None:
        """Observer for :func:`tpfx.collectives.add_observer`; ``tensor`` is what this rank hands in."""
        self.calls[name] += 1
        self.ring_bytes += ring_traffic(name, tensor.numel() * tensor.element_size(), self.tp)


@contextmanager
def counting_traffic(tp: int) -> Iterator[TrafficCounter]:
    """Count every tpfx collective called inside the ``with`` block."""
    counter = TrafficCounter(tp)
    remove = add_observer(counter.observe)
    try:
        yield counter
    finally:
        remove()


def analytic_ring_bytes(config: GPTConfig, *, tokens: int, tp: int, mode: str, element_size: int = 4) -> Fraction:
    """Ring bytes per rank of one forward+backward step of the example GPT, from the table above.

    Args:
        config: the example GPT's config (n_layers, d_model, d_ff).
        tokens: batch × sequence length.
        tp: tensor-parallel degree.
        mode: ``"gather"`` or ``"megatron"``.
        element_size: bytes per element (4 for fp32).

    Raises:
        ValueError: an unknown mode.
    """
    h, f = config.d_model, config.d_ff
    per_block = {"gather": 3 * h + f + 4 * h, "megatron": 8 * h}.get(mode)
    if per_block is None:
        raise ValueError(f"mode={mode!r}; use 'gather' or 'megatron'")
    return Fraction(per_block * tokens * element_size * config.n_layers * (tp - 1), tp)


def analytic_calls(config: GPTConfig, *, mode: str) -> dict[str, int]:
    """Collective calls per step of the example GPT: two gathers and two all-reduces per block, or four all-reduces."""
    per_block = {"gather": {"all_gather": 2, "all_reduce": 2}, "megatron": {"all_reduce": 4}}[mode]
    return {name: count * config.n_layers for name, count in per_block.items()}
