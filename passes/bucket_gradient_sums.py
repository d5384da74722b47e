"""Rewrite: the copy-tos of whole parameters become one collective per group and dtype.

A parameter every rank holds whole but reads on its own part of the work (a norm's weight or a row
linear's bias on the rank's slice of the sequence, a per-head norm on the rank's heads) passes a
copy-to (:func:`tpfx.collectives.copy_to_tp`): identity forward, its gradient summed over the group
backward. Each is one all-reduce of a few hundred bytes, and a small collective costs its latency
whatever its size (about 1.2-1.9 ms each for gloo on 2 CPU cores, 14 of them a step in the small
benchmark GPT with sequence parallelism). This pass puts them together::

    copy_to_tp = copy_to_tp(blocks_0_ln1_weight, 'tp:0-1')
    copy_to_tp_1 = copy_to_tp(blocks_0_ln1_bias, 'tp:0-1')          # ... one per parameter

becomes::

    sum_gradients_over_tp = sum_gradients_over_tp([blocks_0_ln1_weight, blocks_0_ln1_bias, ...], 'tp:0-1')
    getitem = sum_gradients_over_tp[0]                               # read where copy_to_tp was
    getitem_1 = sum_gradients_over_tp[1]

placed where the first of them was. Backward sums every gradient in one all-reduce, once all of them
are in (after the backward of the earliest read); the ranks run the same graph, so they reach it
together. Copy-tos of computed tensors (an activation before a column-parallel linear) stay as they
are: their gradient is needed at once by what comes before them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tpfx.collectives import copy_to_tp, sum_gradients_over_tp


def bucket_gradient_sums(gm: fx.GraphModule) -> list[fx.Node]:
    """Replace the copy-tos of parameters in ``gm`` by one :func:`sum_gradients_over_tp` per group key and
    dtype (only where there are two or more). Only the graph changes: the caller recompiles.

    Returns:
        The bucket nodes made, in graph order.
    """
    parameters = dict(gm.named_parameters(remove_duplicate=False))
    buckets: dict[tuple[str, torch.dtype], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not copy_to_tp or node.kwargs:
            continue
        read, key = node.args
        if isinstance(read, fx.Node) and read.op == "get_attr" and str(read.target) in parameters:
            buckets.setdefault((key, parameters[str(read.target)].dtype), []).append(node)
    made = []
    for (key, _), copies in buckets.items():
        if len(copies) < 2:
            continue
        with gm.graph.inserting_before(copies[0]):
            reads = [gm.graph.get_attr(str(copy.args[0].target)) for copy in copies]
            bucket = gm.graph.call_function(sum_gradients_over_tp, (reads, key))
            items = [gm.graph.call_function(operator.getitem, (bucket, index)) for index in range(len(copies))]
        for copy, item in zip(copies, items):
            read = copy.args[0]
            copy.replace_all_uses_with(item)
            gm.graph.erase_node(copy)
            if not read.users:
                gm.graph.erase_node(read)
        made.append(bucket)
    return made
