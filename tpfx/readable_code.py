"""A graph's Python code as a person reads it: annotations as Python writes them.

torch.fx generates code that names each annotation's type by a global it registers, so the
signature of ``gm.code`` reads ``input_ids : _torch_Tensor_, mask : _torch_Tensor_None_ = None``.
:func:`readable_code` writes ``input_ids: Tensor, mask: Tensor | None = None`` instead (a type by its
own name, without its module); the rest of the code is fx's, unchanged.
"""

from __future__ import annotations

import re
import types
import typing

import torch.fx as fx


def readable_code(gm: fx.GraphModule) -> str:
    """``gm.code``, its ``def forward`` line written from the graph's placeholders with readable types."""
    lines = gm.code.split("\n")
    for index, line in enumerate(lines):
        if line.lstrip().startswith("def forward("):
            lines[index] = line[:len(line) - len(line.lstrip())] + signature_text(gm.graph)
            break
    return "\n".join(lines)


def signature_text(graph: fx.Graph) -> str:
    """``def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:``."""
    parameters = []
    for node in graph.find_nodes(op="placeholder"):
        text = node.target if node.type is None else f"{node.target}: {type_text(node.type)}"
        if node.args:  # a default value
            text += f" = {node.args[0]!r}"
        parameters.append(text)
    output = next(iter(graph.find_nodes(op="output")), None)
    returns = f" -> {type_text(output.type)}" if output is not None and output.type is not None else ""
    return f"def forward({', '.join(['self', *parameters])}){returns}:"


def type_text(annotation: object) -> str:
    """``Tensor``, ``Tensor | None``, ``tuple[Tensor, Tensor | None]``: an annotation as Python source."""
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is Ellipsis:
        return "..."
    arguments = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(argument) for argument in arguments)
    if origin is not None and arguments:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(a) for a in arguments)}]"
    if isinstance(annotation, type):
        return annotation.__qualname__
    if isinstance(annotation, str):  # the source text, where the model's file defers annotations (PEP 563)
        return _short_names(annotation)
    return _short_names(str(annotation))


def _short_names(text: str) -> str:
    """``tuple[torch.Tensor, typing.Any]`` -> ``tuple[Tensor, Any]``: each dotted name by its last part."""
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)
