"""Module hooks are never lost silently: carried onto a shard when it sees what one device sees, else the
linear (or the megatron pair) stays whole and the reason names the hook; captures that would drop a hook
refuse it in one line.

One spawn (tp=2, gloo, fp32) checks the numbers of every hooked model, both modes, fx and export.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook

import tpfx
from tpfx.errors import CaptureError, NoSitesWarning, ShardingError
from tpfx.layers import ColumnParallelLinear, RowParallelLinear
from tpfx.passes.find_sites import find_sites
from tpfx.passes.module_hooks import HookKind, Placement, carry_hooks, hooks_keep_whole, module_hooks
from tests.multiprocess import run_ranks
from tests.parity import grad_diffs, max_diff

D, HIDDEN, HEADS = 16, 32, 4
TOL = 1e-5


class Block(nn.Module):
    """h = inp(x); h + fc2(act(fc1(h))): ``inp`` is upstream, so input gradients reach a parameter."""

    def __init__(self, fc2_bias: bool = True) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D, bias=fc2_bias)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return h + self.fc2(self.act(self.fc1(h)))


class Net(nn.Module):
    def __init__(self, fc2_bias: bool = True) -> None:
        super().__init__()
        self.block = Block(fc2_bias)
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class Attention(nn.Module):
    """Separate q, k, v projections into SDPA, then an output projection and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, HEADS, D // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.wo(a.transpose(1, 2).reshape(b, t, D))


# the hooks: each changes the numbers, so one that is dropped, or run on a shard's slice, shows
SEEN: list[str] = []  # the module classes squash ran on, in this process


def center(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output - output.mean(-1, keepdim=True)  # on a column shard the mean would be of its slice


def squash(module: nn.Module, args: tuple) -> tuple[torch.Tensor]:
    SEEN.append(type(module).__name__)
    return (torch.tanh(args[0]),)


def halve_grad(module: nn.Module, grad_output: tuple) -> tuple[torch.Tensor]:
    return (grad_output[0] * 0.5,)


def double_input_grad(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple[torch.Tensor]:
    return (grad_input[0] * 2,)


# (model, module path, how to register, the hook)
HOOKED = {
    "forward hook on fc1": (Net, "block.fc1", "register_forward_hook", center),
    "pre-hook on fc1": (Net, "block.fc1", "register_forward_pre_hook", squash),
    "forward hook on fc2": (Net, "block.fc2", "register_forward_hook", center),
    "pre-hook on fc2": (Net, "block.fc2", "register_forward_pre_hook", squash),
    "backward pre-hook on fc2": (Net, "block.fc2", "register_full_backward_pre_hook", halve_grad),
    "backward pre-hook on fc2 without bias": (lambda: Net(fc2_bias=False), "block.fc2", "register_full_backward_pre_hook",
                                              halve_grad),
    "backward hook on fc1": (Net, "block.fc1", "register_full_backward_hook", double_input_grad),
    "forward hook on the activation": (Net, "block.act", "register_forward_hook", center),
    "forward hook on wq": (Attention, "wq", "register_forward_hook", center),
    "pre-hook on wk": (Attention, "wk", "register_forward_pre_hook", squash),
}


# torch.export traces forward hooks into the graph (backward ones it drops: refused, see below)
EXPORTED = ("forward hook on fc1", "pre-hook on fc1", "forward hook on fc2", "pre-hook on fc2")


def hooked(label: str) -> nn.Module:
    make, path, register, hook = HOOKED[label]
    torch.manual_seed(0)
    model = make()
    getattr(model.get_submodule(path), register)(hook)
    return model


def _decisions(gm: nn.Module) -> dict[str, dict]:
    return {row["module"]: row for row in gm.tpfx_report.linear_decisions()}


# ---------------------------------------------------------------- the rule, per hook kind and shard


@pytest.mark.parametrize("register, hook, column, row", [
    ("register_forward_pre_hook", squash, True, False),
    ("register_forward_hook", center, False, False),
    ("register_full_backward_pre_hook", halve_grad, False, True),
    ("register_full_backward_hook", double_input_grad, False, False),
    ("register_backward_hook", double_input_grad, False, False),
])
def test_what_each_hook_kind_allows(register, hook, column, row):
    net = Net()
    net.block.fc1.bias = None  # a row shard keeps a backward pre-hook only without a bias (see the next test)
    getattr(net.block.fc1, register)(hook)
    for placement, carried in ((Placement.COLUMN, column), (Placement.ROW, row)):
        why = hooks_keep_whole(net.block.fc1, "block.fc1", placement)
        assert (why == "") == carried
        if not carried:
            kind = module_hooks(net.block.fc1)[0].kind.value
            assert why.startswith(f"'block.fc1' has a {kind} '{hook.__name__}', which on a {placement.value}-parallel shard")
            assert "remove the hook" in why and "\n" not in why


def test_a_carried_pre_hook_with_kwargs_runs_on_the_shard():
    linear = nn.Linear(D, HIDDEN)
    linear.register_forward_pre_hook(lambda module, args, kwargs: ((torch.tanh(args[0]),), kwargs), with_kwargs=True)
    shard = carry_hooks(linear, ColumnParallelLinear(linear, tp=2, rank=1), Placement.COLUMN, path="fc")
    x = torch.randn(3, D)
    torch.testing.assert_close(shard(x), linear(x)[:, HIDDEN // 2:])  # rank 1's columns, the hook applied on both


def test_a_global_hook_counts_as_a_hook_of_every_linear():
    handle = register_module_forward_hook(center)
    try:
        finding = find_sites(tpfx.capture(Net()), tp=2)
    finally:
        handle.remove()
    assert finding.sites == ()
    reason = {r.module_path: r.reason for r in finding.replicated}["block.fc1"]
    assert "has a global forward hook 'center'" in reason and "remove the global hook" in reason


def test_carry_refuses_a_hook_the_shard_cannot_keep():
    net = hooked("forward hook on fc1")
    with pytest.raises(ShardingError, match=r"cannot replace 'block.fc1' has a forward hook 'center'"):
        carry_hooks(net.block.fc1, ColumnParallelLinear(net.block.fc1, tp=2, rank=0), Placement.COLUMN,
                    path="block.fc1")


# ---------------------------------------------------------------- what the program and its report say


def test_gather_keeps_a_forward_hooked_linear_whole_and_explains_it():
    with pytest.warns(NoSitesWarning, match=r"'block.fc1' \[32, 16\]: kept whole: 'block.fc1' has a forward hook"):
        gm = tpfx.parallelize(hooked("forward hook on fc1"), tp=2, rank=0)  # its only site
    assert type(gm.block.fc1) is nn.Linear and gm.block.fc1._forward_hooks  # whole, the hook still on it
    reason = _decisions(gm)["block.fc1"]["reason"]
    assert reason.startswith("kept whole: 'block.fc1' has a forward hook 'center', which on a column-parallel "
                             "shard would see this rank's slice of the output; remove the hook")
    assert "parent module 'block'" in reason


@pytest.mark.parametrize("mode", ["gather", "megatron"])
def test_a_carried_pre_hook_is_on_the_shard(mode):
    gm = tpfx.parallelize(hooked("pre-hook on fc1"), tp=2, rank=0, mode=mode)
    assert isinstance(gm.block.fc1, ColumnParallelLinear)
    assert [h.function for h in module_hooks(gm.block.fc1)] == [squash]
    if mode == "megatron":
        assert [p.row_module_path for p in gm.tpfx_pairing.pairs] == ["block.fc2"]


def test_megatron_falls_back_when_the_row_partner_has_a_forward_hook():
    gm = tpfx.parallelize(hooked("forward hook on fc2"), tp=2, rank=0, mode="megatron")
    (fallback,) = gm.tpfx_pairing.fallbacks
    assert fallback.reason.startswith("'block.fc2' has a forward hook 'center', which on a row-parallel shard "
                                      "would see a partial sum of the output")
    decisions = _decisions(gm)
    assert "not paired, column + all-gather: 'block.fc2' has a forward hook 'center'" in decisions["block.fc1"]["reason"]
    assert not decisions["block.fc2"]["sharded"]
    assert "nor a row-parallel partner in megatron mode: 'block.fc2' has a forward hook 'center'" in \
        decisions["block.fc2"]["reason"]
    assert type(gm.block.fc2) is nn.Linear and gm.block.fc2._forward_hooks


def test_megatron_carries_a_backward_pre_hook_onto_a_row_shard_without_bias():
    gm = tpfx.parallelize(hooked("backward pre-hook on fc2 without bias"), tp=2, rank=0, mode="megatron")
    assert isinstance(gm.block.fc2, RowParallelLinear)
    assert [(h.kind, h.function) for h in module_hooks(gm.block.fc2)] == [(HookKind.BACKWARD_PRE, halve_grad)]
    # with a bias, added after the all-reduce outside the shard, the bias gradient would miss the hook
    gm = tpfx.parallelize(hooked("backward pre-hook on fc2"), tp=2, rank=0, mode="megatron")
    (fallback,) = gm.tpfx_pairing.fallbacks
    assert fallback.reason.startswith("'block.fc2' has a backward pre-hook 'halve_grad', which on a row-parallel "
                                      "shard would see the gradient of the output without the bias")


def test_megatron_falls_back_when_a_module_between_the_pair_has_a_hook():
    gm = tpfx.parallelize(hooked("forward hook on the activation"), tp=2, rank=0, mode="megatron")
    (fallback,) = gm.tpfx_pairing.fallbacks
    assert fallback.reason.startswith("'block.act' (GELU) has a forward hook 'center', which megatron mode would "
                                      "run on this rank's heads or features only")


class Recorder:
    """A hook with state: the output shapes it saw."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.shapes.append(tuple(output.shape))

    def __call__(self, module: nn.Module, args: tuple) -> None:  # as a forward pre-hook
        self.shapes.append(tuple(args[0].shape))


def test_a_whole_linear_calls_the_users_own_hook_object():
    net, recorder, partial_store = Net(), Recorder(), []
    net.block.fc2.register_forward_hook(recorder.record)
    net.head.register_forward_hook(functools.partial(lambda store, m, args, out: store.append(out.shape), partial_store))
    gm = tpfx.parallelize(net, tp=2, rank=0)
    assert type(gm.block.fc2) is nn.Linear and type(gm.head) is nn.Linear  # the row and the head stay whole
    gm.block.fc2(torch.randn(3, HIDDEN))  # a whole module runs without a process group
    gm.head(torch.randn(3, D))
    assert recorder.shapes == [(3, D)] and partial_store == [torch.Size([3, 4])]  # not a copy of the recorder


class OneKeyValueHead(nn.Module):
    """Grouped-query attention with one key/value head: at tp=2 megatron keeps k and v whole on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.k_proj, self.v_proj = nn.Linear(D, D // HEADS), nn.Linear(D, D // HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.size()
        q = self.q_proj(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        k, v = (w(x).view(b, t, 1, D // HEADS).transpose(1, 2).expand(b, HEADS, t, D // HEADS)
                for w in (self.k_proj, self.v_proj))
        return x + self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D))


def test_a_linear_megatron_keeps_whole_calls_the_users_own_hook_object():
    model, recorder = OneKeyValueHead(), Recorder()
    model.k_proj.register_forward_pre_hook(lambda module, args: recorder.shapes.append(tuple(args[0].shape)))
    model.v_proj.register_forward_pre_hook(recorder)  # a callable object: deep-copied before
    gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron")
    assert [p.row_module_path for p in gm.tpfx_pairing.pairs] == ["o_proj"]
    assert type(gm.k_proj) is nn.Linear and module_hooks(gm.v_proj)[0].function is recorder
    gm.k_proj(torch.randn(3, D))
    assert recorder.shapes == [(3, D)]


# ---------------------------------------------------------------- captures that would lose a hook


def test_fx_refuses_a_hook_on_the_model_itself_and_auto_exports_instead():
    net = Net()
    net.register_forward_hook(center)
    with pytest.raises(CaptureError, match=r"Net has a forward hook 'center' on the model itself, which torch.fx "
                                           r"does not trace") as error:
        tpfx.parallelize(net, tp=2, rank=0, tracer="fx")
    assert "\n" not in str(error.value)
    gm = tpfx.parallelize(net, tp=2, rank=0, example_inputs=(torch.randn(2, 3, D),))
    assert gm.tpfx_report.tracer == "export" and "has a forward hook 'center' on the model itself" in \
        gm.tpfx_report.tracer_note


@pytest.mark.parametrize("register", ["register_full_backward_hook", "register_backward_hook"])
def test_fx_refuses_a_backward_hook_on_a_module_it_traces_through(register):
    net = Net()
    getattr(net.block, register)(double_input_grad)  # an old-style one made torch.fx loop until memory ran out
    with pytest.raises(CaptureError, match=r"module 'block' \(Block\) has a backward hook 'double_input_grad', "
                                           r"which torch.fx drops"):
        tpfx.capture(net)


def test_export_refuses_a_backward_hook():
    net = hooked("backward hook on fc1")
    with pytest.raises(CaptureError, match=r"torch.export .*module 'block.fc1' \(Linear\) has a backward hook "
                                           r"'double_input_grad', which torch.export drops.*tracer='fx'"):
        tpfx.parallelize(net, tp=2, rank=0, tracer="export", example_inputs=(torch.randn(2, 3, D),))


# ---------------------------------------------------------------- numbers, in real processes


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).mean().backward()
    return out


def _compare(gm: nn.Module, reference: nn.Module, x: torch.Tensor) -> dict[str, float]:
    expected, got = _step(reference, x), _step(gm, x)
    return {"output": max_diff(got, expected)} | {f"grad {k}": v for k, v in grad_diffs(gm, reference).items()}


def _hooked_programs(rank: int, world: int) -> dict:
    warnings.simplefilter("ignore", NoSitesWarning)  # models whose only site is kept whole (tested above)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    results = {}
    for label in HOOKED:
        for mode in ("gather", "megatron"):
            for tracer in ("fx", "export"):
                if tracer == "export" and label not in EXPORTED:
                    continue  # each export costs about a second
                reference = hooked(label)
                gm = tpfx.parallelize(reference, tp=world, mode=mode, tracer=tracer, example_inputs=(x,))
                SEEN.clear()
                diffs = _compare(gm, reference, x)
                results[label, mode, tracer] = {"diffs": diffs, "seen": list(SEEN),
                                                "sharded": sorted(r["module"] for r in _decisions(gm).values()
                                                                  if r["sharded"])}
    return results


def test_hooked_models_match_one_device_in_both_modes_and_both_tracers():
    results = run_ranks(_hooked_programs, 2)
    for rank, by_case in enumerate(results):
        for (label, mode, tracer), result in by_case.items():
            worst = {k: v for k, v in result["diffs"].items() if not v <= TOL}
            assert not worst, f"rank {rank}, {label}, {mode}, {tracer}: {worst}"
        # the one-device model, then the program: the carried pre-hook ran on the shard (fx); export
        # traced it into the graph, so the program computes it without calling it
        assert by_case["pre-hook on fc1", "gather", "fx"]["seen"] == ["Linear", "ColumnParallelLinear"]
        assert by_case["pre-hook on fc1", "megatron", "fx"]["seen"] == ["Linear", "ColumnParallelLinear"]
        assert by_case["pre-hook on fc1", "gather", "export"]["seen"] == ["Linear"]
        assert by_case["pre-hook on wk", "megatron", "fx"]["seen"] == ["Linear", "ColumnParallelLinear"]
        assert by_case["pre-hook on wk", "megatron", "fx"]["sharded"] == ["wk", "wo", "wq", "wv"]  # paired
        assert "block.fc1" not in by_case["forward hook on fc1", "gather", "fx"]["sharded"]
        assert "block.fc1" in by_case["forward hook on fc1", "gather", "export"]["sharded"]  # centred after the gather
        assert "block.fc2" in by_case["forward hook on fc2", "megatron", "export"]["sharded"]  # centred after the sum
        assert "block.fc2" in by_case["backward pre-hook on fc2 without bias", "megatron", "fx"]["sharded"]
        assert "block.fc2" not in by_case["backward pre-hook on fc2", "megatron", "fx"]["sharded"]


# ---------------------------------------------------------------- zero sites: one warning line


class _NoSites(nn.Module):
    """Two linears in a row and a cumulative sum: nothing is an attention projection or an FFN's first linear."""

    def __init__(self) -> None:
        super().__init__()
        self.small, self.big = nn.Linear(D, D), nn.Linear(D, 4 * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.big(self.small(x)).cumsum(-1))


def test_no_site_at_all_warns_once_naming_the_largest_linears():
    with pytest.warns(NoSitesWarning) as caught:
        tpfx.parallelize(_NoSites(), tp=2, rank=0)
    (warning,) = [w for w in caught if w.category is NoSitesWarning]
    message = str(warning.message)
    assert "\n" not in message and warning.filename == __file__
    assert message.startswith("tpfx found no linear to shard in _NoSites at tp=2: all 2 linears stay whole")
    assert message.index("'big' [64, 16]: feeds op 'cumsum'") < message.index("'small' [16, 16]: feeds another linear")
    assert "matching stopped at op 'cumsum'" in message


def test_a_model_with_sites_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoSitesWarning)
        gm = tpfx.parallelize(Net(), tp=2, rank=0)
    assert gm.tpfx_report.sites


# ---------------------------------------------------------------- explain names the op that stopped each walk


EXPLAIN_TARGET = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Stopped(nn.Module):
    """q passes a cumulative sum, an FFN's activation a LayerNorm, and the rest feed residual adds."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        b, t, d = x.shape
        q = self.wq(x).cumsum(-1)
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in (q, self.wk(x), self.wv(x)))
        x = x + self.wo(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.norm(F.gelu(self.fc1(x))))


def build():
    return Stopped(), (torch.randn(2, 5, 16),)
'''


def test_explain_names_the_op_that_stopped_every_replicated_linear(capsys, tmp_path):
    import json

    from tpfx.cli import main

    target = tmp_path / "stopped.py"
    target.write_text(EXPLAIN_TARGET)
    assert main(["explain", f"{target}:build", "--format", "json"]) == 0
    rows = {row["module"]: row for row in json.loads(capsys.readouterr().out)["linears"]}
    replicated = {module: row["reason"] for module, row in rows.items() if not row["sharded"]}
    assert sorted(replicated) == ["fc1", "fc2", "wo", "wq"]
    assert "matching stopped at op 'cumsum' (node cumsum)" in replicated["wq"]
    assert "matching stopped at op 'LayerNorm' (node norm)" in replicated["fc1"]
    for module in ("wo", "fc2"):
        assert "matching stopped at op 'add' (node add" in replicated[module]
