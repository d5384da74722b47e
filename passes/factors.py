"""Analysis: feature factors, the algebra under the feature-flow analysis.

before (a fused QKV linear's output feature dim, and a view of it)::

    qkv = self.qkv_proj(x)                   # (B, T, 384): one factor of size 384
    qkv = qkv.view(B, T, 3, 4, 32)           # the factor splits: 384 = 3 x 4 x 32

after (records)::

    Factors: 384 -> children (3, 4, 32); Value(dims=((B,), (T,), (3,), (4,), (32,)))
    FeatureLayout((3, 4, 32), shard_axis=1)  # what the pairing reads off: the heads, split across ranks

A :class:`Size` is ``coeff * product(symbols)`` (symbols stand for the batch and sequence sizes).
A :class:`Factors` table holds the feature factors of the linears the analysis starts from: a factor
splits into sub-factors (a view), two factors that an op lines up fall in one class (q's heads and k's
heads), and a class is *blocked*, with the reason, when an op is not local along it (a matmul
contracts it, a softmax normalizes along it). :class:`Value` is what a tensor in the region is made
of, dim by dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class Unsupported(Exception):
    """An op the analysis cannot prove head-local; the message says which and why (one line)."""


@dataclass(frozen=True)
class Size:
    """A size as ``coeff * product(symbols)``: symbols stand for sizes unknown while tracing (batch, seq)."""

    coeff: int
    symbols: tuple[str, ...] = ()

    def __mul__(self, other: Size) -> Size:
        return Size(self.coeff * other.coeff, tuple(sorted(self.symbols + other.symbols)))

    def divide(self, other: Size) -> Size | None:
        """``self / other`` when it is exact, else None."""
        rest = list(self.symbols)
        for symbol in other.symbols:
            if symbol not in rest:
                return None
            rest.remove(symbol)
        if other.coeff == 0 or self.coeff % other.coeff:
            return None
        return Size(self.coeff // other.coeff, tuple(rest))

    @property
    def is_int(self) -> bool:
        return not self.symbols


ONE = Size(1)


@dataclass(frozen=True)
class Part:
    """One factor of a dim: a feature factor (an id in :class:`Factors`) or an opaque batch size."""

    factor: int | None = None
    size: Size = ONE


class Factors:
    """Feature factors: sizes, refinements (a factor split into sub-factors), classes and blocks.

    Two factors are in one class when an op lines them up (q's heads and k's heads); a class is
    blocked when some op is not local along it. Splitting a factor splits its whole class alike.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.children: dict[int, tuple[int, ...]] = {}
        self.parent: dict[int, int] = {}  # split child -> factor it came from
        self._class: list[int] = []  # union-find parent
        self.members: dict[int, list[int]] = {}
        self.blocked: dict[int, str] = {}  # class root -> why

    def new(self, size: int) -> int:
        fid = len(self.sizes)
        self.sizes.append(size)
        self._class.append(fid)
        self.members[fid] = [fid]
        return fid

    def find(self, fid: int) -> int:
        while self._class[fid] != fid:
            self._class[fid] = self._class[self._class[fid]]
            fid = self._class[fid]
        return fid

    def leaves(self, fid: int) -> list[int]:
        if fid not in self.children:
            return [fid]
        return [leaf for child in self.children[fid] for leaf in self.leaves(child)]

    def split(self, fid: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Split leaf ``fid`` (and its class) into factors of ``sizes``, outermost first."""
        if fid in self.children:
            raise Unsupported(f"factor of size {self.sizes[fid]} is already split otherwise")
        assert math.prod(sizes) == self.sizes[fid]
        self._refine_class(self.find(fid), sizes)
        return self.children[fid]

    def _refine_class(self, root: int, sizes: tuple[int, ...]) -> None:
        reference: tuple[int, ...] | None = None
        for member in list(self.members[root]):
            if member in self.children:
                if tuple(self.sizes[c] for c in self.children[member]) != sizes:
                    raise Unsupported(f"factor of size {self.sizes[member]} is split two different ways")
            else:
                self.children[member] = tuple(self.new(size) for size in sizes)
                for child in self.children[member]:
                    self.parent[child] = member
            reference = reference or self.children[member]
            for mine, theirs in zip(self.children[member], reference):
                self.union(mine, theirs)

    def union(self, a: int, b: int) -> None:
        """Put ``a`` and ``b`` (equal sizes) in one class, refining both alike."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            raise Unsupported(f"factors of sizes {self.sizes[ra]} and {self.sizes[rb]} meet")
        self._class[rb] = ra
        self.members[ra] += self.members.pop(rb)
        if rb in self.blocked:
            self.blocked.setdefault(ra, self.blocked.pop(rb))
        split = next((self.children[m] for m in self.members[ra] if m in self.children), None)
        if split is not None:
            self._refine_class(ra, tuple(self.sizes[c] for c in split))

    def block(self, fid: int, reason: str) -> None:
        self.blocked.setdefault(self.find(fid), reason)

    def why_blocked(self, fid: int) -> str | None:
        """The reason ``fid`` (or a factor it was split from) cannot be sharded, or None."""
        current: int | None = fid
        while current is not None:
            reason = self.blocked.get(self.find(current))
            if reason:
                return reason
            current = self.parent.get(current)
        return None


@dataclass(frozen=True)
class FeatureLayout:
    """A linear's feature dim as a mixed-radix factorization (outermost first) and its sharded factor.

    ``(3, 4, 32)`` with ``shard_axis=1`` is a fused ``[3, H, Dh]`` QKV weight whose heads are split;
    ``(512,)`` with axis 0 is an FFN's ``d_ff``; ``shard_axis=None`` keeps the feature dim whole.
    """

    factor_sizes: tuple[int, ...]
    shard_axis: int | None

    def __post_init__(self) -> None:
        if not self.factor_sizes or any(size < 1 for size in self.factor_sizes):
            raise ValueError(f"feature layout needs positive factor sizes, got {self.factor_sizes}")
        if self.shard_axis is not None and not 0 <= self.shard_axis < len(self.factor_sizes):
            raise ValueError(f"shard axis {self.shard_axis} is outside factors {self.factor_sizes}")

    @property
    def size(self) -> int:
        """The full feature size."""
        return math.prod(self.factor_sizes)

    def ranges(self, tp: int, rank: int) -> tuple[tuple[int, int], ...]:
        """This rank's ``[start, stop)`` blocks of the feature dim, merged where they touch."""
        if self.shard_axis is None:
            return ((0, self.size),)
        # row-major: each combination of the outer factors holds one block of this rank's slice of the
        # sharded factor times everything inner to it; arithmetic, since d_ff-sized index lists are slow
        axis = self.factor_sizes[self.shard_axis]
        outer = math.prod(self.factor_sizes[:self.shard_axis])
        inner = math.prod(self.factor_sizes[self.shard_axis + 1:])
        length = axis // tp * inner
        blocks: list[list[int]] = []
        for start in (o * axis * inner + rank * length for o in range(outer)):
            if blocks and blocks[-1][1] == start:
                blocks[-1][1] = start + length
            else:
                blocks.append([start, start + length])
        return tuple((start, stop) for start, stop in blocks)

    def describe(self) -> str:
        """E.g. ``[3, 4*, 32]``: the factors with the sharded one starred."""
        marked = [f"{s}*" if i == self.shard_axis else str(s) for i, s in enumerate(self.factor_sizes)]
        return "[" + ", ".join(marked) + "]"


Dim = tuple[Part, ...]  # the parts of one dim, outermost first; () is a dim of size 1


@dataclass(frozen=True)
class Value:
    """A tensor downstream of a column linear: its dims (``prefix``: unknown leading batch dims first)."""

    dims: tuple[Dim, ...]
    group: int
    prefix: bool = False
    source: str = ""  # for a column linear's output: the node of its input (whose sizes may be read)
    # a complex tensor (view_as_complex): the trailing dim of 2 it folded into its elements, the (real,
    # imaginary) pair, which view_as_real gives back; None for a real tensor
    complex_pair: Dim | None = None


@dataclass(frozen=True)
class Pieces:
    """The result of split/chunk/unbind: a tuple of values."""

    items: tuple[Value, ...]
    group: int


@dataclass(frozen=True)
class SizeItem:
    """One shape argument: its size, the feature factors it was read from at run time, where to edit it."""

    size: Size | None  # None for -1
    local: tuple[int, ...] = ()  # factor ids of the region dim it was read from (already local at run time)
    location: tuple[str, tuple[int | str, ...]] | None = None
    literal: int | str = ""


@dataclass
class ShapeUse:
    """A shape-taking op in a region: its output dims and the argument that gave each."""

    node_name: str
    group: int
    dims: list[Dim]
    items: list[SizeItem]


@dataclass(frozen=True)
class SizeRead:
    """A size read off a tensor of the region (``h.shape[-1]``, ``t.size()``, ``sym_size(x, 0)``, ``numel``).

    At run time it reads this rank's tensor: a dim that holds the split factor reads its local size.
    ``elements`` holds, per number the read returns, the feature factors it covers: one entry for a
    single size, one per dim for a whole shape (``tuple_read``); None when the dim cannot be placed
    (a tensor of unknown rank). ``stride``: the read is a stride, which depends on the inner dims.
    """

    node_name: str
    group: int
    elements: tuple[tuple[int, ...], ...] | None
    tuple_read: bool = False
    stride: bool = False


@dataclass(frozen=True)
class OutsideOperand:
    """A tensor from outside the region that an op combines element by element with a region value.

    ``meets`` lists the region value's dims (each as ``(dim counted from the end, its parts)``; the
    operands line up from the right) that hold feature factors and along which the tensor is not
    known to be broadcast: where pairing splits a factor of one of them, the tensor is full size
    there (an ALiBi bias holding every head) and each rank must read only its part. Along any dim,
    each rank's use of the tensor is its part of the single-device use: its gradient is a partial sum.
    """

    consumer: str
    producer: str
    group: int
    meets: tuple[tuple[int, Dim], ...] = ()
