"""Small deterministic models and tokenizers for tests and benchmarks (no download).

``tiny_model(family)`` builds a randomly initialised Hugging Face causal LM of one supported
family from a config, with *every* parameter (biases and norm gains included) drawn from a
normal distribution so that no identity can pass because a term happens to be zero.
``tiny_tokenizer()`` trains a byte-level BPE tokenizer (the GPT-2 scheme: a leading space is part
of the following word's token) on a small corpus with the ``tokenizers`` library.
``linearised_model(family)`` is a tiny model that is affine in every activation (first-order
attribution is exact on it), and ``same_length_pairs`` the pairs of one token length it needs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from factfind.errors import ArgumentError

FAMILIES = ("gpt2", "gpt_neox", "gpt_neox_sequential", "llama", "mistral", "qwen2", "gemma",
            "gemma2", "gemma3", "qwen3", "phi3", "olmo2", "gptj")
"""Families with a hand-written :class:`~factfind.model.architectures.ArchSpec` (tiny configs
below)."""

DERIVED_FAMILIES = ("helium", "exaone4")
"""Families without a hand-written spec whose spec :func:`~factfind.model.architectures.derive_spec`
reads off the module tree (Helium: Llama layout; EXAONE 4: OLMo-2-like post norms and per-head
q/k norms)."""

_CORPUS = [
    "Michael Jordan plays the sport of basketball.",
    "Tiger Woods plays the sport of golf.",
    "Serena Williams plays the sport of tennis.",
    "Fact: Lionel Messi plays the sport of football.",
    "The Eiffel Tower is located in the city of Paris.",
    "Zoë Ångström lives in Malmö, and O'Neil lives in Dublin.",
    "東京 is the capital of Japan.",
    "Beats Music is owned by Apple. Vinson Massif is located in the continent of Antarctica.",
]


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok.to_str()


def tiny_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` (about 400 tokens), built locally."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>",
    )


def tiny_config(family: str, vocab_size: int, *, n_layers: int = 2, d_model: int = 32,
                n_heads: int = 4, **overrides: Any) -> Any:
    """A small config of ``family`` (see :data:`FAMILIES`); ``overrides`` are config fields
    set on it (e.g. ``sliding_window=3``, so that short prompts cross Gemma's window)."""
    config = _tiny_config(family, vocab_size, n_layers=n_layers, d_model=d_model,
                          n_heads=n_heads)
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ArgumentError(f"{family} configs have no field {name!r}")
        setattr(config, name, value)
    return config


def _tiny_config(family: str, vocab_size: int, *, n_layers: int, d_model: int,
                 n_heads: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, attn_implementation="eager")
    if family == "gpt2":
        return tf.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=128,
                             bos_token_id=0, eos_token_id=0, **common)
    if family == "gptj":  # parallel block, interleaved rotary on half of each head
        return tf.GPTJConfig(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=128,
                             rotary_dim=d_model // n_heads // 2, bos_token_id=0, eos_token_id=0,
                             **common)
    if family.startswith("gpt_neox"):
        return tf.GPTNeoXConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
            intermediate_size=4 * d_model, max_position_embeddings=128,
            rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                             "rope_type": "default"},
            use_parallel_residual=family == "gpt_neox", bos_token_id=0, eos_token_id=0, **common,
        )
    llama_like: dict[str, Any] = dict(
                      num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                      num_key_value_heads=max(1, n_heads // 2), intermediate_size=3 * d_model,
                      max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, **common)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    head_dim = d_model // n_heads
    if family == "gemma":
        return tf.GemmaConfig(head_dim=head_dim, **llama_like)
    # small softcaps, so that the tanh is far from linear on the tiny model's values
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                               **llama_like)
    if family == "gemma3":
        return tf.Gemma3TextConfig(head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                   final_logit_softcapping=3.0, **llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=head_dim, **llama_like)
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "olmo2":
        return tf.Olmo2Config(**llama_like)
    if family == "helium":
        return tf.HeliumConfig(head_dim=head_dim, **llama_like)
    if family == "exaone4":
        return tf.Exaone4Config(**llama_like)
    raise ArgumentError(f"unknown family {family!r}; choose from {FAMILIES + DERIVED_FAMILIES}")


def tiny_hf_model(family: str, vocab_size: int, *, seed: int = 0, std: float = 0.2,
                  **kwargs: Any) -> Any:
    """A randomly initialised ``*ForCausalLM`` of ``family`` with all parameters ~ N(0, std)
    (norm gains ~ 1 + N(0, std))."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = "norm" in name or ".ln_" in name or "layernorm" in name
            if is_gain and name.endswith("weight") and not family.startswith("gemma"):
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model.eval()


def tiny_model(family: str = "gpt2", *, seed: int = 0, **kwargs: Any) -> Any:
    """A :class:`factfind.model.Model` around :func:`tiny_hf_model` and :func:`tiny_tokenizer`."""
    from factfind.model import load_model

    tok = tiny_tokenizer()
    return load_model((tiny_hf_model(family, len(tok), seed=seed, **kwargs), tok))


class _One(torch.nn.Module):
    """An activation that is constantly 1 (a gated MLP ``down(act(gate x) * up x)`` becomes
    the linear ``down(up x)``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


def linearised_model(family: str) -> Any:
    """A tiny model that is affine in its input embeddings, in float64: norms with a huge
    epsilon (their scale is constant: LayerNorm and RMSNorm alike), no query or key weights
    (uniform causal attention), identity MLP activations (a constant 1 on the gate of gated
    MLPs). First-order attribution is exact on it. Families: gpt2, gpt_neox, and the
    grouped-query llama, mistral and qwen2."""
    tok = tiny_tokenizer()
    hf: Any = tiny_hf_model(family, len(tok)).to(torch.float64)
    H = hf.config.num_attention_heads
    mods: list[Any] = list(hf.modules())
    with torch.no_grad():
        for mod in mods:
            if isinstance(mod, torch.nn.LayerNorm):
                mod.eps = 1e12
                mod.weight.mul_(1e6)
            norm: Any = mod
            if hasattr(norm, "variance_epsilon"):  # RMSNorm: rms(x) ~ 1e6, frozen
                norm.variance_epsilon = 1e12
                norm.weight.mul_(1e6)
            if hasattr(mod, "act"):
                mod.act = torch.nn.Identity()
            if hasattr(mod, "act_fn") and hasattr(mod, "gate_proj"):
                mod.act_fn = _One()
            c_attn: Any = getattr(mod, "c_attn", None)
            if c_attn is not None:  # GPT-2: [in, q|k|v]
                d = c_attn.weight.shape[0]
                c_attn.weight[:, :2 * d] = 0
                c_attn.bias[:2 * d] = 0
            qkv: Any = getattr(mod, "query_key_value", None)
            if qkv is not None:  # GPT-NeoX: per head [q|k|v]
                w = qkv.weight
                w.view(H, 3, -1, w.shape[1])[:, :2] = 0
                qkv.bias.view(H, 3, -1)[:, :2] = 0
            for name in ("q_proj", "k_proj"):  # Llama-style: separate projections
                proj: Any = getattr(mod, name, None)
                if proj is not None:
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
    from factfind.model import load_model

    return load_model((hf, tok))


def same_length_pairs(model: Any, facts: Any) -> Any:
    """Pairs of one token length (float64 eager attention gives NaN rows under padding)."""
    from factfind.data import FactDataset
    from factfind.data.pairs import FactPairs

    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    lengths = model.tokenize(list(pairs.clean)).lengths
    keep = [i for i in range(len(pairs)) if lengths[i] == lengths.max()]
    if len(keep) < 3:
        raise ArgumentError(f"only {len(keep)} pairs of the longest length; need 3")
    return FactPairs(FactDataset([pairs.clean[i] for i in keep]),
                     FactDataset([pairs.corrupt[i] for i in keep]))
