"""Another call form may read a sharded parameter only as its linear's weight or its embedding's table.

Each model here reads a weight the plan shards only in a form the program was not built with (an
optional argument given, the other train/eval mode, a loss). Mapped by name onto the plan, that read
would see the rank's shard: the numbers would be silently wrong. The first call of such a form must
raise one line naming the parameter and the node; a form that reads the weight through a linear
(``x @ w.T``) is fine. No process group is needed: the form is rewritten before it runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from tests.models import HEAD, HEADS, WIDTH, _attend
from tpfx.errors import ShardingError


class _Block(nn.Module):
    """Attention and an FFN; ``scale`` (optional) or train mode add a read of fc1's weight or bias, or (``scale
    linear``) apply fc1 by its weight."""

    def __init__(self, extra: str) -> None:
        super().__init__()
        self.extra = extra
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)
        x = x + self.out(_attend(q, k, v).transpose(1, 2).reshape(b, t, WIDTH))
        if self.extra == "scale linear" and scale is not None:  # fc1 applied as ``x @ w.T``: a linear all the same
            h = self.fc2(torch.relu(x @ self.fc1.weight.T)) * scale
        else:
            h = self.fc2(torch.relu(self.fc1(x)))
        if self.extra == "scale read" and scale is not None:
            h = h * self.fc1.weight.square().mean() * scale  # the whole weight's mean, on one device
        if self.extra == "train read" and self.training:
            h = h + self.fc1.bias.mean()
        return x + h


class _TableRead(nn.Module):
    """An embedding and an LM head; with labels, a penalty on the table's norm (the whole table on one device)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(64, WIDTH), nn.Linear(WIDTH, 64, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.head(torch.tanh(self.embed(ids)))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + self.embed.weight.square().sum() * 1e-3


X = torch.randn(2, 8, WIDTH, generator=torch.Generator().manual_seed(0))
SCALE = torch.tensor(0.5)


@pytest.mark.parametrize("mode", ["gather", "megatron"])
def test_an_exported_form_that_reads_a_sharded_weight_elsewhere_is_one_line(mode):
    gm = tpfx.parallelize(_Block("scale read").eval(), tp=2, rank=0, mode=mode, tracer="export", example_inputs=(X,))
    with pytest.raises(ShardingError) as error:
        gm.module_for_call(X, SCALE)
    message = str(error.value)
    assert "\n" not in message and "scale=tensor float32 0-d" in message
    assert "reads the sharded parameter 'fc1.weight' in node 'square' (square)" in message
    assert "build the program with this call form" in message


def test_a_traced_form_of_the_other_mode_that_reads_a_sharded_bias_is_one_line():
    gm = tpfx.parallelize(_Block("train read").eval(), tp=2, rank=0, mode="megatron")
    gm.module_for_call(X)  # the program's own form
    gm.train()
    with pytest.raises(ShardingError, match=r"call form \(train, .*\) reads the sharded parameter 'fc1.bias' in node"):
        gm.module_for_call(X)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_form_that_applies_the_sharded_weight_as_a_linear_is_built(tracer):
    model = _Block("scale linear").eval()
    gm = tpfx.parallelize(model, tp=2, rank=0, mode="gather", tracer=tracer, example_inputs=(X,))
    form = gm.module_for_call(X, SCALE)
    assert form is not gm or tracer == "fx"  # fx traces the optional argument with the first form


def test_a_loss_form_that_reads_a_vocab_parallel_table_elsewhere_is_one_line():
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    gm = tpfx.parallelize(_TableRead().eval(), tp=2, rank=0, mode="megatron", vocab_parallel=True, tracer="export",
                          example_inputs=(ids,))
    assert {"embed.weight", "head.weight"} <= set(gm.tpfx_plan.shard_specs())
    with pytest.raises(ShardingError, match=r"reads the sharded parameter 'embed.weight' in node '\w+' \(\w+\)"):
        gm.module_for_call(ids, ids)
