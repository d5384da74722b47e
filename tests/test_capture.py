"""Capture and call forms: buffer slicing by traced sizes, one graph per form, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tpfx
from examples.gpt import GPTModel, small_config
from tpfx.capture import CallForm, call_form_of, capture, forward_signature


def test_buffer_sliced_by_traced_length_is_captured():
    gm = capture(GPTModel(small_config(n_layers=1)))
    slices = [n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)
              and any(isinstance(a, tuple) for a in n.args)]
    assert any(n.args[0].op == "get_attr" and n.args[0].target.endswith("causal_mask") for n in slices)


def test_traced_graph_equals_eager_for_its_form():
    torch.manual_seed(0)
    model = GPTModel(small_config(n_layers=1)).eval()
    ids = torch.randint(0, 100, (2, 9))
    gm = capture(model, CallForm(frozenset({"attention_mask", "labels"}), training=False))
    torch.testing.assert_close(gm(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_call_form_of_binds_positional_and_keyword_arguments():
    signature = forward_signature(GPTModel(small_config(n_layers=1)))
    ids = torch.zeros(1, 2, dtype=torch.long)
    assert call_form_of(signature, (ids,), {}, training=False).absent == {"attention_mask", "labels"}
    assert call_form_of(signature, (ids, ids), {}, training=True) == CallForm(frozenset({"labels"}), True)
    assert call_form_of(signature, (ids,), {"labels": ids, "attention_mask": None}, training=False).absent == {
        "attention_mask"}
    with pytest.raises(tpfx.ConfigError, match="call does not match forward"):
        call_form_of(signature, (), {"nonsense": 1}, training=False)


def test_program_builds_each_call_form_once_and_shares_parameters():
    torch.manual_seed(0)
    model = GPTModel(small_config(n_layers=1)).eval()
    gm = tpfx.parallelize(model, tp=2, rank=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    built = gm.module_for_call(ids, ids)
    assert built is not gm and built is gm.module_for_call(ids, attention_mask=ids, labels=None)
    assert gm.module_for_call(ids, ids, ids) is gm
    assert {id(p) for p in built.parameters()} <= {id(p) for p in gm.parameters()}
    assert "labels has been specialized to have value None" in built.code
    assert "attention_mask has been specialized" not in built.code
    with pytest.raises(tpfx.ConfigError, match="not bound in this process"):
        gm(torch.zeros(1, 4, dtype=torch.long))  # an inspection program never runs a collective


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value cannot be traced
            return x
        return -x


def test_untraceable_model_gets_one_line_naming_the_module():
    with pytest.raises(tpfx.CaptureError) as info:
        capture(_DataDependent())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot capture _DataDependent with torch.fx (train, all arguments): "
                              "module 'inner' (_Branchy) failed: TraceError")


def test_other_forms_keep_no_tensor_alive_after_the_program_moves():
    """The skeleton other forms are traced from holds only meta tensors and the program's own."""
    import gc
    import weakref

    model = GPTModel(small_config(n_layers=2)).eval()
    gm = tpfx.parallelize(model, tp=2, rank=0)
    del model
    old = [weakref.ref(buffer) for buffer in gm.buffers()]
    assert old  # the causal masks
    gm._apply(lambda tensor: tensor.clone())  # what .to(device) does: new buffer tensors
    gc.collect()
    assert [ref for ref in old if ref() is not None] == []
    ids = torch.zeros(1, 4, dtype=torch.long)
    built = gm.module_for_call(ids, ids)  # traced after the move, from the skeleton
    assert {id(b) for b in built.buffers()} <= {id(b) for b in gm.buffers()}


def test_tracing_another_form_leaves_the_program_modes_alone():
    model = GPTModel(small_config(n_layers=1)).train()
    gm = tpfx.parallelize(model, tp=2, rank=0)
    gm.eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    gm.module_for_call(ids, ids)  # an eval form traced from a skeleton built in train mode
    assert [name for name, module in gm.named_modules() if module.training] == []


class _SharedBuffer(nn.Module):
    """One tensor registered as a buffer under two names, read through the second; and one more buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Module()
        self.first.register_buffer("scale", torch.full((3,), 2.0))
        self.second = nn.Module()
        self.second.register_buffer("scale", self.first.scale)
        self.register_buffer("offset", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.second.scale + self.offset


def test_tensor_attributes_get_fx_names_with_one_walk_of_the_root():
    """get_attr targets equal plain fx's, and the root's buffers are listed once per trace, not per read."""
    model = _SharedBuffer()

    class _Plain(torch.fx.Tracer):
        proxy_buffer_attributes = True

    expected = [n.target for n in _Plain().trace(model).nodes if n.op == "get_attr"]
    walks = []
    original = model.named_buffers
    model.named_buffers = lambda *a, **k: (walks.append(1), original(*a, **k))[1]
    gm = capture(model)
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == expected == ["first.scale", "offset"]
    assert len(walks) == 1
    torch.testing.assert_close(gm(torch.ones(3)), torch.full((3,), 3.0))


class _DeviceFromRootParameter(nn.Module):
    """Reads a device off its first parameter, which is registered on the root (as ``self.device`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.full((4,), 0.5))
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(x.size(1), device=next(self.parameters()).device)  # a traced size: a node
        y = self.inner(x) + self.offset + positions[None, :, None]
        return y if mask is None else y * mask[..., None]


def test_another_form_traced_from_the_weightless_copy_runs_on_the_programs_device():
    """The copy's root parameter is a meta placeholder: device constants traced from it are retargeted."""
    torch.manual_seed(0)
    model = _DeviceFromRootParameter()
    gm = tpfx.parallelize(model, tp=2, rank=0)  # no sites: no collectives, so it runs without a group
    x, mask = torch.randn(2, 3, 4), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(gm(x), model(x))
    assert "meta" not in gm.module_for_call(x, mask).code
    torch.testing.assert_close(gm(x, mask), model(x, mask))


class _ConstantPerForm(nn.Module):
    """Each call form makes its own tensor constant while tracing; fx names both ``_tensor_constant0``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self.inner(x) + torch.arange(4.0)
        return (self.inner(x) + torch.full((4,), 10.0)) * mask[..., None]


def test_each_form_runs_with_the_constants_traced_for_it():
    torch.manual_seed(0)
    model = _ConstantPerForm()
    attributes = set(vars(model))
    gm = tpfx.parallelize(model, tp=2, rank=0)  # no sites: no collectives, so it runs without a group
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(x, mask), model(x, mask))  # not the other form's constant of the same name
    torch.testing.assert_close(capture(model)(x, mask), model(x, mask))
    assert set(vars(model)) == attributes  # capture leaves the constants it records on its GraphModule only


class _ConstantFromWeight(nn.Module):
    """Computes a constant from a weight's values while tracing (an eager op on a concrete parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((4,), 0.5))  # on the root: a meta placeholder in the weightless copy
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scale = next(self.parameters()).detach().abs().sum()  # concrete while tracing: a tensor constant
        y = self.inner(x) * scale
        return y if mask is None else y * mask[..., None]


def test_a_constant_computed_from_a_placeholder_is_a_one_line_error_not_a_meta_tensor_at_run_time():
    gm = tpfx.parallelize(_ConstantFromWeight(), tp=2, rank=0)
    x = torch.randn(2, 3, 4)
    with pytest.raises(tpfx.ConfigError, match=r"cannot trace \(train, without mask\) .* constant '_tensor_constant") as error:
        gm(x)
    assert "\n" not in str(error.value)


class _UnpacksPerLayer(nn.Module):
    """Each layer unpacks a traced size (``b, t, c = x.size()``), as a GPT block does."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            b, t, c = x.size()
            first, second = layer(x).chunk(2, dim=-1)  # unpacking a traced tuple of tensors
            x = torch.cat([second, first], dim=-1).view(b, t, c)
        return x


def test_unpacking_reads_each_function_once_and_leaves_no_garbage_cycles():
    """fx's proxy disassembles the caller on every unpacking and leaves a frame cycle each time; ours does not."""
    import dis
    import gc
    from unittest import mock

    torch.manual_seed(0)
    model = _UnpacksPerLayer(layers=4)
    reads = []
    original = dis.get_instructions
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects are kept in gc.garbage instead of freed
    try:
        with mock.patch.object(dis, "get_instructions", lambda code, **kw: (reads.append(code), original(code, **kw))[1]):
            gm = capture(model)
        gc.collect()
        frames = [o for o in gc.garbage if type(o).__name__ == "frame"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert len(reads) <= 1  # the forward's code, once for 8 unpackings (0 when an earlier test read it)
    assert frames == []
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_iterating_a_proxy_outside_unpacking_is_one_line_naming_the_module():
    class _LoopsOverTensor(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(row for row in x)

    with pytest.raises(tpfx.CaptureError) as error:
        capture(_LoopsOverTensor())
    assert "\n" not in str(error.value) and "iterate" in str(error.value).lower()
