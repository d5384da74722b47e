"""Analysis: the feature-flow rule of each op family (see :class:`tpfx.passes.ops.Flow`).

before (an op of the region, its input's dims)::

    scores = q @ k.transpose(-2, -1)        # q: (B, [H], T, [Dh]); k^T: (B, [H], [Dh], T)

after (the rule for Flow.MATMUL)::

    Value(dims=(B, [H], T, T))               # H lined up across q and k; Dh contracted: blocked

Each rule takes the interpreter (:class:`tpfx.passes.feature_flow.FlowInterpreter`, for the values of
the node's inputs and the shared factor algebra) and the node, and returns the abstract value of the
node's result, or raises :class:`~tpfx.passes.factors.Unsupported` with the reason. Which rule an op
gets is the op registry's business (:mod:`tpfx.passes.ops`): a rule here is keyed by the rule
family, never by an op's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.fx as fx

from tpfx.passes.factors import (ONE, CutItem, CutUse, Dim, OutsideOperand, Part, Pieces, ShapeUse, Size, SizeItem,
                                 Unsupported, Value)
from tpfx.passes.graph_view import tensor_operands
from tpfx.passes.ops import SDPA_GQA, Flow, is_python_value, rule_of

if TYPE_CHECKING:
    from tpfx.passes.feature_flow import FlowInterpreter


def _unary(interp: FlowInterpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    if value is None:
        raise Unsupported("only a side operand of this op comes from the region")
    return value


def _broadcast(interp: FlowInterpreter, node: fx.Node) -> Value:
    operands = [a for a in [*node.args, *node.kwargs.values()] if isinstance(a, fx.Node)]
    values = [interp.value(a) for a in operands if interp.value(a) is not None]
    dims, prefix = interp.broadcast(values)
    group = interp.flow.join(*(v.group for v in values))
    for outside in (a for a in operands if interp.value(a) is None):
        _meet_outside(interp, node, outside, dims, group)
    return Value(dims, group, prefix)


def _view(interp: FlowInterpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    items = interp.size_items(node, 1)
    dims = _reshape(interp, value, items)
    interp.flow.shape_uses.append(ShapeUse(node.name, value.group, list(dims), items))
    return Value(tuple(dims), value.group)


def _reshape(interp: FlowInterpreter, value: Value, items: list[SizeItem]) -> list[Dim]:
    """Match the output sizes against the input's parts (splitting factors where needed)."""
    parts = [p for dim in value.dims for p in interp.expand(dim) if interp.size_of(p) != ONE]
    if value.prefix:
        tail = _take_from_right(interp, parts, [i.size for i in items])
        leading = items[:len(items) - len(tail)]
        interp.learn_rank(value, leading)
        return [(Part(size=item.size or Size(1, (f"-1 of {item.location}",))),) if item.size != ONE else ()
                for item in leading] + tail
    total = math.prod((interp.size_of(p) for p in parts), start=ONE)
    known = math.prod((i.size for i in items if i.size is not None), start=ONE)
    sizes = [i.size if i.size is not None else total.divide(known) for i in items]
    if any(size is None for size in sizes):
        raise Unsupported("-1 in a view does not divide the element count")
    dims = _take_from_left(interp, parts, sizes)
    if parts:
        raise Unsupported("a view does not cover its input")
    return dims


def _take_from_left(interp: FlowInterpreter, parts: list[Part], sizes: list[Size]) -> list[Dim]:
    dims = []
    for size in sizes:
        dim: list[Part] = []
        need = size
        while need != ONE:
            if not parts:
                raise Unsupported("a view's sizes do not match its input")
            part = parts.pop(0)
            rest = need.divide(interp.size_of(part))
            if rest is not None:
                dim.append(part)
                need = rest
                continue
            head, tail = _split_part(interp, part, need, outer=True)
            dim.append(head)
            parts.insert(0, tail)
            need = ONE
        dims.append(tuple(dim))
    return dims


def _split_part(interp: FlowInterpreter, part: Part, need: Size, *, outer: bool) -> tuple[Part, Part]:
    """Split ``part`` so that one piece has size ``need``: (that piece, the rest); outer or inner piece."""
    whole = interp.size_of(part)
    rest = whole.divide(need)
    if rest is None:
        raise Unsupported(f"a view splits a dim of size {whole} by {need}")
    if part.factor is None:  # batch sizes, e.g. the B*T rows of a flattened input: split the product
        return Part(size=need), Part(size=rest)
    if not need.is_int:
        raise Unsupported(f"a view splits a feature dim of size {whole} by {need}")
    sizes = (need.coeff, rest.coeff) if outer else (rest.coeff, need.coeff)
    first, second = interp.flow.factors.split(part.factor, sizes)
    return (Part(first), Part(second)) if outer else (Part(second), Part(first))


def _take_from_right(interp: FlowInterpreter, parts: list[Part], sizes: list[Size | None]) -> list[Dim]:
    """Match trailing output sizes against the feature parts; stop at the first batch-like size."""
    dims: list[Dim] = []
    for position in range(len(sizes) - 1, -1, -1):
        size = sizes[position]
        if size is None and position > 0:  # -1 between spelled-out sizes: the features that are left
            dims.insert(0, tuple(parts))
            parts.clear()
            continue
        if not parts or size is None:
            break
        dim: list[Part] = []
        need = size
        while need != ONE:
            if not parts:
                raise Unsupported("a view's sizes do not match its input")
            part = parts.pop()
            whole = interp.size_of(part)
            rest = need.divide(whole)
            if rest is not None:
                dim.insert(0, part)
                need = rest
                continue
            inner, outer = _split_part(interp, part, need, outer=False)
            dim.insert(0, inner)
            parts.append(outer)
            need = ONE
        dims.insert(0, tuple(dim))
    if parts:
        raise Unsupported("a view of a tensor of unknown rank does not cover its feature dim")
    return dims


def _permute(interp: FlowInterpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    order = [interp.axis(value, i) for i in order]
    if value.prefix or sorted(order) != list(range(len(value.dims))):
        raise Unsupported("a permute of a tensor of unknown rank")
    return Value(tuple(value.dims[i] for i in order), value.group)


def _transpose(interp: FlowInterpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    a, b = (interp.axis(value, i) for i in (node.args[1:3] if len(node.args) >= 3 else (-2, -1)))
    dims = list(value.dims)
    dims[a], dims[b] = dims[b], dims[a]
    return Value(tuple(dims), value.group, value.prefix, value.source)


def _matmul(interp: FlowInterpreter, node: fx.Node) -> Value:
    a, b = (interp.value(arg) for arg in node.args[:2])
    return _contract(interp, node, a, b)


def _contract(interp: FlowInterpreter, node: fx.Node, a: Value | None, b: Value | None) -> Value:
    """``a @ b``: a's last dim contracted with b's second to last, the dims before them broadcast."""
    if a is None or b is None or len(a.dims) < 2 or len(b.dims) < 2:
        raise Unsupported("a matmul with a tensor from outside the region or of rank < 2")
    interp.align(a.dims[-1], b.dims[-2], reason=f"'{node.name}' contracts it")
    # heads are batch dims of both operands; a factor of the rows or columns alone is not a head
    interp.block(a.dims[-2], f"'{node.name}' keeps it out of its batch dims")
    interp.block(b.dims[-1], f"'{node.name}' keeps it out of its batch dims")
    batch, prefix = interp.broadcast([Value(a.dims[:-2], a.group, a.prefix), Value(b.dims[:-2], b.group, b.prefix)])
    return Value(batch + (a.dims[-2], b.dims[-1]), interp.flow.join(a.group, b.group), prefix)


def _softmax(interp: FlowInterpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(dim, int):
        raise Unsupported("a softmax without an int dim")
    interp.block(value.dims[interp.axis(value, dim)], f"'{node.name}' normalizes along it")
    return value


def _getitem(interp: FlowInterpreter, node: fx.Node) -> Value:
    source, index = node.args
    found = interp.env.get(source.name)
    if isinstance(found, Pieces):
        if found.segments:  # a piece of a fused projection: where that piece's values start
            interp.flow.entries[node.name] = found.segments[index]
        return found.items[index]
    value = interp.value(source)
    listed = isinstance(index, tuple)
    index = index if listed else (index,)
    if value.prefix and (Ellipsis not in index or index[0] is not Ellipsis):
        raise Unsupported("indexing a tensor of unknown rank from the front")
    dims, out = list(value.dims), []
    position = len(dims) - sum(1 for i in index if i is not None and i is not Ellipsis) if index[0] is Ellipsis else 0
    out = dims[:position]
    for where, item in enumerate(index):
        if item is Ellipsis:
            continue
        if item is None:
            out.append(())
            continue
        dim = dims[position]
        position += 1
        if isinstance(item, slice) and item == slice(None):
            out.append(dim)
        elif isinstance(item, slice):
            at = (1, where) if listed else (1,)
            out.append(_part_of(interp, value, position - 1, item, node, (at + ("start",), at + ("stop",))))
        elif isinstance(item, int):
            interp.block(dim, f"'{node.name}' indexes it")
        else:
            raise Unsupported("indexing by a tensor")
    return Value(tuple(out + dims[position:]), value.group, value.prefix)


def _part_of(interp: FlowInterpreter, value: Value, axis: int, part: slice, node: fx.Node,
             locations: tuple[tuple[int | str, ...], tuple[int | str, ...]]) -> Dim:
    """Dim ``axis`` of ``value`` sliced by ``part`` (its start and stop held at ``locations`` in ``node``'s
    arguments): a piece of its feature factor (``qkv[..., :H*Dh]`` of a fused projection), or else a new
    dim that is never split."""
    if part.step in (None, 1):
        piece = interp.cut(value, axis, (part.start, part.stop), node, locations)
        if piece is not None:
            return piece
    return interp.sliced(value.dims[axis], part, node)


def _pieces(interp: FlowInterpreter, node: fx.Node) -> Pieces:
    """split / chunk / unbind along one dim: the outer factor picks the piece, the rest is kept."""
    name = rule_of(node, interp.modules).name
    value = interp.value(node.args[0])
    dim_position = 1 if name == "unbind" else 2
    dim_arg = node.kwargs.get("dim", node.args[dim_position] if len(node.args) > dim_position else 0)
    axis = interp.axis(value, dim_arg)
    dim = value.dims[axis]
    total = interp.dim_size(dim)
    if not total.is_int:
        raise Unsupported(f"'{name}' along a dim of unknown size")
    if name == "unbind":
        count, piece_dim = total.coeff, None
    else:
        raw, key = _split_sizes(node)
        spec = _known_ints(interp, raw)  # sizes read off tensors (x.split(C, -1)) as the numbers they are
        if isinstance(spec, (list, tuple)):
            if len(set(spec)) != 1:
                return _cut_pieces(interp, node, value, axis, list(spec), key)
            spec = spec[0]
        if not isinstance(spec, int) or total.coeff % spec:
            raise Unsupported(f"'{name}' by {spec!r} along a dim of size {total.coeff}")
        count = spec if name == "chunk" else total.coeff // spec
    outer, *inner = _take_from_left(interp, list(interp.expand(dim)), [Size(count), Size(total.coeff // count)])
    interp.block(outer, f"'{node.name}' picks pieces along it")
    piece_dim = inner[0] if name != "unbind" else None
    if name == "split":
        spec, key = _split_sizes(node)
        listed = isinstance(spec, (list, tuple))
        items = [interp.size_item(a, (node.name, (key, i) if listed else (key,)))
                 for i, a in enumerate(spec if listed else [spec])]
        interp.flow.shape_uses.append(ShapeUse(node.name, value.group, [piece_dim] * len(items), items))
    dims = [d for i, d in enumerate(value.dims) if i != axis or piece_dim is not None]
    if piece_dim is not None:
        dims[axis] = piece_dim
    item = Value(tuple(dims), value.group, value.prefix, value.source)
    return Pieces(tuple(item for _ in range(count)), value.group)


def _known_ints(interp: FlowInterpreter, spec: object) -> object:
    """A split size (or list of them) read at run time, ``x.split(C, dim=-1)``, as the number it is, where known."""
    if isinstance(spec, (list, tuple)):
        return type(spec)(_known_ints(interp, item) for item in spec)
    if isinstance(spec, fx.Node):
        size = interp.size_item(spec, None).size
        return size.coeff if size is not None and size.is_int else spec
    return spec


def _split_sizes(node: fx.Node) -> tuple[object, int | str]:
    """A split's sizes (or a chunk's count) and where ``node`` holds them (a position or a keyword)."""
    if len(node.args) > 1:
        return node.args[1], 1
    for key in ("split_size", "split_size_or_sections", "split_sizes", "sections", "chunks"):
        if key in node.kwargs:
            return node.kwargs[key], key
    raise Unsupported("a split whose sizes tpfx cannot find among its arguments")


def _cut_pieces(interp: FlowInterpreter, node: fx.Node, value: Value, axis: int, spec: list[object],
                key: int | str) -> Pieces:
    """``qkv.split([H*Dh, KV*Dh, KV*Dh], -1)``: unequal pieces of one feature factor, each a factor of its own
    (factorized by its own views); the sizes are recorded for the pairing to make them this rank's."""
    parts = interp.expand(value.dims[axis])
    if len(parts) != 1 or parts[0].factor is None:
        raise Unsupported(f"a split into unequal pieces {spec} of a dim that is not one feature factor")
    factor = parts[0].factor
    items = [interp.size_item(size, (node.name, (key, i))) for i, size in enumerate(spec)]
    sizes = [item.size.coeff if item.size is not None and item.size.is_int else 0 for item in items]
    if min(sizes) < 1 or sum(sizes) != interp.flow.factors.sizes[factor]:
        raise Unsupported(f"a split into pieces {spec} that are not known sizes adding up to its dim "
                          f"of size {interp.flow.factors.sizes[factor]}")
    pieces, cuts, start = [], [], 0
    for item, size in zip(items, sizes):
        pieces.append(interp.flow.factors.segment(factor, start, start + size))
        cuts.append(CutItem(item, factor, start, start + size))
        start += size
    interp.flow.cut_uses.append(CutUse(node.name, value.group, cuts))
    items_out = tuple(Value(value.dims[:axis] + ((Part(piece),),) + value.dims[axis + 1:], value.group, value.prefix,
                            value.source) for piece in pieces)
    return Pieces(items_out, value.group, segments=tuple(pieces))


def _sdpa(interp: FlowInterpreter, node: fx.Node) -> Value:
    q, k, v = (interp.value(arg) for arg in node.args[:3])
    if q is None or k is None or v is None:
        raise Unsupported("attention whose q, k or v is not from the region")
    interp.align(q.dims[-1], k.dims[-1], reason=f"'{node.name}' contracts it")
    interp.align(k.dims[-2], v.dims[-2])
    interp.block(v.dims[-1], f"'{node.name}' keeps it out of its batch dims")
    batch, prefix = _attention_batch(interp, q, k, v, node)
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    if interp.value(mask) is not None:
        raise Unsupported("an attention mask computed from the region")
    group = interp.flow.join(q.group, k.group, v.group)
    if isinstance(mask, fx.Node):  # the mask lines up with the scores: (..., heads, queries, keys)
        _meet_outside(interp, node, mask, batch + (q.dims[-2], k.dims[-2]), group)
    return Value(batch + (q.dims[-2], v.dims[-1]), group, prefix)


def _cat(interp: FlowInterpreter, node: fx.Node) -> Value:
    tensors = node.args[0]
    values = [interp.value(t) for t in tensors]
    if any(v is None for v in values):
        raise Unsupported("a cat with a tensor from outside the region")
    axis = interp.axis(values[0], node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
    sizes = [interp.dim_size(v.dims[axis]) for v in values]
    for v in values:
        interp.block(v.dims[axis], f"'{node.name}' concatenates along it")
    others = [Value(v.dims[:axis] + ((),) + v.dims[axis + 1:], v.group, v.prefix) for v in values]
    dims, prefix = interp.broadcast(others)
    total = Size(sum(s.coeff for s in sizes)) if all(s.is_int for s in sizes) else None
    dims = dims[:axis] + (interp.fresh(total, node, "concatenates along it"),) + dims[axis + 1:]
    return Value(dims, interp.flow.join(*(v.group for v in values)), prefix)


def _expand(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``k[:, :, None].expand(b, kv, n_rep, t, d)``: a size-1 dim grows into a new (broadcast) factor."""
    value = interp.value(node.args[0])
    items = interp.size_items(node, 1)
    if value.prefix or len(items) != len(value.dims):
        raise Unsupported("an expand that adds dims or of unknown rank")
    dims = []
    for dim, item in zip(value.dims, items):
        if item.size is None or interp.dim_size(dim) == item.size:
            dims.append(dim)
        elif not dim and item.size.is_int:
            dims.append((Part(interp.flow.factors.new(item.size.coeff)),))
        else:
            raise Unsupported(f"an expand of a dim to {item.size}")
    interp.flow.shape_uses.append(ShapeUse(node.name, value.group, dims, items))
    return Value(tuple(dims), value.group)


def _slice(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``aten.slice(x, dim, start, end)``: the whole range is a no-op; a part of a dim is a piece of it (see
    :func:`_part_of`)."""
    value = interp.value(node.args[0])
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    axis = interp.axis(value, dim)
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1:
        return value
    dims = list(value.dims)
    dims[axis] = _part_of(interp, value, axis, slice(start, end, step), node, ((2,), (3,)))
    return Value(tuple(dims), value.group, value.prefix, value.source)


def _select(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``aten.select(x, dim, index)``: one index of a dim, which goes away."""
    value = interp.value(node.args[0])
    axis = interp.axis(value, node.args[1])
    interp.block(value.dims[axis], f"'{node.name}' indexes it")
    return Value(value.dims[:axis] + value.dims[axis + 1:], value.group, value.prefix, value.source)


def _unsqueeze(interp: FlowInterpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    index = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    position = len(value.dims) + index + 1 if index < 0 else interp.axis(Value(value.dims + ((),), 0), index)
    return Value(value.dims[:position] + ((),) + value.dims[position:], value.group, value.prefix, value.source)


def _meet_outside(interp: FlowInterpreter, node: fx.Node, outside: fx.Node, dims: tuple[Dim, ...], group: int) -> None:
    """``node`` combines ``outside`` (a tensor from outside the region) element by element with a value of ``dims``.

    Along a dim of feature factors, ``outside`` is broadcast (size 1, or a dim it lacks) or full size
    (a bias holding every head); which factor is split across ranks is decided by pairing, so the
    meeting is recorded (:class:`~tpfx.passes.factors.OutsideOperand`), not blocked: pairing narrows
    the tensor to the rank's part or falls back with the reason. A shape unknown while tracing
    counts as full size along every such dim: the rank's part is then taken at run time, where a
    broadcast dim stays whole.
    """
    if is_python_value(outside, interp.modules):
        return  # a number (math.sqrt(q.size(-1))): the same for every element
    shape = interp.outside_shape(outside)
    meets = []
    for offset in range(1, len(dims) + 1):
        if not any(part.factor is not None for part in dims[-offset]):
            continue  # batch sizes only: the same on every rank
        if shape is not None and (offset > len(shape) or shape[-offset] == ONE):
            continue  # broadcast along it
        meets.append((-offset, dims[-offset]))
    interp.flow.outside.append(OutsideOperand(node.name, outside.name, group, tuple(meets)))


def _baddbmm(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``baddbmm(input, batch1, batch2, beta=, alpha=)``: the product of the registry's operands (1 and 2),
    plus ``input`` broadcast to it (ALiBi scores: a bias added to ``q @ k^T``)."""
    first, second = rule_of(node, interp.modules).operands
    if len(node.args) <= max(first, second):
        raise Unsupported("a baddbmm whose matrices are keyword arguments")
    product = _contract(interp, node, interp.value(node.args[first]), interp.value(node.args[second]))
    added = node.args[0] if node.args else node.kwargs.get("input")
    value = interp.value(added)
    if value is not None:
        dims, prefix = interp.broadcast([product, value])
        return Value(dims, interp.flow.join(product.group, value.group), prefix or product.prefix)
    if isinstance(added, fx.Node):
        _meet_outside(interp, node, added, product.dims, product.group)
    return product
def _attention_batch(interp: FlowInterpreter, q: Value, k: Value, v: Value,
                     node: fx.Node) -> tuple[tuple[Dim, ...], bool]:
    """The batch dims of an attention's output: q's, k's and v's lined up.

    With ``enable_gqa`` and fewer key/value heads than query heads, query head ``h`` reads key/value
    head ``h // (Hq // Hkv)`` (``repeat_interleave`` of k and v): q's head dim splits into (kv heads,
    repeats), the outer part lines up with k's and v's heads, the repeats are q's own.
    """
    parts = [Value(x.dims[:-2], x.group, x.prefix) for x in (q, k, v)]
    if not SDPA_GQA.read(node) or min(len(x.dims) for x in (q, k, v)) < 3:
        return interp.broadcast(parts)
    heads, kv_heads = interp.dim_size(q.dims[-3]), interp.dim_size(k.dims[-3])
    if heads == kv_heads:
        return interp.broadcast(parts)
    if not (heads.is_int and kv_heads.is_int) or heads.coeff % kv_heads.coeff:
        raise Unsupported(f"'{node.name}' groups {heads} query heads over {kv_heads} key/value heads")
    interp.align(k.dims[-3], v.dims[-3])
    kv_part, repeats = _take_from_left(interp, [p for p in interp.expand(q.dims[-3]) if interp.size_of(p) != ONE],
                                       [kv_heads, Size(heads.coeff // kv_heads.coeff)])
    interp.align(kv_part, k.dims[-3])
    batch, prefix = interp.broadcast([Value(x.dims[:-3], x.group, x.prefix) for x in (q, k, v)])
    return batch + (kv_part + repeats,), prefix


def _to_complex(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``view_as_complex(x)``: x's trailing dim of 2 becomes the (real, imaginary) pair of each element.

    The pair is carried by the value, hidden, until ``view_as_real`` gives it back as a dim; complex
    arithmetic mixes its two halves, so it is blocked.
    """
    value = _unary(interp, node)
    if not value.dims or interp.dim_size(value.dims[-1]) != Size(2):
        raise Unsupported("view_as_complex of a tensor whose last dim is not known to be 2")
    interp.block(value.dims[-1], f"'{node.name}' pairs it into complex numbers")
    return Value(value.dims[:-1], value.group, value.prefix, complex_pair=value.dims[-1])


def _to_real(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``view_as_real(z)``: the (real, imaginary) pair comes back as a trailing dim of 2 (a new blocked
    factor for a complex value that did not come from ``view_as_complex`` of the region)."""
    value = _unary(interp, node)
    pair = value.complex_pair
    if pair is None:
        pair = interp.fresh(Size(2), node, "splits complex numbers into it")
    return Value(value.dims + (pair,), value.group, value.prefix)


def _flatten(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``x.flatten(start, end)``: dims ``start..end`` become one dim made of their parts, outermost first."""
    value = _unary(interp, node)
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    if not value.dims and not value.prefix:
        return Value(((),), value.group)  # a 0-d tensor becomes 1-d
    first, last = interp.axis(value, start), interp.axis(value, end)
    merged = tuple(part for dim in value.dims[first:last + 1] for part in dim)
    return Value(value.dims[:first] + (merged,) + value.dims[last + 1:], value.group, value.prefix)


def _unflatten(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``x.unflatten(dim, sizes)``: one dim split into ``sizes`` (a view of that dim alone)."""
    value = _unary(interp, node)
    axis = interp.axis(value, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
    if len(node.args) > 2:
        items = interp.size_items(node, 2)
    else:
        items = [interp.size_item(a, (node.name, ("sizes", i))) for i, a in enumerate(node.kwargs["sizes"])]
    parts = [p for p in interp.expand(value.dims[axis]) if interp.size_of(p) != ONE]
    total = interp.dim_size(value.dims[axis])
    known = math.prod((i.size for i in items if i.size is not None), start=ONE)
    sizes = [i.size if i.size is not None else total.divide(known) for i in items]
    if any(size is None for size in sizes):
        raise Unsupported(f"-1 in '{node.name}' does not divide the size {total} of the dim")
    dims = _take_from_left(interp, parts, sizes)
    if parts:
        raise Unsupported(f"the sizes of '{node.name}' do not cover the dim it splits")
    interp.flow.shape_uses.append(ShapeUse(node.name, value.group, list(dims), items))
    return Value(value.dims[:axis] + tuple(dims) + value.dims[axis + 1:], value.group, value.prefix)


def _stack(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``torch.stack(tensors, dim)``: the tensors' dims line up; the new dim (one index per tensor) is blocked."""
    tensors = node.kwargs.get("tensors", node.args[0] if node.args else ())
    values = [interp.value(t) for t in tensors]
    if not values or any(v is None for v in values):
        raise Unsupported(f"'{node.name}' stacks a tensor from outside the region")
    dims, prefix = interp.broadcast(values)
    index = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    position = len(dims) + index + 1 if index < 0 else interp.axis(Value(dims + ((),), 0, prefix), index)
    new = interp.fresh(Size(len(values)), node, "stacks along it")
    return Value(dims[:position] + (new,) + dims[position:], interp.flow.join(*(v.group for v in values)), prefix)


def _reduce(interp: FlowInterpreter, node: fx.Node) -> Value:
    """A reduction over the given dims (every dim when none are given): their factors are blocked, and
    the dims go away (or stay as 1 with keepdim). A mean over Dh keeps the heads; one over the heads does not."""
    rule = rule_of(node, interp.modules)
    value = _unary(interp, node)
    given = rule.reduction.dims.read(node)
    keepdim = rule.reduction.keepdim.read(node) if rule.reduction.keepdim is not None else False
    every = given is None or isinstance(given, bool) or (isinstance(given, (list, tuple)) and not given)
    listed = [] if every else list(given) if isinstance(given, (list, tuple)) else [given]
    if not isinstance(keepdim, bool) or not all(isinstance(d, int) and not isinstance(d, bool) for d in listed):
        raise Unsupported(f"'{node.name}' reduces over dims or with a keepdim computed at run time")
    axes = set(range(len(value.dims))) if every else {interp.axis(value, d) for d in listed}
    for axis in axes:
        interp.block(value.dims[axis], f"'{node.name}' ({rule.name}) reduces over it")
    if every and not keepdim:
        return Value((), value.group)
    dims = [() if i in axes else dim for i, dim in enumerate(value.dims) if keepdim or i not in axes]
    return Value(tuple(dims), value.group, value.prefix)


def _norm(interp: FlowInterpreter, node: fx.Node) -> Value | Pieces:
    """A normalization over its normalized shape, the trailing dims (layer_norm, rms_norm): their factors
    are blocked (a per-head norm over Dh keeps the heads; one over H*Dh does not); its affine weight
    and bias are per element of those dims."""
    rule = rule_of(node, interp.modules)
    value = _unary(interp, node)
    if any(interp.value(a) is not None for _, a in tensor_operands(node) if a is not node.args[0]):
        raise Unsupported(f"'{node.name}' normalizes with a weight or bias computed from the region")
    held = rule.reduction.normalized_shape
    module = interp.modules.get(str(node.target)) if node.op == "call_module" else None
    shape = held.read(node) if held is not None else getattr(module, "normalized_shape", None)
    if not isinstance(shape, (list, tuple)):
        raise Unsupported(f"'{node.name}' ({rule.name}) has a normalized shape {shape!r} of unknown length")
    if len(shape) > len(value.dims) and not value.prefix:
        raise Unsupported(f"'{node.name}' normalizes over more dims than its input has")
    kept = value.dims[:max(len(value.dims) - len(shape), 0)]
    for dim in value.dims[len(kept):]:
        interp.block(dim, f"'{node.name}' ({rule.name}) normalizes over it")
    if not rule.reduction.statistics:
        return value
    statistics = Value(kept + ((),) * (len(value.dims) - len(kept)), value.group, value.prefix)
    return Pieces((value,) + (statistics,) * rule.reduction.statistics, value.group)


def _repeat_interleave(interp: FlowInterpreter, node: fx.Node) -> Value:
    """``k.repeat_interleave(n, dim=1)``: each position of the dim repeated n times in a row, so the dim gains a
    new inner factor of n (grouped-query keys and values repeated to the query heads, as an expand's)."""
    value = interp.value(node.args[0])
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if value is None or dim is None or node.kwargs.get("output_size") is not None:
        raise Unsupported("a repeat_interleave of a side operand, over the flattened tensor or with an output_size")
    item = interp.size_item(repeats, (node.name, (1,) if len(node.args) > 1 else ("repeats",)))
    if item.size is None or not item.size.is_int:
        raise Unsupported(f"a repeat_interleave by {repeats!r}, which is not a known int")
    axis = interp.axis(value, dim)
    added = (Part(interp.flow.factors.new(item.size.coeff)),) if item.size != ONE else ()
    interp.flow.shape_uses.append(ShapeUse(node.name, value.group, [added], [item]))
    dims = value.dims[:axis] + (value.dims[axis] + added,) + value.dims[axis + 1:]
    return Value(dims, value.group, value.prefix, value.source)


Rule = Callable[["FlowInterpreter", fx.Node], "Value | Pieces"]

# one rule per flow family of tpfx.passes.ops.Flow (SIZE and IGNORE are the interpreter's own business)
RULES: dict[Flow, Rule] = {
    Flow.UNARY: _unary, Flow.BROADCAST: _broadcast, Flow.VIEW: _view, Flow.PERMUTE: _permute,
    Flow.TRANSPOSE: _transpose, Flow.MATMUL: _matmul, Flow.SOFTMAX: _softmax, Flow.GETITEM: _getitem,
    Flow.PIECES: _pieces, Flow.SDPA: _sdpa, Flow.CAT: _cat, Flow.EXPAND: _expand, Flow.SLICE: _slice,
    Flow.SELECT: _select, Flow.UNSQUEEZE: _unsqueeze, Flow.BADDBMM: _baddbmm,
    Flow.COMPLEX: _to_complex, Flow.REAL: _to_real, Flow.FLATTEN: _flatten, Flow.UNFLATTEN: _unflatten,
    Flow.STACK: _stack, Flow.REDUCE: _reduce, Flow.NORM: _norm,
    Flow.REPEAT_INTERLEAVE: _repeat_interleave,
}
