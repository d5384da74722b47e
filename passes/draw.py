"""Analysis: draw a rewritten graph as Graphviz dot (and svg through the ``dot`` program).

before (rewritten graph)::

    copy_to_tp = copy_to_tp(x, 'tp:0-1')
    h = self.fc1(copy_to_tp)                     # ColumnParallelLinear
    gather_from_tp = gather_from_tp(h, 'tp:0-1')

after (dot)::

    "copy_to_tp" [label="copy_to_tp\\ncopy_to_tp", fillcolor="#f4a261"];    # collective: orange
    "fc1" [label="fc1\\nColumnParallelLinear", fillcolor="#8ecae6"];        # shard: blue
    "copy_to_tp" -> "fc1"; "fc1" -> "gather_from_tp";

Bookkeeping nodes (``x.size()``, ``getattr``) are left out so the picture shows the data path.
"""

from __future__ import annotations

import shutil
import subprocess

import torch.fx as fx

from tpfx.passes.comm_table import is_sharded_module
from tpfx.passes.graph_view import META, op_kind
from tpfx.collectives import COLLECTIVES
from tpfx.errors import TpfxError

COLLECTIVE_COLOUR = "#f4a261"
SHARD_COLOUR = "#8ecae6"
IO_COLOUR = "#e0e0e0"
PLAIN_COLOUR = "#ffffff"


class DrawError(TpfxError):
    """A drawing cannot be made (the graphviz ``dot`` program is missing or fails)."""


def to_dot(gm: fx.GraphModule, *, title: str = "") -> str:
    """Graphviz source for ``gm.graph``: sharded modules blue, collectives orange, inputs/outputs grey.

    Args:
        gm: a (rewritten) GraphModule.
        title: a caption drawn above the graph.

    Returns:
        The dot source text.
    """
    modules = dict(gm.named_modules())
    drawn = {n.name for n in gm.graph.nodes if op_kind(n, modules) != META}
    lines = ["digraph tpfx {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    if title:
        lines.append(f"  labelloc=t; label={_quote(title)};")
    lines += _legend()
    for node in gm.graph.nodes:
        if node.name in drawn:
            label, colour = _label_and_colour(gm, node)
            lines.append(f"  {_quote(node.name)} [label={_quote(label)}, fillcolor={_quote(colour)}];")
    for node in gm.graph.nodes:
        for producer in node.all_input_nodes:
            if node.name in drawn and producer.name in drawn:
                lines.append(f"  {_quote(producer.name)} -> {_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _label_and_colour(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str]:
    if node.op == "call_function" and node.target in COLLECTIVES:
        return f"{node.name}\n{COLLECTIVES[node.target]}", COLLECTIVE_COLOUR
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        colour = SHARD_COLOUR if is_sharded_module(module) else PLAIN_COLOUR
        return f"{node.target}\n{type(module).__name__}", colour
    if node.op in ("placeholder", "output"):
        return f"{node.op}\n{node.name}", IO_COLOUR
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name}\n{target}", PLAIN_COLOUR


def _legend() -> list[str]:
    return ["  subgraph cluster_legend {", '    label="legend"; fontname="Helvetica";',
            f'    legend_shard [label="sharded module", fillcolor="{SHARD_COLOUR}"];',
            f'    legend_collective [label="collective", fillcolor="{COLLECTIVE_COLOUR}"];',
            "  }"]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_svg(dot_source: str, *, timeout_s: float = 120) -> str:
    """Render dot source to svg with the graphviz ``dot`` program.

    Raises:
        DrawError: ``dot`` is not on PATH (the message says how to install it) or it fails.
    """
    program = shutil.which("dot")
    if program is None:
        raise DrawError("--format svg needs the graphviz 'dot' program, which is not on PATH; install it "
                        "(apt-get install graphviz, brew install graphviz) or use --format dot")
    done = subprocess.run([program, "-Tsvg"], input=dot_source, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[0]
        raise DrawError(f"graphviz 'dot -Tsvg' failed: {reason}; save --format dot and inspect it")
    return done.stdout
