"""Hugging Face causal language models, unmodified, from tiny configs with random weights (no downloads).

tpfx captures them with torch.export (torch.fx cannot trace them) and shards them by structure:
GPT-2's fused ``c_attn`` and ``c_fc`` (Conv1D, weight stored (in, out): columns are sharded), LLaMA's
``q_proj``/``k_proj``/``v_proj`` (grouped-query: 2 key/value heads for 4 query heads) and gated
``gate_proj``/``up_proj``, GPT-NeoX's per-head interleaved ``query_key_value`` and ``dense_h_to_4h``,
OPT's ``q_proj``/``k_proj``/``v_proj`` and ``fc1``.

Factories for the CLI return ``(model, example_inputs)``; the example inputs fix the call form
(``input_ids`` and ``labels``) and the program runs at any batch size and sequence length::

    tpfx explain examples/hf_models.py:tiny_llama
    tpfx dump examples/hf_models.py:tiny_gpt2 --tp 2 --batch 3 --seq 11

Needs the ``hf`` extra: ``pip install -e ".[hf]"`` (the ``test`` extra includes it).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built from a config; never reach a hub

import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 256
# small but not degenerate: 4 query heads of 16, 2 layers; larger weights than HF's 0.02 init so
# that logits and gradients are far from zero and a 1e-5 comparison means something. The key/value
# cache stays on, as in every pretrained config: tpfx turns it off for the captured call.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.2)


def gpt2_config(**overrides: object) -> transformers.GPT2Config:
    """GPT-2: fused QKV Conv1D (c_attn), tanh GELU written out, learned positions."""
    fields = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                  initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Config(**{**fields, **overrides})


def llama_config(**overrides: object) -> transformers.LlamaConfig:
    """LLaMA: separate q/k/v with grouped-query attention (2 kv heads), rotary embeddings, SiLU-gated FFN."""
    fields = dict(COMMON, intermediate_size=128, num_key_value_heads=2, attention_dropout=0.0,
                  bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(**{**fields, **overrides})


def neox_config(**overrides: object) -> transformers.GPTNeoXConfig:
    """GPT-NeoX: fused per-head interleaved QKV, partial rotary (a quarter of each head), parallel residual."""
    fields = dict(COMMON, intermediate_size=256, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0,
                  bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXConfig(**{**fields, **overrides})


def opt_config(**overrides: object) -> transformers.OPTConfig:
    """OPT: separate biased q/k/v (q scaled in the graph), ReLU FFN, learned offset positions."""
    fields = dict(COMMON, ffn_dim=256, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                  init_std=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return transformers.OPTConfig(**{**fields, **overrides})


BUILDERS = {
    "gpt2": (gpt2_config, transformers.GPT2LMHeadModel),
    "llama": (llama_config, transformers.LlamaForCausalLM),
    "neox": (neox_config, transformers.GPTNeoXForCausalLM),
    "opt": (opt_config, transformers.OPTForCausalLM),
}


def build(name: str, *, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """The model ``name`` (a key of :data:`BUILDERS`) in eval mode, seeded random weights."""
    make_config, model_class = BUILDERS[name]
    torch.manual_seed(seed)
    return model_class(make_config(**overrides)).eval()


def example_inputs(batch: int = 2, seq: int = 8, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` (next-token targets are the ids themselves, shifted by the model)."""
    ids = torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def tiny_gpt2() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """CLI factory: GPT2LMHeadModel and example inputs."""
    return build("gpt2"), example_inputs()


def tiny_llama() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """CLI factory: LlamaForCausalLM (grouped-query attention) and example inputs."""
    return build("llama"), example_inputs()


def tiny_neox() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """CLI factory: GPTNeoXForCausalLM and example inputs."""
    return build("neox"), example_inputs()


def tiny_opt() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """CLI factory: OPTForCausalLM and example inputs."""
    return build("opt"), example_inputs()
