"""Rewrite: a pair's copy-to and all-reduce moved to the (batch, seq, width) side of a view that flattens tokens.

before (GPT-2's Conv1D works on ``(batch*seq, width)``; a megatron program)::

    view_1 = view(ln_1, [-1, 64]);  copy = copy_to_tp(view_1);  addmm = addmm(bias, copy, w)
    r = reduce_from_tp(mm);  add = r + c_proj_bias;  view_7 = view(add, [B, T, 64])

after::

    copy = copy_to_tp(ln_1);  view_1 = view(copy, [-1, 64]);  addmm = addmm(bias, view_1, w)
    view_7 = view(mm, [B, T, 64]);  r = reduce_from_tp(view_7);  add = r + c_proj_bias

A copy-to is the identity forward and an all-reduce sums elementwise, so both commute with a view that
merges (or splits) the leading token dims, and with adding a tensor of the last dim (a bias). Afterwards
the collectives read and make values with a sequence dim, and :mod:`tpfx.passes.sequence_parallel` can
turn them into an all-gather and a reduce-scatter along it. Which collectives move is the op registry's
word: those with a ``from_sequence`` or an ``into_sequence`` form.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from tpfx.passes.ops import Flow, rule_of
from tpfx.passes.sequence_parallel import SequenceShapes, collective_rule, sequence_symbols


def _merges_tokens(view: fx.Node, shapes: SequenceShapes, modules: dict[str, nn.Module]) -> bool:
    """A view whose input holds the sequence and whose output merges it into one token dim (the same last dim)."""
    rule = rule_of(view, modules)
    if rule is None or rule.flow is not Flow.VIEW or not view.args:
        return False
    before, after = view.args[0].meta.get("val") if isinstance(view.args[0], fx.Node) else None, view.meta.get("val")
    return (shapes.seq_dim(view.args[0]) is not None and after is not None and before is not None
            and not shapes.of(view)[1] and after.dim() < before.dim() and after.shape[-1] == before.shape[-1])


def lift_flattened_collectives(gm: fx.GraphModule) -> int:
    """Move the pairs' collectives to where the tokens have a sequence dim (see the module docstring).

    Only the graph changes (node values are kept for the analysis that follows). Returns how many moved.
    """
    modules = dict(gm.named_modules())
    shapes = SequenceShapes(gm, sequence_symbols(gm), modules)
    moved = 0
    for node in list(gm.graph.nodes):
        rule = collective_rule(node)
        if rule is None:
            continue
        if rule.from_sequence is not None and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1 \
                and _merges_tokens(node.args[0], shapes, modules):
            moved += _lift_copy(gm, node)
        elif rule.into_sequence is not None and shapes.seq_dim(node.args[0]) is None:
            moved += _sink_sum(gm, node, shapes, modules)
    return moved


def _lift_copy(gm: fx.GraphModule, copy: fx.Node) -> int:
    view = copy.args[0]
    with gm.graph.inserting_before(copy):
        lifted = gm.graph.node_copy(copy, lambda n: view.args[0] if n is view else n)
        flattened = gm.graph.node_copy(view, lambda n: lifted if n is view.args[0] else n)
    flattened.meta["val"] = view.meta.get("val")
    copy.replace_all_uses_with(flattened)
    gm.graph.erase_node(copy)
    gm.graph.erase_node(view)
    return 1


def _sink_sum(gm: fx.GraphModule, total: fx.Node, shapes: SequenceShapes, modules: dict[str, nn.Module]) -> int:
    """``view(bias_adds(reduce(m)))`` with the view un-merging the tokens -> ``bias_adds(reduce(view(m)))``."""
    chain, current = [], total
    while len(current.users) == 1:
        user = next(iter(current.users))
        rule = rule_of(user, modules)
        if rule is not None and rule.flow is Flow.VIEW and user.args[0] is current:
            view_value, flat_value = user.meta.get("val"), total.args[0].meta.get("val")
            if (view_value is None or flat_value is None or shapes.seq_dim(user) is None
                    or view_value.shape[-1] != flat_value.shape[-1]):
                return 0
            break
        # an elementwise op with tensors of at most the last dim (a bias): the same on either shape
        others = [shapes.of(arg) for arg in user.all_input_nodes if arg is not current]
        if rule is None or rule.flow is not Flow.BROADCAST or any(o is None or o[0] > 1 for o in others):
            return 0
        chain.append(user)
        current = user
    else:
        return 0
    view = next(iter(current.users))
    with gm.graph.inserting_before(view):
        unflattened = gm.graph.node_copy(view, lambda n: total.args[0] if n is current else n)
        unflattened.meta["val"] = view.meta.get("val")
        replayed = {total: gm.graph.node_copy(total, lambda n: unflattened if n is total.args[0] else n)}
        for op in chain:
            replayed[op] = gm.graph.node_copy(op, lambda n: replayed.get(n, n))
    view.replace_all_uses_with(replayed[current])
    for old in (view, *reversed(chain), total):
        gm.graph.erase_node(old)
    return 1
