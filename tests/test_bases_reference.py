"""The feature basis's mean (and resample) ablation against a slow, literal reference.

:func:`~factfind.evaluate.bases.evaluate_feature_circuits` ablates a feature circuit with every
dictionary spliced into its MLP, all circuits stacked in one forward, the means summed with
einsums and the splice written as a change of ``mlp_out``. The reference here does the same
thing in the plainest code there is:

* the per-role means, prompt by prompt (each tokenized alone) and position by position: each
  head's ``z``, each feature's activation ``a_f`` and each error node's value, where the error
  node of a dictionary is everything it does not write through a feature:
  ``e = mlp_out - (sum_f a_f W_dec[f] + b_dec)`` - the skip path ``x @ W_skip`` of a skip
  transcoder and the residual error together, averaged as one vector;
* the circuit's run, prompt by prompt: at each real position, every head outside the circuit
  takes its role's mean ``z``; each dictionary's ``mlp_out`` is rebuilt as
  ``sum_f a'_f W_dec[f] + b_dec + e'`` with ``a'_f = a_f`` for a kept feature and the role's
  mean otherwise, ``e' = mlp_out - sum_f a_f W_dec[f] - b_dec`` kept or the role's mean error;
  then the logit difference of the clean answer over the corrupt one. Under resample the
  replacement is the corrupt partner's value at the same position (its own run, alone).

The ``features_no_errors`` basis (the features' ranking with its error nodes left out) goes
through :func:`~factfind.evaluate.bases.basis_comparison` end to end and must equal the same
reference on its own circuits, none of which holds an error node.

They must agree on tiny models of three families (GPT-2; a grouped-query Llama; Gemma-3 with
its post-norms) with TopK transcoders and skip transcoders whose skip path is not zero, for
circuits that keep some of everything, and the full circuit must give the model's own metric.
The real-model check runs Gemma-3-270M with its cached default dictionaries (skip transcoders
at every layer) on three athlete pairs (~25 s at one thread, the model load included).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import pandas as pd
import pytest
import torch

import factfind as ff
from factfind.data.pairs import FALLBACKS
from factfind.evaluate.bases import (
    basis_circuit,
    basis_comparison,
    basis_scores,
    evaluate_feature_circuits,
    feature_circuit_nodes,
)
from factfind.features import Dictionaries, Dictionary
from factfind.graph import Node
from factfind.testing.models import tiny_model
from factfind.types import Component

Z, MLP_IN, MLP_OUT = Component.Z, Component.MLP_IN, Component.MLP_OUT


# ----------------------------------------------------------------------------- the reference


def reference_values(model, fact, dicts) -> tuple[list, list[dict]]:
    """One prompt, tokenized alone: its roles and, per position, ``z`` of each layer
    ``[H d_head]`` and per dictionary the feature activations ``[F]`` and the error node
    ``[d_out]``: ``mlp_out`` minus the sum over the active features of ``a_f W_dec[f]`` minus
    ``b_dec`` (the skip path and the residual error together)."""
    assert sorted(d.layer for d in dicts.values()) == list(range(model.n_layers)), \
        "the reference reads every MLP through a dictionary"
    save = [(Z, layer) for layer in range(model.n_layers)]
    save += [(c, d.layer) for d in dicts.values() for c in (MLP_IN, MLP_OUT)]
    tb = model.tokenize([fact])
    with torch.no_grad():
        acts = model.run(tb, save=save).acts
    roles = tb.role_names()[0]
    d64 = {name: d.to(torch.float64) for name, d in dicts.items()}
    out = []
    for p in range(len(roles)):
        values = {("z", layer): acts[(Z, layer)][0, p].double()
                  for layer in range(model.n_layers)}
        for name, d in d64.items():
            x = acts[(MLP_IN, d.layer)][0, p].double()
            y = acts[(MLP_OUT, d.layer)][0, p].double()
            a = d.encode(x)
            written = d.b_dec + sum((a[f] * d.W_dec[f] for f in a.nonzero()[:, 0].tolist()),
                                    torch.zeros_like(d.b_dec))
            values[("a", name)] = a
            values[("e", name)] = y - written
        out.append(values)
    return roles, out


def reference_means(model, facts, dicts) -> tuple[dict, dict]:
    """Per (role, site) the mean over every token of that role in ``facts`` of
    :func:`reference_values`. Returns ``(means, counts)``."""
    sums: dict = {}
    counts: dict[str, int] = {}
    for fact in facts:
        roles, values = reference_values(model, fact, dicts)
        for role, at in zip(roles, values, strict=True):
            if role is None:
                continue
            counts[role] = counts.get(role, 0) + 1
            for key, v in at.items():
                sums[(role, *key)] = sums.get((role, *key), 0) + v
    return {k: v / counts[k[0]] for k, v in sums.items()}, counts


def reference_metric(model, pairs, dicts, keep: Iterable[Node], means: dict | None) -> float:
    """The mean logit difference with everything outside ``keep`` (nodes at concrete roles)
    replaced by its role's mean (``means``) or, with ``means=None``, by the corrupt
    partner's value at the same position, one prompt and one position at a time."""
    kept = {(n.kind, n.layer, n.index, n.role, n.dictionary) for n in keep}
    kept_features: dict = {}  # (dictionary, role) -> [F] bool, looked up once
    d64 = {name: d.to(torch.float64) for name, d in dicts.items()}
    pb = ff.encode_pairs(model, pairs)
    total = 0.0
    for i, (fact, partner) in enumerate(zip(pairs.clean, pairs.corrupt, strict=True)):
        tb = model.tokenize([fact])
        roles = tb.role_names()[0]
        partner_values: list[dict] = []
        if means is None:  # the partner has the prompt's token length
            partner_roles, partner_values = reference_values(model, partner, dicts)
            assert len(partner_roles) == len(roles)

        def ref(p, key, role, partner_values=partner_values):
            return means[(role, *key)] if means is not None else partner_values[p][key]

        seen: dict = {}
        edits = {}

        def heads(z, layer, roles=roles, ref=ref):
            z = z.clone()
            for p, role in enumerate(roles):
                for h in range(model.n_heads):
                    if role is not None and ("head", layer, h, role, None) not in kept:
                        z[0, p, h] = ref(p, ("z", layer), role)[h].to(z.dtype)
            return z

        def remember(x, name, seen=seen):
            seen[name] = x
            return x

        def splice(y, name, roles=roles, seen=seen, ref=ref):
            d = d64[name]
            x = seen[name]
            out = y.clone()
            for p, role in enumerate(roles):
                if role is None:
                    continue
                a = d.encode(x[0, p].double())
                e = y[0, p].double() - (a @ d.W_dec + d.b_dec)  # the skip path and the error
                if (name, role) not in kept_features:
                    kept_features[(name, role)] = torch.tensor(
                        [("feature", d.layer, f, role, d.short) in kept for f in range(d.d_sae)])
                keep_f = kept_features[(name, role)]
                a2 = torch.where(keep_f, a, ref(p, ("a", name), role))
                e2 = e if ("error", d.layer, None, role, d.short) in kept \
                    else ref(p, ("e", name), role)
                out[0, p] = (a2 @ d.W_dec + d.b_dec + e2).to(y.dtype)
            return out

        for layer in range(model.n_layers):
            edits[(Z, layer)] = lambda z, layer=layer, f=heads: f(z, layer)
        for name, d in dicts.items():
            edits[(MLP_IN, d.layer)] = lambda x, name=name, f=remember: f(x, name)
            edits[(MLP_OUT, d.layer)] = lambda y, name=name, f=splice: f(y, name)
        with torch.no_grad():
            logits = model.run(tb, edits=edits).logits.double()  # [1 d_vocab]
        total += float(logits[0, pb.correct[i]] - logits[0, pb.wrong[i]])
    return total / len(pairs)


# ----------------------------------------------------------------------------- tiny models


def _dictionaries(model) -> Dictionaries:
    """A TopK transcoder at even layers and a ReLU skip transcoder at odd ones, with non-zero
    biases and a skip path as large as the features' write (random dictionaries start at zero
    biases and a zero skip path, which would hide a misplaced bias or skip term)."""
    out = []
    for layer in range(model.n_layers):
        skip = layer % 2 == 1
        d = Dictionary.random(kind="skip_transcoder" if skip else "transcoder",
                              activation="relu" if skip else "topk", layer=layer,
                              d_in=model.d_model, d_sae=40, k=6, seed=layer)
        g = torch.Generator().manual_seed(100 + layer)
        d.b_enc = 0.1 * torch.randn(d.d_sae, generator=g) - (0.3 if skip else 0.0)
        d.b_dec = 0.1 * torch.randn(d.d_out, generator=g)
        if skip:
            d.W_skip = 0.2 * torch.randn(d.d_in, d.d_out, generator=g)
        out.append(d)
    return Dictionaries(out)


def _random_circuit(model, dicts, roles, fraction: float, seed: int) -> list[Node]:
    """Each head, feature and error node at each role kept with probability ``fraction``."""
    g = torch.Generator().manual_seed(seed)
    nodes = [Node("head", layer, h, r) for layer in range(model.n_layers)
             for h in range(model.n_heads) for r in roles]
    for d in dicts.values():
        nodes += [Node("feature", d.layer, f, r, d.short) for f in range(d.d_sae) for r in roles]
        nodes += [Node("error", d.layer, None, r, d.short) for r in roles]
    pick = torch.rand(len(nodes), generator=g) < fraction
    return [n for n, p in zip(nodes, pick.tolist(), strict=True) if p]


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def tiny(request, facts):
    """GPT-2; Llama with grouped-query attention (2 key/value heads for 4 query heads);
    Gemma-3 with its post-attention and post-feedforward norms (``mlp_out`` is read after
    the post-norm)."""
    torch.manual_seed(0)
    model = tiny_model(request.param)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    return model, pairs, _dictionaries(model)


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_engine_equals_the_literal_reference_on_tiny_models(tiny, how):
    model, pairs, dicts = tiny
    if model.spec.name.startswith("llama"):
        assert model.n_kv_heads < model.n_heads  # grouped-query attention
    means, counts = reference_means(model, pairs.clean, dicts)
    roles = sorted(counts)
    circuits = [[], _random_circuit(model, dicts, roles, 0.3, seed=1),
                _random_circuit(model, dicts, roles, 0.8, seed=2),
                _random_circuit(model, dicts, roles, 1.0, seed=3)]
    res = evaluate_feature_circuits(model, pairs, dicts, [[n.id for n in c] for c in circuits],
                                    how=how, progress=False)
    ref = [reference_metric(model, pairs, dicts, c, means if how == "mean" else None)
           for c in circuits]
    got = res["metric"].tolist()
    assert got == pytest.approx(ref, abs=2e-5, rel=1e-4), (got, ref)
    # the empty and the full circuit are the engine's own m(∅) and m(M)
    assert res["empty"].iloc[0] == pytest.approx(ref[0], abs=2e-5)
    assert res["full"].iloc[0] == pytest.approx(ref[-1], abs=2e-5)
    # m(M) is the model's own metric: every node kept splices nothing; under resample m(∅) is
    # the corrupt prompts' (every head and MLP output theirs)
    pb = ff.encode_pairs(model, pairs)
    with torch.no_grad():
        plain = float(pb.measure(model.run(pb.clean).logits).double().mean())
        corrupt = float(pb.measure(model.run(pb.corrupt).logits).double().mean())
    assert ref[-1] == pytest.approx(plain, abs=2e-5)
    if how == "resample":
        assert ref[0] == pytest.approx(corrupt, abs=2e-5)
    # non-zero values, the partial circuits between the empty and the full one (under
    # resample a 30% circuit of GPT-2 lands 4e-4 from the empty one)
    assert min(abs(v) for v in ref) > 1e-3
    assert abs(ref[0] - ref[3]) > 1e-2 and abs(ref[2] - ref[0]) > 1e-3, ref
    assert min(abs(ref[k] - ref[3]) for k in (1, 2)) > 1e-3, ref
    # the skip transcoders' skip path is large, and the error node carries it
    skip = dicts.at(1)
    assert skip.W_skip is not None and skip.W_skip.abs().max() > 0.3


def test_the_error_node_carries_the_skip_path(tiny):
    """Keeping every feature and dropping only the skip transcoder's error node replaces
    ``x @ W_skip + error`` by its per-role mean: the reference and the engine agree, and the
    metric moves (the skip path is not a free, always-live part of the circuit)."""
    model, pairs, dicts = tiny
    means, counts = reference_means(model, pairs.clean, dicts)
    roles = sorted(counts)
    full = _random_circuit(model, dicts, roles, 1.0, seed=0)
    skip = dicts.at(1)
    no_skip_err = [n for n in full if not (n.kind == "error" and n.layer == skip.layer)]
    res = evaluate_feature_circuits(model, pairs, dicts, [[n.id for n in no_skip_err]],
                                    how="mean", progress=False)
    ref = reference_metric(model, pairs, dicts, no_skip_err, means)
    assert res["metric"].iloc[0] == pytest.approx(ref, abs=2e-5, rel=1e-4)
    assert abs(ref - res["full"].iloc[0]) > 1e-3


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_the_no_error_basis_equals_the_literal_reference_on_tiny_models(tiny, how):
    """``features_no_errors`` at budgets 5 and 20 and in full: its circuits are the features'
    ranking with the error nodes skipped (the next heads and features fill the budget), hold
    no error node, and basis_comparison's metric equals the reference's on each."""
    model, pairs, dicts = tiny
    scores = basis_scores(model, pairs, dicts, neuron_method="atp", progress=False)
    budgets = (5, 20, None)
    table = basis_comparison(model, pairs, dicts, budgets=budgets, hows=(how,), scores=scores,
                             neuron_method="atp", progress=False)
    mine = pd.DataFrame(table[(table["basis"] == "features_no_errors").to_numpy()])
    feats = pd.DataFrame(table[(table["basis"] == "features").to_numpy()])
    assert list(mine["n_errors"]) == [0, 0, 0]
    ranked = pd.DataFrame(scores[(scores["basis"] == "features").to_numpy()]).sort_values(
        by=["score", "node"], ascending=[False, True], kind="stable")["node"].tolist()
    with_errors = basis_circuit(scores, "features", 20)
    assert with_errors is not None and any(".err@" in n for n in with_errors), \
        "the error nodes rank high (the skip path is large): the filter must matter"
    means, counts = reference_means(model, pairs.clean, dicts)
    roles = sorted(counts)
    ref = []
    for budget in budgets:
        ids = basis_circuit(scores, "features_no_errors", budget)
        if ids is None:  # the full basis: every head and feature, no error node
            ids = [f"L{layer}.attn@all" for layer in range(model.n_layers)]
            ids += [d.feature_id(f) for d in dicts.values() for f in range(d.d_sae)]
        else:
            assert ids == [n for n in ranked if ".err@" not in n][:budget]
        nodes = feature_circuit_nodes(model, dicts, ids, roles)
        assert nodes and not any(n.kind == "error" for n in nodes)
        ref.append(reference_metric(model, pairs, dicts, nodes,
                                    means if how == "mean" else None))
    assert mine["metric"].tolist() == pytest.approx(ref, abs=2e-5, rel=1e-4), (mine, ref)
    # non-zero values, and the ablation moves the metric (on Gemma-3 under mean ablation the
    # full no-error circuit lands 3e-4 from the empty one: its random features carry nothing)
    assert min(abs(v) for v in ref) > 1e-3
    assert max(abs(v - mine["empty"].iloc[0]) for v in ref) > 1e-2, ref
    # the same m(M) and m(∅) as the features basis; its full circuit is not the model
    assert mine["full"].tolist() == feats["full"].tolist()
    assert mine["empty"].tolist() == feats["empty"].tolist()
    assert abs(mine["faithfulness"].iloc[-1] - 1.0) > 0.05
    assert feats["faithfulness"].iloc[-1] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- Gemma-3-270M

#: three athletes Gemma-3-270M knows (p > 0.5), partnered among the athletes
ATHLETES = ("Roberto Clemente", "Terrell Owens", "Bobby Orr")
#: a circuit of the top nodes of the features basis on 16 athlete pairs (feature AtP of
#: Gemma's default skip transcoders): heads at the final token, error nodes and features of
#: the early MLPs at the last subject token
GEMMA_CIRCUIT = (
    "L12.h2@final", "L15.h1@final", "L15.h3@final", "L15.h0@final", "L11.h1@subject_last",
    "L1.h1@subject_last", "L0.stc.err@subject_last", "L1.stc.err@subject_last",
    "L2.stc.err@subject_last", "L3.stc.err@subject_last", "L3.stc.err@subject_first",
    "L0.stc.f319@subject_last", "L1.stc.f1282@subject_last", "L1.stc.f2444@subject_last",
    "L1.stc.f1847@subject_last", "L2.stc.f1585@subject_last", "L0.stc.f2090@subject_last",
    "L10.stc.f1367@subject_last", "L17.stc.err@final",
)


def cached_default_dictionaries(model) -> Dictionaries | None:
    """The model's default dictionaries (skip transcoders at every layer) from
    ``$FACTFIND_CACHE/dictionaries``, as ``analyses/dictionaries.py`` and the features step
    left them; ``None`` when no such set is cached (none is trained here)."""
    from factfind.features.training import dictionaries_dir

    root = dictionaries_dir()
    for prov in sorted(root.glob("*/provenance.json")) if root.is_dir() else []:
        meta = json.loads(prov.read_text())
        folder = prov.parent / "dictionaries"
        if (meta.get("model") == model.name and meta.get("model_fingerprint")
                == model.fingerprint() and meta.get("config", {}).get("kind")
                == "skip_transcoder" and folder.is_dir()):
            return ff.load_dictionaries(folder)
    return None


@pytest.mark.real
@pytest.mark.slow
def test_engine_equals_the_reference_on_gemma3_with_its_default_dictionaries(gemma3):
    dicts = cached_default_dictionaries(gemma3)
    if dicts is None:
        pytest.skip(f"no cached default dictionaries of {gemma3.name} under "
                    f"{os.environ.get('FACTFIND_CACHE', '~/.cache/factfind')}/dictionaries "
                    "(analyses/dictionaries.py trains them; not trained by a test)")
    assert len(dicts) == gemma3.n_layers and dicts.at(0).W_skip is not None
    athletes = ff.load_facts("athletes")
    pairs = ff.FactDataset([f for f in athletes if f.subject in ATHLETES]).corrupt(
        gemma3, seed=0, on_missing="skip", pool=athletes, fallback=FALLBACKS)
    assert len(pairs) == len(ATHLETES)
    means, counts = reference_means(gemma3, pairs.clean, dicts)
    assert counts["prefix"] > counts["final"]  # the few-shot prefix: BOS and 11 more tokens
    roles = sorted(counts)
    circuit = feature_circuit_nodes(gemma3, dicts, GEMMA_CIRCUIT, roles)
    res = evaluate_feature_circuits(gemma3, pairs, dicts, [list(GEMMA_CIRCUIT), []],
                                    how="mean", batch_size=8, progress=False)
    ref = [reference_metric(gemma3, pairs, dicts, c, means) for c in (circuit, [])]
    assert res["metric"].tolist() == pytest.approx(ref, abs=2e-3, rel=1e-3)
    res_r = evaluate_feature_circuits(gemma3, pairs, dicts, [list(GEMMA_CIRCUIT)],
                                      how="resample", batch_size=8, progress=False)
    ref_r = reference_metric(gemma3, pairs, dicts, circuit, None)
    assert res_r["metric"].iloc[0] == pytest.approx(ref_r, abs=2e-3, rel=1e-3)
    assert abs(ref_r - res_r["empty"].iloc[0]) > 0.05
    assert res["empty"].iloc[0] == pytest.approx(ref[1], abs=2e-3)
    pb = ff.encode_pairs(gemma3, pairs)
    with torch.no_grad():
        plain = float(pb.measure(gemma3.run(pb.clean).logits).double().mean())
    assert res["full"].iloc[0] == pytest.approx(plain, abs=2e-3)
    assert abs(ref[0] - ref[1]) > 0.05 and abs(plain - ref[1]) > 1.0  # both ablations bite
