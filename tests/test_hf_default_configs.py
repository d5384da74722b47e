"""Models as people have them: Hugging Face models built from their default configs, KV cache on.

Every pretrained config says ``use_cache=True``; the tracers cannot return the cache object, so
capture turns the cache off for the captured call and says so in ``tracer_note``. GPT-2, LLaMA and
Qwen2 are built from their default config with tiny sizes and nothing else changed (one layer:
export time grows with depth), parallelized at tp=2 in both modes and compared with the single
device (logits, loss and every gradient) in one spawn of world 2, which also runs a model of our own
with the same convention through torch.fx. The user's config is left as it was.
"""

from __future__ import annotations

import pytest
import torch

import tpfx
from tests.models import CachingLM
from tests.multiprocess import run_ranks
from tests.parity import grad_diffs, max_diff

transformers = pytest.importorskip("transformers")

TOL = 1e-5
MODES = ("gather", "megatron")
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             max_position_embeddings=64)
FAMILIES = {  # family: (config class, model class, the sizes; every other field is the config's default)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=64, n_layer=1, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", SIZES),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SIZES | {"num_key_value_heads": 2}),  # default 32 kv heads
}


def _build(family: str) -> torch.nn.Module:
    config_class, model_class, sizes = FAMILIES[family]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**sizes)).eval()


def _ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * seq))


def _compare(gm: torch.nn.Module, reference: torch.nn.Module, inputs: dict) -> dict[str, float]:
    """Logits, loss (if the model returns one) and every gradient of one forward and backward of both
    (the single-device model called without its cache, which is what the program computes)."""
    outputs = []
    for model in (reference, gm):
        model.zero_grad(set_to_none=True)
        out = model(**(inputs | {"use_cache": False})) if model is reference else model(**inputs)
        logits, loss = (out.logits, out.loss) if hasattr(out, "logits") else (out, out.pow(2).mean())
        loss.backward()
        outputs.append((logits, loss))
    (ref_logits, ref_loss), (logits, loss) = outputs
    diffs = {"logits": max_diff(logits, ref_logits), "loss": max_diff(loss, ref_loss)}
    return diffs | {f"grad {name}": value for name, value in grad_diffs(gm, reference).items()}


def _refusal(gm: torch.nn.Module, inputs: dict) -> str:
    try:
        gm(**inputs, use_cache=True)
    except tpfx.ConfigError as error:
        return str(error)
    return "no error"


def _world2(rank: int, world_size: int) -> dict:
    transformers.logging.set_verbosity_error()  # the default configs' token ids lie outside a tiny vocabulary
    result = {}
    ids = _ids()
    for family in FAMILIES:
        reference = _build(family)
        for mode in MODES:
            gm = tpfx.parallelize(reference, tp=2, mode=mode, example_inputs={"input_ids": ids, "labels": ids})
            inputs = {"input_ids": _ids(3, 5), "labels": _ids(3, 5)}  # another batch and length than the example's
            result[(family, mode)] = {
                "tracer": gm.tpfx_report.tracer, "note": gm.tpfx_report.tracer_note,
                "diffs": _compare(gm, reference, inputs), "n params": len(list(gm.parameters())),
                "sites": len(gm.tpfx_report.sites), "config use_cache": reference.config.use_cache,
                "refusal": _refusal(gm, {"input_ids": ids})}
    torch.manual_seed(0)
    ours = CachingLM(vocab=256)
    for mode in MODES:
        gm = tpfx.parallelize(ours, tp=2, mode=mode, tracer="fx")
        result[("ours", mode)] = {"tracer": gm.tpfx_report.tracer, "note": gm.tpfx_report.tracer_note,
                                  "diffs": _compare(gm, ours, {"ids": _ids(3, 5)}),
                                  "explicit off": _compare(gm, ours, {"ids": _ids(), "use_cache": False}),
                                  "n params": len(list(gm.parameters())), "sites": len(gm.tpfx_report.sites),
                                  "config use_cache": ours.use_cache, "refusal": _refusal(gm, {"ids": ids})}
    return result


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_world2, 2, timeout_s=600)


@pytest.mark.parametrize("family", [*FAMILIES, "ours"])
@pytest.mark.parametrize("mode", MODES)
def test_default_config_model_matches_single_device_with_the_cache_turned_off(world2, family, mode):
    for rank, results in enumerate(world2):
        result = results[(family, mode)]
        assert result["tracer"] == ("fx" if family == "ours" else "export")
        assert "passes use_cache=False" in result["note"], result["note"]
        assert result["config use_cache"] is True  # the user's model is left as it was
        assert result["sites"] >= 2
        diffs = result["diffs"]
        assert len(diffs) == 2 + result["n params"], sorted(diffs)  # logits, loss and every gradient
        bad = {k: v for k, v in diffs.items() | result.get("explicit off", {}).items() if not v <= TOL}
        assert not bad, f"{family} {mode} rank {rank}: {bad}"


@pytest.mark.parametrize("family", [*FAMILIES, "ours"])
def test_a_call_that_turns_the_cache_on_is_refused_in_one_line(world2, family):
    message = world2[0][(family, "gather")]["refusal"]
    assert message.startswith("use_cache=True: a tensor-parallel program keeps no key/value cache"), message
    assert "\n" not in message and "fix: omit use_cache or pass use_cache=False" in message
