"""Drawing: dot source with sharded modules and collectives marked; svg through graphviz when present."""

from __future__ import annotations

import re
import shutil

import pytest

import tpfx
from examples.gpt import GPTModel, small_config
from tpfx.passes.draw import COLLECTIVE_COLOUR, SHARD_COLOUR, DrawError, to_dot, to_svg


@pytest.fixture(scope="module")
def program():
    return tpfx.parallelize(GPTModel(small_config(n_layers=1)), tp=2, rank=0)


def _nodes(dot: str) -> dict[str, tuple[str, str]]:
    """node id -> (label, fill colour)."""
    return {m[0]: (m[1], m[2]) for m in re.findall(r'^  "([^"]+)" \[label="((?:[^"\\]|\\.)*)", fillcolor="([^"]+)"\];$',
                                                  dot, re.M)}


def test_collectives_and_shards_are_coloured(program):
    dot = to_dot(program, title="GPT rank 0")
    nodes = _nodes(dot)
    collectives = {name for name, (_, colour) in nodes.items() if colour == COLLECTIVE_COLOUR}
    shards = {name for name, (_, colour) in nodes.items() if colour == SHARD_COLOUR}
    assert collectives == {"copy_to_tp", "gather_from_tp", "copy_to_tp_1", "gather_from_tp_1"}
    assert shards == {"blocks_0_attn_qkv_proj", "blocks_0_ffn_fc1"}
    assert nodes["blocks_0_attn_qkv_proj"][0] == "blocks.0.attn.qkv_proj\\nColumnParallelLinear"
    assert nodes["blocks_0_attn_out_proj"][1] != SHARD_COLOUR  # replicated linear
    assert "size_1" not in nodes  # bookkeeping nodes are left out
    assert 'label="GPT rank 0"' in dot


def test_edges_follow_the_dataflow_around_a_shard(program):
    dot = to_dot(program)
    assert '  "blocks_0_ln1" -> "copy_to_tp";' in dot
    assert '  "copy_to_tp" -> "blocks_0_attn_qkv_proj";' in dot
    assert '  "blocks_0_attn_qkv_proj" -> "gather_from_tp";' in dot
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";$', dot, re.M)
    drawn = set(_nodes(dot))
    assert edges and all(a in drawn and b in drawn for a, b in edges)


def test_svg_without_dot_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DrawError, match=r"apt-get install graphviz.* or use --format dot$"):
        to_svg("digraph g { a -> b; }")


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' is not installed here")
def test_svg_with_dot(program):
    assert "<svg" in to_svg(to_dot(program))
