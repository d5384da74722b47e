"""The plan: every parameter by name with its shard spec or why it stays whole; apply and readers use it.

The last tests build every model the tests use, in both modes, and check that the plan, the report
and the program agree: each parameter the program holds is ``spec.take(full)`` of the model's, and
the report's shard shape of every site and row linear is the shape the rank holds.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpfx
import tpfx.api
import tpfx.passes.find_sites as find_sites_module
from examples.gpt import GPTModel, small_config
from tests.parity import check_plan_report_and_program_agree
from tests.models import DropoutInside, FusedLastDim, Grouped, HeadMixing, Interleaved, ReluFFN
from tpfx.capture import CallForm, capture
from tpfx.collectives import copy_to_tp, gather_from_tp
from tpfx.errors import ShardingError
from tpfx.layers import BlockColumnParallelLinear, ColumnParallelLinear, RowParallelLinear, ShardSpec
from tpfx.passes.column_shard import column_shard
from tpfx.passes.find_sites import Site, SiteFinding, find_sites
from tpfx.passes.plan import Mode, ParameterPlan, Placement, Plan, gather_plan
from tpfx.passes.shard_parameters import shard_parameters

COLUMN, ROW, REPLICATED = Placement.COLUMN, Placement.ROW, Placement.REPLICATED


def _names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters(remove_duplicate=False)]


def _summary(entry: ParameterPlan) -> tuple:
    return entry.placement, entry.spec, entry.role, entry.held_by_layer, entry.local_shape


def _hf_models():  # the module examples.hf_models, when transformers is installed
    pytest.importorskip("transformers")
    from examples import hf_models

    return hf_models


# ---------------------------------------------------------------------------------- the example GPT

def test_gather_plan_of_the_gpt_lists_every_parameter_with_its_spec_or_reason():
    model = GPTModel(small_config())
    gm = tpfx.parallelize(model, tp=2, rank=1)
    plan = gm.tpfx_plan
    assert (plan.mode, plan.tp, plan.rank, plan.pairing, plan.tied) == (Mode.GATHER, 2, 1, None, ())
    assert list(plan.parameters) == _names(model)
    rows = ShardSpec(0, 384, ((192, 384),))
    p = plan.parameters
    assert _summary(p["blocks.0.attn.qkv_proj.weight"]) == (COLUMN, rows, "qkv", True, (192, 128))
    assert _summary(p["blocks.0.attn.qkv_proj.bias"]) == (COLUMN, rows, "qkv", True, (192,))
    assert _summary(p["blocks.1.ffn.fc1.weight"]) == (COLUMN, ShardSpec(0, 512, ((256, 512),)), "fc1", True, (256, 128))
    assert p["blocks.1.ffn.fc1.weight"].module_path == "blocks.1.ffn.fc1"
    out_proj = p["blocks.0.attn.out_proj.weight"]
    assert _summary(out_proj) == (REPLICATED, None, "", False, (128, 128))
    assert out_proj.describe().startswith("replicated, because its linear 'blocks.0.attn.out_proj' stays whole: "
                                          "feeds dropout -> the residual add only")
    assert p["lm_head.weight"].reason.startswith("its linear 'lm_head' stays whole: feeds loss 'cross_entropy'")
    assert p["token_embedding.weight"].reason == (
        "no sharded linear reads it (first read by module 'token_embedding' (Embedding))")
    assert p["blocks.1.ln2.bias"].reason == "no sharded linear reads it (first read by module 'blocks.1.ln2' (LayerNorm))"
    assert [s.module_path for s in plan.gathered] == [s.module_path for s in plan.sites] == [
        "blocks.0.attn.qkv_proj", "blocks.0.ffn.fc1", "blocks.1.attn.qkv_proj", "blocks.1.ffn.fc1"]
    assert gm.tpfx_report.plan is plan and gm.tpfx_pairing is None


def test_megatron_plan_of_the_gpt_pairs_whole_heads_with_row_linears():
    model = GPTModel(small_config())
    gm = tpfx.parallelize(model, tp=2, rank=1, mode="megatron")
    plan = gm.tpfx_plan
    assert plan.mode is Mode.MEGATRON and plan.pairing is gm.tpfx_pairing and len(plan.pairing.pairs) == 4
    assert list(plan.parameters) == _names(model)
    heads = ShardSpec(0, 384, ((64, 128), (192, 256), (320, 384)))  # rank 1's heads of q, k and v
    p = plan.parameters
    assert _summary(p["blocks.0.attn.qkv_proj.weight"]) == (COLUMN, heads, "qkv", True, (192, 128))
    assert _summary(p["blocks.0.attn.out_proj.weight"]) == (ROW, ShardSpec(1, 128, ((64, 128),)), "row", True, (128, 64))
    assert _summary(p["blocks.1.ffn.fc2.weight"]) == (ROW, ShardSpec(1, 512, ((256, 512),)), "row", True, (128, 256))
    bias = p["blocks.1.ffn.fc2.bias"]
    assert _summary(bias) == (REPLICATED, None, "row", True, (128,))
    assert bias.reason == "it is the bias of row-parallel 'blocks.1.ffn.fc2': added once, after the all-reduce"
    assert plan.gathered == ()  # every site is paired
    # the layers the apply built hold the plan's specs
    assert isinstance(gm.get_submodule("blocks.0.attn.qkv_proj"), BlockColumnParallelLinear)
    assert type(gm.get_submodule("blocks.0.ffn.fc1")) is ColumnParallelLinear
    assert isinstance(gm.get_submodule("blocks.0.attn.out_proj"), RowParallelLinear)
    assert tpfx.parameter_shard_specs(gm) == plan.shard_specs()
    assert pickle.loads(pickle.dumps(plan)) == plan == copy.deepcopy(plan)  # data: it travels and copies
    assert set(plan.shard_specs()) == {f"blocks.{i}.{name}" for i in (0, 1) for name in (
        "attn.qkv_proj.weight", "attn.qkv_proj.bias", "attn.out_proj.weight", "ffn.fc1.weight", "ffn.fc1.bias",
        "ffn.fc2.weight")}


def test_grouped_keys_and_values_with_fewer_heads_than_tp_are_planned_whole_with_the_reason():
    plan = tpfx.parallelize(Grouped(kv_heads=2), tp=4, rank=2, mode="megatron").tpfx_plan
    k_proj = plan.parameters["k_proj.weight"]
    assert _summary(k_proj) == (REPLICATED, None, "k", False, (16, 32))
    assert k_proj.reason.startswith("its [2, 8] rows hold fewer heads than tp=4: every rank keeps them whole")
    assert plan.parameters["q_proj.weight"].spec == ShardSpec(0, 32, ((16, 24),))


# ---------------------------------------------------------------------------------------- tied weights

class _TiedLM(nn.Module):
    """The output head reads the embedding's weight (one tensor under two names); fc1 and fc1b share one
    too; fc3 -> fc4 is an FFN of its own weights."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.fc1, self.fc1b, self.fc2 = nn.Linear(16, 64), nn.Linear(16, 64), nn.Linear(64, 16)
        self.fc1b.weight = self.fc1.weight
        self.fc3, self.fc4 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.fc2(F.gelu(self.fc1(x)) * self.fc1b(x))
        x = x + self.fc4(F.relu(self.fc3(x)))
        return self.head(x)


@pytest.mark.parametrize("mode", ["gather", "megatron"])
def test_tied_parameters_appear_under_each_name_with_one_spec(mode):
    model = _TiedLM()
    gm = tpfx.parallelize(model, tp=2, rank=0, mode=mode)
    plan = gm.tpfx_plan
    assert list(plan.parameters) == _names(model)
    assert plan.tied == (("emb.weight", "head.weight"), ("fc1.weight", "fc1b.weight"))
    for names in plan.tied:
        assert {plan.parameters[name].spec for name in names} == {None}
    assert plan.parameters["emb.weight"].reason == ("it is one tensor with 'head.weight' (tied); no sharded linear "
                                                     "reads it (first read by module 'emb' (Embedding))")
    assert plan.parameters["head.weight"].reason.startswith(
        "it is one tensor with 'emb.weight' (tied); its linear 'head' stays whole: feeds the model output")
    assert "its weight is shared with 'fc1b' (tied); sharding would untie it" in plan.parameters["fc1.weight"].reason
    assert gm.get_parameter("emb.weight") is gm.get_parameter("head.weight")  # still one tensor
    assert plan.parameters["fc3.weight"].spec == ShardSpec(0, 32, ((0, 16),))  # untied linears shard as usual


def test_a_strategy_refuses_to_shard_a_tied_tensor_before_any_change():
    model = _TiedLM()
    gm = capture(model)
    fc1 = next(n for n in gm.graph.nodes if n.target == "fc1")
    forced = Site("fc1", "fc1", fc1.name, (64, 16), (32, 16))  # the finder itself never proposes a tied site
    with pytest.raises(ShardingError, match=r"^cannot shard 'fc1.weight': it is one tensor with 'fc1b.weight' "
                                            r"\(tied\), and a shard would untie them; give each name"):
        gather_plan(gm, SiteFinding((forced,), ()), tp=2, rank=0)


# ------------------------------------------------------------------ a Hugging Face model through export

def test_export_captured_gpt2_megatron_plan_shards_conv1d_weights_by_their_in_out_layout():
    hf = _hf_models()
    model = hf.build("gpt2")
    gm = tpfx.parallelize(model, tp=2, rank=1, mode="megatron", tracer="export", example_inputs=hf.example_inputs())
    plan = gm.tpfx_plan
    assert set(plan.parameters) == set(_names(model)) and not plan.pairing.fallbacks
    p = plan.parameters
    heads = ((32, 64), (96, 128), (160, 192))  # heads 2 and 3 of q, k and v: columns of the (in, out) weight
    assert _summary(p["transformer.h.0.attn.c_attn.weight"]) == (COLUMN, ShardSpec(1, 192, heads), "qkv", False, (64, 96))
    assert _summary(p["transformer.h.0.attn.c_attn.bias"]) == (COLUMN, ShardSpec(0, 192, heads), "qkv", False, (96,))
    assert _summary(p["transformer.h.1.mlp.c_fc.weight"]) == (COLUMN, ShardSpec(1, 256, ((128, 256),)), "fc1", False,
                                                              (64, 128))
    # a row linear's input features are the rows of an (in, out) weight
    assert _summary(p["transformer.h.0.attn.c_proj.weight"]) == (ROW, ShardSpec(0, 64, ((32, 64),)), "row", False,
                                                                 (32, 64))
    assert _summary(p["transformer.h.0.mlp.c_proj.weight"]) == (ROW, ShardSpec(0, 256, ((128, 256),)), "row", False,
                                                                (128, 64))
    assert _summary(p["transformer.h.0.mlp.c_proj.bias"]) == (REPLICATED, None, "row", False, (64,))
    assert plan.tied == (("transformer.wte.weight", "lm_head.weight"),)
    assert p["lm_head.weight"].reason.startswith("it is one tensor with 'transformer.wte.weight' (tied); "
                                                 "its linear 'lm_head' stays whole")
    assert p["transformer.wpe.weight"].reason == "no sharded linear reads it (first read by node 'embedding_1' (embedding))"
    shards = {row["module"]: row["shard"] for row in gm.tpfx_report.sites_table()}
    assert shards["transformer.h.0.mlp.c_proj"] == [128, 64]  # what the rank holds (was [256, 32])
    assert tpfx.parameter_shard_specs(gm) == plan.shard_specs()


# -------------------------------------------------------------------------------- records and apply

def test_records_refuse_what_does_not_fit_in_one_line():
    spec = ShardSpec.contiguous(0, 0, 2, 4)
    cases = [
        ({"placement": REPLICATED}, "replicated parameter 'a.w' needs the reason it stays whole"),
        ({"placement": COLUMN}, "a column placement needs a shard spec and only a replicated one has none"),
        ({"placement": REPLICATED, "spec": spec, "reason": "x"}, "a replicated placement needs a shard spec"),
        ({"placement": COLUMN, "spec": ShardSpec.contiguous(1, 0, 1, 4)}, r"does not fit its shape \(4, 2\)"),
        ({"placement": COLUMN, "spec": spec, "role": "ffn"}, "unknown role 'ffn'"),
        ({"placement": COLUMN, "spec": spec, "module_path": "b"}, "parameter 'a.w' is not a parameter of module 'b'"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            ParameterPlan(**({"name": "a.w", "full_shape": (4, 2), "module_path": "a"} | fields))
    whole = ParameterPlan("a.w", (4, 2), REPLICATED, module_path="a", reason="x")
    split = ParameterPlan("b.w", (4, 2), COLUMN, spec, module_path="b")
    with pytest.raises(ValueError, match=r"tied parameters \['a.w', 'b.w'\] are one tensor but have different specs"):
        Plan(Mode.GATHER, 2, 0, {"a.w": whole, "b.w": split}, (), (), tied=(("a.w", "b.w"),))
    with pytest.raises(ValueError, match="a megatron plan needs a pairing"):
        Plan(Mode.MEGATRON, 2, 0, {}, (), ())
    with pytest.raises(ValueError, match="rank 2 of tp=2"):
        Plan(Mode.GATHER, 2, 2, {}, (), ())
    plan = Plan(Mode.GATHER, 2, 0, {"a.w": whole}, (), ())
    with pytest.raises(TypeError):
        plan.parameters["b.w"] = split  # the plan is data: read-only
    with pytest.raises(KeyError, match="the plan has no parameter 'c.w'"):
        plan.entry("c.w")
    with pytest.raises(TypeError, match="placement 'column' is not a Placement"):
        ParameterPlan("a.w", (4, 2), "column", spec, module_path="a")


class _LinearWithScale(nn.Linear):
    def __init__(self, *args: int) -> None:
        super().__init__(*args)
        self.scale = nn.Parameter(torch.ones(()))


class _NotALinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(64, 16)), nn.Parameter(torch.randn(64))


@pytest.mark.parametrize(("swap", "message"), [
    (lambda m: setattr(m, "fc1", nn.Linear(16, 32)),
     r"^parameter 'fc1.weight' is \(32, 16\) in the source model but the plan was made for \(64, 16\); build the plan"),
    (lambda m: setattr(m, "fc1", _NotALinear()), r"^'fc1' is a _NotALinear, not an nn.Linear; only Linear modules"),
    (lambda m: setattr(m, "fc1", _LinearWithScale(16, 64)),
     r"^'fc1' \(_LinearWithScale\) holds parameters \['scale'\] besides weight and bias"),
], ids=["shape", "not-a-linear", "extra-parameter"])
def test_apply_refuses_a_source_that_does_not_fit_the_plan_before_any_change(swap, message):
    model = ReluFFN()
    gm = capture(model)
    plan = gather_plan(gm, find_sites(gm, tp=2), tp=2, rank=0)
    source = copy.deepcopy(model)
    swap(source)
    with pytest.raises(ShardingError, match=message):
        shard_parameters(gm, plan, source=source)
    assert type(gm.get_submodule("fc1")) is nn.Linear and gm.fc1.weight.shape == (64, 16)


def test_apply_slices_from_the_source_and_says_what_it_changed():
    model = ReluFFN()
    gm = capture(model)
    plan = gather_plan(gm, find_sites(gm, tp=4), tp=4, rank=3)
    done = shard_parameters(gm, plan, source=model)
    assert (done.layers, done.sliced) == (("fc1",), ())
    assert torch.equal(gm.fc1.weight, model.fc1.weight[48:]) and gm.fc1.weight.data_ptr() != model.fc1.weight.data_ptr()
    assert gm.fc1.shard_spec("weight") == plan.parameters["fc1.weight"].spec


def test_a_program_without_a_plan_reads_specs_from_its_layers():
    model = ReluFFN()
    gm = capture(model)
    gm = column_shard(gm, find_sites(gm, tp=2).sites, tp=2, rank=1, group="tp:0-1").gm
    assert not hasattr(gm, "tpfx_plan")
    spec = ShardSpec(0, 64, ((32, 64),))
    assert tpfx.parameter_shard_specs(gm) == {"fc1.weight": spec, "fc1.bias": spec}


def test_another_call_form_reuses_the_plan_without_finding_sites_again(monkeypatch):
    model = GPTModel(small_config(n_layers=1)).eval()
    gm = tpfx.parallelize(model, tp=2, rank=0)

    def no_analysis(*args: object, **kwargs: object) -> None:
        raise AssertionError("another call form must map the plan by name, not find sites again")

    monkeypatch.setattr(tpfx.api, "find_sites", no_analysis)
    monkeypatch.setattr(find_sites_module, "find_sites", no_analysis)
    ids = torch.randint(0, 100, (2, 5))
    form = gm.module_for_call(ids)  # the program was traced with every argument given: this form is new
    assert form is not gm and CallForm(frozenset({"attention_mask", "labels"})) in gm.call_forms
    sites = {site.module_path for site in gm.tpfx_plan.sites}
    calls = [n for n in form.graph.nodes if n.op == "call_module" and n.target in sites]
    assert sorted(n.target for n in calls) == sorted(sites)
    for node in calls:
        assert node.args[0].target is copy_to_tp and [u.target for u in node.users] == [gather_from_tp]


# ------------------------------------------------------------- every test model: plan, report, program

_FX_MODELS = {
    "gpt": lambda: GPTModel(small_config()), "fused-last-dim": FusedLastDim, "interleaved": Interleaved,
    "grouped": lambda: Grouped(kv_heads=2), "dropout-inside": DropoutInside, "head-mixing": HeadMixing,
    "tied": _TiedLM,
}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("mode", ["gather", "megatron"])
@pytest.mark.parametrize("name", list(_FX_MODELS))
def test_every_fx_test_model_holds_what_its_plan_and_report_say(name, mode, tp):
    torch.manual_seed(0)
    model = _FX_MODELS[name]()
    for rank in range(tp):
        check_plan_report_and_program_agree(model, tpfx.parallelize(model, tp=tp, rank=rank, mode=mode))


@pytest.mark.parametrize("mode, tp", [("gather", 2), ("megatron", 2), ("megatron", 4)])  # gather's plan: tp-blind
@pytest.mark.parametrize("name", ["gpt2", "llama", "neox", "opt"])
def test_every_hugging_face_test_model_holds_what_its_plan_and_report_say(name, mode, tp):
    hf = _hf_models()
    model = hf.build(name)
    gm = tpfx.parallelize(model, tp=tp, rank=tp - 1, mode=mode, tracer="export", example_inputs=hf.example_inputs())
    check_plan_report_and_program_agree(model, gm)
