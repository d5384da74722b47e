"""Graph passes of tpfx: each file holds one analysis or rewrite, a function of a GraphModule.

This folder is installed as the subpackage ``tpfx.passes`` (``package-dir`` in pyproject.toml), so
nothing named ``passes`` lands at the top level of site-packages. Imports run one way: the passes
import tpfx's runtime (layers, collectives, errors), never its API.
"""
