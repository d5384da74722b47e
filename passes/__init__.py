"""Graph passes of tpfx: each file holds one analysis or rewrite, a function of a GraphModule."""
