"""Another call form may read a sharded parameter only where the plan's rewrite puts the shard.

The plan is decided on the program's own trace, where the finders keep a linear (or an embedding
table) whole when anything else reads its weight. Another call form (an optional argument given, the
other train/eval mode) is traced later and mapped onto that plan by parameter name; it can read a
weight the plan shards in a way the first trace never did, for example::

    if scale is not None:
        h = h * self.fc1.weight.square().mean()   # every rank would see its own rows of fc1.weight

On the rank's program that read sees the rank's shard, not the whole weight, and the numbers are
silently wrong. This pass checks every read of a sharded parameter in the new trace: as the weight
or bias of a linear (also through a transpose, ``x @ w.T``) or as the table of an embedding lookup,
which the rewrite handles; anything else is a one-line :class:`~tpfx.errors.ShardingError`.
"""

from __future__ import annotations

import torch.fx as fx

from tpfx.errors import ShardingError
from tpfx.passes.graph_view import parameter_shapes, read_as_layer_operand
from tpfx.passes.ops import op_label
from tpfx.passes.plan import Plan


def check_sharded_reads(gm: fx.GraphModule, plan: Plan, *, form: str) -> None:
    """Raise unless every read of a parameter ``plan`` shards is one the rewrite gives the shard to.

    Args:
        gm: another call form's trace (before the rewrite), over the program's modules.
        plan: the program's plan.
        form: names the call form in the message.

    Raises:
        ShardingError: a node reads a sharded parameter otherwise (one line: the parameter, the node, the fix).
    """
    sharded = set(plan.shard_specs())
    if not sharded:
        return
    parameters = parameter_shapes(gm)
    modules = dict(gm.named_modules())
    for getter in gm.graph.find_nodes(op="get_attr"):
        if str(getter.target) not in sharded:
            continue
        for user in getter.users:
            if not read_as_layer_operand(user, getter, parameters, modules, bias_too=True):
                raise ShardingError(
                    f"call form {form} reads the sharded parameter '{getter.target}' in node '{user.name}' "
                    f"({op_label(user, modules)}), not as its linear's weight or an embedding table, so each rank "
                    "would compute with its own shard; build the program with this call form (example_inputs= "
                    "with these arguments, in this mode), whose plan keeps that parameter whole")
