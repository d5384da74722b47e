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
of, dim by dim. :class:`ShapeEdit` and :class:`FullSize` are what the pairing finds for the rewrite
(:mod:`tpfx.passes.localize_shapes` applies them), kept here so that the analysis imports nothing
from the rewrite.
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
        self.segments: dict[int, tuple[int, ...]] = {}  # factor -> the contiguous pieces it is cut into

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
        if any(member in self.segments for member in self.members[self.find(fid)]):
            raise Unsupported(f"factor of size {self.sizes[fid]} is cut into pieces and also split into factors")
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
        cut = next((self.segments[m] for m in self.members[ra] if m in self.segments), None)
        if split is not None and cut is not None:
            raise Unsupported(f"a factor of size {self.sizes[ra]} cut into pieces meets one split into factors")
        if split is not None:
            self._refine_class(ra, tuple(self.sizes[c] for c in split))
        if cut is not None:
            self._cut_class(ra, tuple(self.sizes[c] for c in cut))

    def block(self, fid: int, reason: str) -> None:
        root = self.find(fid)
        self.blocked.setdefault(root, reason)
        # a factor that cannot be split cannot have its pieces split either (a rank would hold part of it)
        for member in self.members[root]:
            for piece in self.segments.get(member, ()):
                self.block(piece, reason)

    # -- contiguous pieces (a fused projection's q | k | v, cut by a split or by slices) --------------

    def segment(self, fid: int, start: int, stop: int) -> int:
        """The piece ``[start, stop)`` of leaf ``fid``: cut ``fid`` (and its class) there, or find the piece.

        A piece is a factor of its own (q's heads, k's heads), factorized on its own; the factor it
        is cut from is blocked, since no rank holds a share of it as a whole. Pieces nest: cutting
        inside a piece cuts that piece.

        Raises:
            Unsupported: the range spans two pieces, or the factor is split into factors.
        """
        size = self.sizes[fid]
        if not 0 <= start < stop <= size:
            raise Unsupported(f"a piece [{start}, {stop}) outside a feature dim of size {size}")
        if start == 0 and stop == size:
            return fid
        if fid in self.children:
            raise Unsupported(f"a part [{start}, {stop}) of a feature dim of size {size} split into factors")
        if fid not in self.segments:
            cuts = tuple(b - a for a, b in zip((0, start, stop), (start, stop, size)) if b > a)
            self._cut_class(self.find(fid), cuts)
        offset = 0
        for piece in self.segments[fid]:
            if offset <= start and stop <= offset + self.sizes[piece]:
                return self.segment(piece, start - offset, stop - offset)
            offset += self.sizes[piece]
        raise Unsupported(f"a part [{start}, {stop}) of a feature dim of size {size} spans two of its pieces")

    def _cut_class(self, root: int, sizes: tuple[int, ...]) -> None:
        """Cut every member of class ``root`` into pieces of ``sizes`` (the pieces of members line up)."""
        reference: tuple[int, ...] | None = None
        inherited = self.blocked.get(root)
        for member in list(self.members[root]):
            if member in self.children:
                raise Unsupported(f"factor of size {self.sizes[member]} is split into factors and also cut into pieces")
            if member in self.segments:
                if tuple(self.sizes[c] for c in self.segments[member]) != sizes:
                    raise Unsupported(f"factor of size {self.sizes[member]} is cut two different ways")
            else:
                self.segments[member] = tuple(self.new(size) for size in sizes)
            reference = reference or self.segments[member]
            for mine, theirs in zip(self.segments[member], reference):
                self.union(mine, theirs)
                if inherited:
                    self.block(mine, inherited)
        self.blocked.setdefault(root, f"it is cut into pieces of sizes {list(sizes)}")

    def segment_leaves(self, fid: int) -> list[int]:
        """The innermost pieces ``fid`` is cut into, in order (``[fid]`` when it is not cut)."""
        if fid not in self.segments:
            return [fid]
        return [leaf for piece in self.segments[fid] for leaf in self.segment_leaves(piece)]

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

    A fused projection cut into unequal contiguous pieces (``[q | k | v]`` of a grouped-query
    attention) is ``segments``: one layout per piece, in order, each with its own sharded factor or
    kept whole; ``factor_sizes`` is then the total size alone and ``shard_axis`` None. This rank's
    rows are each piece's blocks, shifted to where the piece starts.
    """

    factor_sizes: tuple[int, ...]
    shard_axis: int | None
    segments: tuple[FeatureLayout, ...] = ()

    def __post_init__(self) -> None:
        if not self.factor_sizes or any(size < 1 for size in self.factor_sizes):
            raise ValueError(f"feature layout needs positive factor sizes, got {self.factor_sizes}")
        if self.shard_axis is not None and not 0 <= self.shard_axis < len(self.factor_sizes):
            raise ValueError(f"shard axis {self.shard_axis} is outside factors {self.factor_sizes}")
        if self.segments and (self.shard_axis is not None or len(self.segments) < 2 or any(s.segments for s in self.segments)
                              or self.factor_sizes != (sum(s.size for s in self.segments),)):
            raise ValueError(f"a layout cut into pieces needs two or more flat pieces, their total as its one factor "
                             f"and no shard axis of its own, got {self.factor_sizes} with {len(self.segments)} pieces")

    @classmethod
    def of_segments(cls, segments: tuple[FeatureLayout, ...]) -> FeatureLayout:
        """The layout of a feature dim cut into the contiguous pieces ``segments`` (flat, in order)."""
        return cls((sum(s.size for s in segments),), None, segments)

    @property
    def size(self) -> int:
        """The full feature size."""
        return math.prod(self.factor_sizes)

    @property
    def whole(self) -> bool:
        """Whether every rank keeps all of the feature dim (no factor of any piece is split)."""
        return self.shard_axis is None and all(s.whole for s in self.segments)

    def local_size(self, tp: int) -> int:
        """How many of the feature dim's positions each rank holds."""
        if self.segments:
            return sum(s.local_size(tp) for s in self.segments)
        return self.size if self.shard_axis is None else self.size // tp

    def whole_local_ranges(self, tp: int) -> tuple[tuple[int, int], ...]:
        """The ``[start, stop)`` blocks of a rank's *local* feature dim that are pieces kept whole (the same on
        every rank); empty unless the layout is cut into pieces, some split and some whole."""
        if self.whole or not self.segments:
            return ()
        blocks, offset = [], 0
        for piece in self.segments:
            if piece.whole:
                blocks.append((offset, offset + piece.size))
            offset += piece.local_size(tp)
        return _merged_blocks(blocks)

    def ranges(self, tp: int, rank: int) -> tuple[tuple[int, int], ...]:
        """This rank's ``[start, stop)`` blocks of the feature dim, merged where they touch."""
        if self.segments:
            blocks, offset = [], 0
            for piece in self.segments:
                blocks += [(offset + start, offset + stop) for start, stop in piece.ranges(tp, rank)]
                offset += piece.size
            return _merged_blocks(blocks)
        if self.shard_axis is None:
            return ((0, self.size),)
        # row-major: each combination of the outer factors holds one block of this rank's slice of the
        # sharded factor times everything inner to it; arithmetic, since d_ff-sized index lists are slow
        axis = self.factor_sizes[self.shard_axis]
        outer = math.prod(self.factor_sizes[:self.shard_axis])
        inner = math.prod(self.factor_sizes[self.shard_axis + 1:])
        length = axis // tp * inner
        return _merged_blocks([(start, start + length) for start in (o * axis * inner + rank * length
                                                                     for o in range(outer))])

    def describe(self) -> str:
        """E.g. ``[3, 4*, 32]``: the factors with the sharded one starred; pieces as ``[4*, 8 | 8 | 8]``."""
        if self.segments:
            return "[" + " | ".join(s.describe()[1:-1] for s in self.segments) + "]"
        marked = [f"{s}*" if i == self.shard_axis else str(s) for i, s in enumerate(self.factor_sizes)]
        return "[" + ", ".join(marked) + "]"


def _merged_blocks(blocks: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` blocks in order, merged where one ends where the next starts."""
    merged: list[list[int]] = []
    for start, stop in blocks:
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return tuple((start, stop) for start, stop in merged)


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
    segments: tuple[int, ...] = ()  # a split into unequal pieces: the factor each item's split dim is


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


@dataclass(frozen=True)
class CutItem:
    """A shape argument that measures part of a feature factor cut into pieces: a split size, a slice bound.

    It is ``sign * (stop - start)`` positions of factor ``factor`` (in that factor's units): a split
    size measures its piece, a slice bound ``[0, bound)`` (or, negative, the tail it leaves out).
    """

    item: SizeItem
    factor: int
    start: int
    stop: int
    sign: int = 1


@dataclass
class CutUse:
    """A split into unequal pieces or a slice of a feature factor: the arguments whose values depend on
    which of its pieces each rank splits."""

    node_name: str
    group: int
    items: list[CutItem]


# ------------------------------------------------------------------ what the pairing finds for the rewrite

@dataclass(frozen=True)
class ShapeEdit:
    """One shape argument to divide by tp: ``path`` leads into ``node_name``'s args (position or kwarg).

    ``kept`` is the part of the value every rank keeps whole: a slice bound of a fused ``[q | k | v]``
    whose keys are kept whole measures ``q + k``, and becomes ``q / tp + k``: ``(value - kept) / tp + kept``.
    A step ``"start"``/``"stop"``/``"step"`` of ``path`` reads that field of a slice.
    """

    node_name: str
    path: tuple[int | str, ...]
    value: int | str  # the literal, or the name of the node that computes it
    kept: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"shape edit of {self.node_name} needs a path into its arguments")


@dataclass(frozen=True)
class FullSize:
    """A size read of a split dim whose ``uses`` need the single-device size (``read * tp``).

    ``elements`` are the split items of a read shape (``rank`` items; both 0 and () for one number),
    ``chain`` the size arithmetic between the read and the uses (recomputed from the full size), and
    each use is (the read or a node of the chain, the node that reads it).
    """

    read: str
    elements: tuple[int, ...]
    rank: int
    chain: tuple[str, ...]
    uses: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if any(not 0 <= element < self.rank for element in self.elements) or bool(self.elements) != bool(self.rank):
            raise ValueError(f"size read {self.read}: split items {self.elements} do not fit a shape of {self.rank}")
        if not self.uses:
            raise ValueError(f"size read {self.read}: a full size is only restored for some use of it")
