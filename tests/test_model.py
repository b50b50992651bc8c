"""The adapter's sites against plain Hugging Face, for every supported family."""

import pytest
import torch

from factfind.model import load_model
from factfind.model.architectures import UnsupportedArchitectureError
from factfind.testing.models import DERIVED_FAMILIES, FAMILIES, tiny_hf_model, tiny_tokenizer
from factfind.types import Component as C

SITES = [C.EMBED, C.RESID_PRE, C.Z, C.HEAD_OUT, C.ATTN_OUT, C.NEURONS, C.MLP_OUT, C.RESID_POST]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES + DERIVED_FAMILIES)
def pair(request, tok):
    hf = tiny_hf_model(request.param, len(tok))
    return hf, load_model((hf, tok))


def _batch(n_vocab, seed=1, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n_vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # row 0 is a 4-token prompt, left-padded
        mask[1, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask}


def test_logits_equal_hf_unpadded(pair):
    hf, model = pair
    batch = _batch(model.d_vocab, padded=False)
    ref = hf(**batch).logits
    got = model.run(batch, logits="all").logits
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_left_padding_matches_unpadded_prompt(pair):
    """A left-padded row gets the same final logits as the same prompt alone."""
    hf, model = pair
    batch = _batch(model.d_vocab)
    got = model.run(batch).logits
    for row, start in ((0, 3), (1, 1), (2, 0)):
        alone = hf(input_ids=batch["input_ids"][row:row + 1, start:]).logits[0, -1]
        torch.testing.assert_close(got[row], alone, atol=1e-5, rtol=0)


def test_site_identities(pair):
    _, model = pair
    batch = _batch(model.d_vocab)
    run = model.run(batch, save=[(c, layer) for layer in range(model.n_layers) for c in SITES])
    real = batch["attention_mask"].bool()
    for layer in range(model.n_layers):
        a = {c: run.acts[(c, layer)] for c in SITES if c is not C.EMBED}
        assert a[C.HEAD_OUT].abs().max() > 1e-3
        heads = a[C.HEAD_OUT].sum(2) + model.b_O(layer)
        torch.testing.assert_close(heads[real], a[C.ATTN_OUT][real], atol=1e-5, rtol=1e-5)
        # post-norm families: the post norm's scale frozen at this run (ones elsewhere)
        mlp = ((a[C.NEURONS] @ model.W_out(layer) + model.b_out(layer))
               * model.mlp_write_scale(layer, a[C.NEURONS]))
        torch.testing.assert_close(mlp, a[C.MLP_OUT], atol=1e-5, rtol=1e-5)
        post = a[C.RESID_PRE] + a[C.ATTN_OUT] + a[C.MLP_OUT]
        torch.testing.assert_close(post[real], a[C.RESID_POST][real], atol=1e-5, rtol=1e-5)
        if layer + 1 < model.n_layers:
            torch.testing.assert_close(run.acts[(C.RESID_PRE, layer + 1)], a[C.RESID_POST])
    # the final norm with the clean scale frozen reproduces the logits from the last residual
    last = run.acts[(C.RESID_POST, model.n_layers - 1)][:, -1]
    normed = model.final_norm_frozen(last, model.final_norm_scale(last))
    logits = normed @ model.W_U + model.b_U
    torch.testing.assert_close(model.softcap_logits(logits), run.logits, atol=1e-4, rtol=1e-4)
    if model.final_logit_softcap is not None:  # the raw logits are the linear ones
        torch.testing.assert_close(logits, run.logits_raw, atol=1e-4, rtol=1e-4)
        assert (run.logits_raw - run.logits).abs().max() > 0.1


def test_edit_changes_downstream_only(pair):
    _, model = pair
    batch = _batch(model.d_vocab)
    clean = model.run(batch, save=[(C.MLP_OUT, 0), (C.ATTN_OUT, 0)])
    zeroed = model.run(batch, edits={(C.NEURONS, 0): lambda x: torch.zeros_like(x)},
                       save=[(C.MLP_OUT, 0), (C.ATTN_OUT, 0)])
    torch.testing.assert_close(zeroed.acts[(C.ATTN_OUT, 0)], clean.acts[(C.ATTN_OUT, 0)])
    zeros = torch.zeros(3, 7, model.d_mlp)
    expect = (model.b_out(0) * model.mlp_write_scale(0, zeros)).expand_as(
        zeroed.acts[(C.MLP_OUT, 0)])
    torch.testing.assert_close(zeroed.acts[(C.MLP_OUT, 0)], expect)
    assert (zeroed.logits - clean.logits).abs().max() > 1e-4


def test_gradients_match_finite_difference(pair):
    _, model = pair
    batch = _batch(model.d_vocab)
    metric = lambda lg: lg[:, 5].sum()
    run = model.run(batch, save=[(C.NEURONS, 0)], metric=metric)
    g = run.grads[(C.NEURONS, 0)]
    assert g.abs().max() > 0
    d = torch.zeros_like(g)
    d[2, -1, 3] = 1e-2
    bumped = model.run(batch, edits={(C.NEURONS, 0): lambda x: x + d})
    fd = (metric(bumped.logits) - metric(run.logits)) / 1e-2
    torch.testing.assert_close(fd, g[2, -1, 3], atol=2e-3, rtol=2e-2)


def test_attention_knockout_blocks_edges(pair):
    _, model = pair
    batch = _batch(model.d_vocab)
    n = batch["input_ids"].shape[1]
    block = torch.zeros(3, n, n, dtype=torch.bool)
    block[:, -1, :-1] = True  # the final token attends only to itself
    run = model.run(batch, block_attention={0: block}, save=[(C.RESID_POST, 0)])
    # with every other key blocked, layer 0's final position cannot depend on earlier tokens
    other = dict(batch)
    ids = batch["input_ids"].clone()
    ids[:, -3] = (ids[:, -3] % (model.d_vocab - 2)) + 1
    other["input_ids"] = ids
    run2 = model.run(other, block_attention={0: block}, save=[(C.RESID_POST, 0)])
    knocked = run2.acts[(C.RESID_POST, 0)][:, -1]
    torch.testing.assert_close(run.acts[(C.RESID_POST, 0)][:, -1], knocked)
    free = model.run(other, save=[(C.RESID_POST, 0)])
    assert (free.acts[(C.RESID_POST, 0)][:, -1] - knocked).abs().max() > 1e-4


def test_bad_sites_are_clear_errors(pair):
    _, model = pair
    batch = _batch(model.d_vocab)
    with pytest.raises(IndexError, match="layer 99"):
        model.run(batch, save=[(C.MLP_OUT, 99)])
    with pytest.raises(ValueError, match="cannot write to head_out"):
        model.run(batch, edits={(C.HEAD_OUT, 0): lambda x: x})


def test_unsupported_architecture_names_supported(tok):
    import transformers as tf

    hf = tf.BloomForCausalLM(tf.BloomConfig(n_layer=1, hidden_size=16, n_head=2,
                                             vocab_size=len(tok)))
    with pytest.raises(UnsupportedArchitectureError, match=r"gpt2.*gpt_neox.*llama.*register_spec"):
        load_model((hf, tok))


@pytest.mark.parametrize("family", DERIVED_FAMILIES)
def test_derived_spec_is_used_for_a_family_without_one(family, tok):
    """Helium and EXAONE 4 have no hand-written spec: theirs is read off the module tree (the
    parity tests above run on them too), post norms included."""
    from factfind.model.architectures import SPECS

    assert family not in SPECS
    model = load_model((tiny_hf_model(family, len(tok)), tok))
    assert model.spec.derived and model.spec.norm_kind == "rmsnorm" and not model.parallel
    has_post = family == "exaone4"
    assert (model.spec.attn_post_norm is not None) == has_post
    assert (model.spec.mlp_post_norm is not None) == has_post


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gemma3", "qwen3", "phi3",
                                    "olmo2"])
def test_derived_spec_agrees_with_the_hand_written_one(family, tok):
    from factfind.model.architectures import derive_spec, spec_for

    hf = tiny_hf_model(family, len(tok))
    hand, derived = spec_for(hf.config), derive_spec(hf)
    fields = ("blocks", "embed", "final_norm", "unembed", "attn_out_proj", "mlp_out_proj",
              "norm_kind", "values", "values_layout", "attn_post_norm", "mlp_post_norm",
              "attn_softcap", "final_softcap")
    assert {f: getattr(derived, f) for f in fields} == {f: getattr(hand, f) for f in fields}


def test_derived_spec_from_config_alone_uses_the_meta_device(tok):
    from factfind.model.architectures import spec_for

    spec = spec_for(tiny_hf_model("helium", len(tok)).config)  # what load_model checks first
    assert spec.derived and spec.blocks == "model.layers"


def test_usual_layout_with_unusual_math_is_refused(tok):
    """Granite has the Llama module tree but scales each sublayer's output before it enters
    the residual stream: the derived spec's site identities fail and the error says which."""
    import transformers as tf

    cfg = tf.GraniteConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           residual_multiplier=0.5)
    hf = tf.GraniteForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"granite.*attn_out.*resid_post.*register_spec"):
        load_model((hf, tok))


def test_unusual_layout_is_refused_from_the_module_tree(tok):
    """GPT-BigCode has ``transformer.h`` blocks: no spec, and no usual layout to derive one."""
    import transformers as tf

    hf = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(n_layer=1, n_embd=16, n_head=2,
                                                      vocab_size=len(tok)))
    with pytest.raises(UnsupportedArchitectureError,
                       match=r"gpt_bigcode.*cannot derive.*model\.layers"):
        load_model((hf, tok))


def test_load_from_directory_roundtrip(tmp_path, tok):
    hf = tiny_hf_model("gpt_neox", len(tok))
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="float32")
    batch = _batch(model.d_vocab)
    torch.testing.assert_close(model.run(batch).logits, load_model((hf, tok)).run(batch).logits)
    assert model.revision and model.revision.startswith("local-")


def test_pattern_and_values_reconstruct_z(pair):
    """z[q, h] = sum_k pattern[h, q, k] v[k, h]: the decomposition DLA by source token uses."""
    _, model = pair
    batch = _batch(model.d_vocab)
    layer = model.n_layers - 1
    run = model.run(batch, save=[(C.PATTERN, layer), (C.V, layer), (C.Z, layer)])
    pattern, v, z = (run.acts[(c, layer)] for c in (C.PATTERN, C.V, C.Z))
    assert pattern.shape == (3, model.n_heads, 7, 7)
    rebuilt = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    real = batch["attention_mask"].bool()
    assert z.abs().max() > 1e-3
    torch.testing.assert_close(rebuilt[real], z[real], atol=1e-5, rtol=1e-5)


def test_queries_keys_reproduce_pattern(pair):
    """softmax(q . k * scale + causal/padding mask) equals the model's attention pattern."""
    _, model = pair
    batch = _batch(model.d_vocab)
    layer = model.n_layers - 1
    run = model.run(batch, save=[(C.Q, layer), (C.K, layer), (C.PATTERN, layer)])
    q, k, pattern = (run.acts[(c, layer)] for c in (C.Q, C.K, C.PATTERN))
    scores = model.attn_logits(layer, torch.einsum("bqhd,bkhd->bhqk", q, k))
    n = q.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & batch[
        "attention_mask"].bool()[:, None, None, :]
    rebuilt = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    real = batch["attention_mask"].bool()
    assert q.abs().max() > 1e-3
    torch.testing.assert_close(rebuilt.transpose(1, 2)[real], pattern.transpose(1, 2)[real],
                               atol=1e-5, rtol=1e-4)


def test_z_grads_have_head_shape(pair):
    _, model = pair
    batch = _batch(model.d_vocab)
    run = model.run(batch, save=[(C.Z, 0), (C.HEAD_OUT, 0)], metric=lambda lg: lg[:, 3].sum())
    shape = (3, 7, model.n_heads, model.d_head)
    assert run.acts[(C.Z, 0)].shape == shape and run.grads[(C.Z, 0)].shape == shape
    assert run.grads[(C.Z, 0)].abs().max() > 0


def test_run_takes_a_tokenizer_batch_encoding(tok):
    """A tokenizer's BatchEncoding (attribute access, no position_ids) runs like a dict."""
    from factfind.testing.models import tiny_model

    model = tiny_model("llama")
    model.tokenizer.padding_side = "left"
    enc = model.tokenizer(["Tiger Woods plays", "Paris"], return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())
    got = model.run(enc).logits
    torch.testing.assert_close(got, model.run(dict(enc)).logits)
    assert got.abs().max() > 0
