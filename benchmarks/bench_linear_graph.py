"""Benchmark: the single-prompt linearised attribution graph (factfind.features.linear_graph).

Measures, in one run per model, the cost of the graph in forward-pass equivalents: **FE per
target node** = (seconds of the batched transposed passes / number of targets) / (seconds of one
plain forward of the same prompt), the goal being <= 1.5 FE; and the wall time of the default
single-prompt graph (capture, every target, pruning, scores) on SmolLM2-135M with its default
dictionaries (skip transcoders at all 30 layers, `train_dictionaries`' cached set; the goal
<= 5 min on 2 cores). Also: the head split of the pruned graph's strongest targets, and the
graph's replacement and completeness scores and error share per layer.

    python benchmarks/bench_linear_graph.py --models organism,smollm2 --threads 1
    python benchmarks/bench_linear_graph.py --models gemma3 --check 60 --heads 0
    python benchmarks/bench_linear_graph.py --models organism \
        --circuit-tracer /tmp/ct-venv/bin/python

With ``--circuit-tracer PYTHON`` (a virtualenv holding circuit-tracer 0.5.0, which does not install
beside factfind's pins: ``python3 -m venv /tmp/ct-venv && /tmp/ct-venv/bin/pip install
torch==2.13.0 circuit-tracer==0.5.0``) the same adjacency is pruned and scored by circuit-tracer's
own ``prune_graph`` and ``compute_graph_scores``, and the exported graph JSON is validated by its
own pydantic ``Model`` and ``Metadata``; the script prints both sides.

With ``--edges-against PYTHON`` the *edges* themselves are compared: circuit-tracer 0.5.0's own
``attribute`` (its nnsight backend; 0.5.0 needs nnsight 0.6, which its own venv lacks: install
it beside with ``/tmp/ct-venv/bin/pip install --target /tmp/ct-nnsight06 --no-deps
nnsight==0.6.3 astor toml rich zstandard httpx accelerate`` plus ``python-socketio[client]
ipython`` with their dependencies, and pass ``--ct-pythonpath /tmp/ct-nnsight06``) builds the
graph of the same model (saved as a Hugging Face folder), the same ReLU skip transcoders
(written in circuit-tracer's format by ``Dictionaries.save``) and the same tokens (with a
leading special token, which circuit-tracer prepends otherwise), and the two adjacency
matrices are compared entry by entry, per kind of source.

    python benchmarks/bench_linear_graph.py --models none --edges-against \
        /tmp/ct-venv/bin/python --ct-pythonpath /tmp/ct-nnsight06 --edge-models llama,gemma3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, machine


def _organism():
    import factfind as ff
    from factfind.features import Dictionaries, Dictionary

    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").known_by(model)
    dicts = Dictionaries([Dictionary.random(kind="skip_transcoder", activation="topk", layer=la,
                                            d_in=model.d_model, d_sae=4 * model.d_model, k=32,
                                            seed=la) for la in range(model.n_layers)])
    return model, facts[0], dicts, "organism, random skip transcoders 4x d_model, k=32"


def _smollm2():
    import factfind as ff

    model = ff.load_model("smollm2-135m")
    corpus = ff.load_corpus(model=model, progress=False).split(0.05)[0]
    dicts = ff.train_dictionaries(model, corpus, progress=False)  # the cached default set
    facts = ff.load_facts("rome_known")
    known = facts[:200].known_by(model)
    return model, known[0], dicts, f"smollm2-135m, default dictionaries {dicts!r}"


def _gemma():
    """Gemma-3-270M (post norms, q/k norms, sliding windows) with random ReLU skip transcoders
    whose encoder biases put ~32 features per token (no trained set exists for it yet)."""
    import factfind as ff
    from factfind.features import Dictionaries, Dictionary
    from factfind.types import Component as C

    model = ff.load_model("gemma-3-270m")
    prompt = ff.load_facts("athletes")[0]
    run = model.run(model.tokenize([prompt]),
                    save=[(C.MLP_IN, la) for la in range(model.n_layers)])
    items = []
    for la in range(model.n_layers):
        d = Dictionary.random(kind="skip_transcoder", activation="relu", layer=la,
                              d_in=model.d_model, d_sae=1024, seed=la)
        g = torch.Generator().manual_seed(la)
        d.W_skip = torch.randn(model.d_model, model.d_model, generator=g) * 0.01
        pre = d.pre_acts(run.acts[(C.MLP_IN, la)][0]).flatten()
        d.b_enc = d.b_enc - torch.quantile(pre, 1 - 32 / 1024)
        items.append(d)
    return model, prompt, Dictionaries(items), "gemma-3-270m, random ReLU skip transcoders"


def bench(name: str, batch_size: int, heads: int, ct_python: str | None = None,
          check: int = 0) -> dict:
    from factfind.features.linear_graph import linear_graph

    t0 = time.perf_counter()
    model, prompt, dicts, what = {"organism": _organism, "smollm2": _smollm2,
                                  "gemma3": _gemma}[name]()
    t_load = time.perf_counter() - t0
    tb = model.tokenize([prompt])
    fe = best_of(lambda: model.run(tb), 3)
    t1 = time.perf_counter()
    g = linear_graph(model, prompt, dicts, batch_size=batch_size, progress=False)
    t_graph = time.perf_counter() - t1
    t2 = time.perf_counter()
    pruned = g.prune()
    rep, comp = g.scores()
    share = g.error_share()
    t_prune = time.perf_counter() - t2
    per_target = g.meta["seconds_targets"] / max(1, g.meta["n_targets"])
    out = {"model": what, "prompt": g.prompt, "tokens": g.n_pos, "load_s": round(t_load, 2),
           "features": g.n_features, "targets": g.meta["n_targets"], "logits": g.n_logits,
           "forward_s": fe, "graph_s": round(t_graph, 2), "targets_s":
           round(g.meta["seconds_targets"], 2), "prune_and_scores_s": round(t_prune, 2),
           "fe_per_target": round(per_target / fe, 3),
           "total_s": round(t_graph + t_prune, 2),
           "kept_nodes": int(pruned.node_mask.sum()), "kept_edges": int(pruned.edge_mask.sum()),
           "replacement": round(rep, 4), "completeness": round(comp, 4),
           "error_flagged_layers": share.loc[share["flagged"], "layer"].tolist()}
    if heads:
        kept = [i for i in pruned.node_mask.nonzero()[:, 0].tolist() if i in set(g.target_rows())]
        infl = pruned.cumulative_scores
        top = sorted(kept, key=lambda i: float(infl[i]))[:heads]
        t3 = time.perf_counter()
        df = g.split_heads(top, progress=False)
        dt = time.perf_counter() - t3
        out.update({"head_split_targets": len(top), "head_split_s": round(dt, 2),
                    "head_split_fe_per_target": round(dt / max(1, len(top)) / fe, 1),
                    "head_rows": len(df)})
    if check:  # fast == the slow reference (one intervention per source) on sampled sources
        gen = torch.Generator().manual_seed(0)
        srcs = torch.randperm(g.n_nodes - g.n_logits, generator=gen)[:check].tolist()
        ref = g.reference_edges(srcs, dtype=torch.float64)
        fast = g.adjacency[:, srcs].double()
        big = ref.abs() > 1e-3 * ref.abs().max()
        out.update({"checked_sources": len(srcs), "checked_edges": int(big.sum()),
                    "max_rel_diff": float(((fast - ref).abs()[big] / ref.abs()[big]).max())})
    if ct_python:
        out.update(against_circuit_tracer(g, ct_python))
    return out


_CT_SCRIPT = r"""
import json, sys, types
import torch
from safetensors.torch import load_file
from circuit_tracer.graph import compute_graph_scores, prune_graph
from circuit_tracer.frontend.graph_models import Metadata, Model

t = load_file(sys.argv[1])
info = json.loads(open(sys.argv[2]).read())
g = types.SimpleNamespace(
    adjacency_matrix=t["adjacency"], logit_probabilities=t["logit_probs"],
    input_tokens=t["tokens"], logit_targets=list(range(len(t["logit_probs"]))),
    selected_features=torch.arange(info["n_features"]),
    cfg=types.SimpleNamespace(n_layers=info["n_layers"]))
res = prune_graph(g, 0.8, 0.98)
rep, comp = compute_graph_scores(g)
data = json.load(open(sys.argv[3]))
Model.model_validate(data)
meta = json.load(open(sys.argv[4]))
for m in meta["graphs"]:
    Metadata.model_validate(m)
print(json.dumps({"replacement": rep, "completeness": comp,
                  "kept_nodes": int(res.node_mask.sum()), "kept_edges": int(res.edge_mask.sum()),
                  "node_mask": res.node_mask.int().tolist(),
                  "cumulative": res.cumulative_scores.tolist(),
                  "schema": "ok: circuit_tracer.frontend.graph_models.Model"}))
"""


def against_circuit_tracer(g, python: str) -> dict:
    """circuit-tracer's own pruning, scores and schema on this graph (see the docstring)."""
    import subprocess
    import tempfile

    from safetensors.torch import save_file

    from factfind.features.linear_graph_export import to_circuit_tracer_json

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        save_file({"adjacency": g.adjacency.contiguous(), "logit_probs": g.logit_probs.float(),
                   "tokens": g.tokens.contiguous()}, str(t / "graph.safetensors"))
        (t / "info.json").write_text(json.dumps({"n_features": g.n_features,
                                                 "n_layers": g.n_layers}))
        path = to_circuit_tracer_json(g, t / "graphs", slug="bench")
        (t / "ct.py").write_text(_CT_SCRIPT)
        r = subprocess.run([python, str(t / "ct.py"), str(t / "graph.safetensors"),
                            str(t / "info.json"), str(path), str(t / "graphs" /
                                                                  "graph-metadata.json")],
                           capture_output=True, text=True, timeout=600)
        if r.returncode:
            return {"circuit_tracer": "failed: " + r.stderr.strip().splitlines()[-1]}
        theirs = json.loads(r.stdout.strip().splitlines()[-1])
    ours = g.prune()
    rep, comp = g.scores()
    same_mask = theirs.pop("node_mask") == ours.node_mask.int().tolist()
    cum = torch.tensor(theirs.pop("cumulative"))
    return {"circuit_tracer": theirs, "factfind_replacement": rep,
            "factfind_completeness": comp, "same_node_mask": same_mask,
            "cumulative_max_diff": float((cum - ours.cumulative_scores).abs().max()),
            "same_kept_edges": int(ours.edge_mask.sum()) == theirs["kept_edges"]}


_CT_ATTRIBUTE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from safetensors.torch import save_file
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from circuit_tracer.replacement_model import ReplacementModel
from circuit_tracer.attribution.attribute import attribute
out, n_layers, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
cap = json.loads(sys.argv[5])
tcs = load_transcoder_set({i: f"{out}/tc/layer_{i}.safetensors" for i in range(n_layers)},
                          scan="factfind", feature_input_hook="mlp.hook_in",
                          feature_output_hook="hook_mlp_out", device=torch.device("cpu"),
                          lazy_encoder=False, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(f"{out}/model", tcs, backend="nnsight",
                                                         device=torch.device("cpu"))
t = time.perf_counter()
g = attribute(torch.tensor(ids), model, max_n_logits=10, desired_logit_prob=0.95,
              batch_size=cap["batch_size"], max_feature_nodes=cap["max_feature_nodes"],
              update_interval=cap["update_interval"], verbose=False)
dt = time.perf_counter() - t
save_file({"adjacency": g.adjacency_matrix.float().contiguous(),
           "features": g.active_features[g.selected_features].long().contiguous()},
          f"{out}/theirs.safetensors")
print(json.dumps({"seconds": dt}))
"""


def _relu_skip(model, dicts=None, prompt_tb=None):
    """ReLU skip transcoders circuit-tracer can load: random ones (tiny models), or the
    default TopK set with each encoder bias lowered so that ~32 features fire per token."""
    from factfind.features import Activation, Dictionaries, Dictionary
    from factfind.types import Component as C

    if dicts is None:
        items = []
        for i in range(model.n_layers):
            d = Dictionary.random(kind="skip_transcoder", activation="relu", layer=i,
                                  d_in=model.d_model, d_sae=48, seed=i)
            g = torch.Generator().manual_seed(10 + i)
            d.W_skip = torch.randn(d.d_in, d.d_out, generator=g) * 0.05
            d.b_enc = torch.full((48,), -0.3)
            items.append(d)
        return Dictionaries(items)
    run = model.run(prompt_tb, save=[(C.MLP_IN, la) for la in range(model.n_layers)])
    items = []
    for d in dicts.values():
        pre = d.pre_acts(run.acts[(C.MLP_IN, d.layer)][0]).flatten()
        tau = torch.quantile(pre.float(), 1 - 32 / d.d_sae)
        items.append(Dictionary(kind=d.kind, activation=Activation.RELU, layer=d.layer, site=d.site,
                                W_enc=d.W_enc, b_enc=d.b_enc - tau, W_dec=d.W_dec,
                                b_dec=d.b_dec, W_skip=d.W_skip, model=d.model))
    return Dictionaries(items)


def _for_transformers_4(path: Path) -> None:
    """A config saved by transformers 5 as transformers 4.57 (circuit-tracer's) reads it: the
    rotary base lives in ``rope_theta`` there, not in ``rope_parameters`` (read otherwise as
    the default 10,000: SmolLM2's is 100,000, and every pattern would differ)."""
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    path.write_text(json.dumps(cfg))


def edges_against(family: str, python: str, pythonpath: str | None, threads: int,
                  max_feature_nodes: int | None = None) -> dict:
    """Our adjacency against circuit-tracer's ``attribute`` on the same model, transcoders and
    tokens (see the docstring)."""
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    import factfind as ff
    from factfind.features.linear_graph import linear_graph
    from factfind.model import load_model
    from factfind.testing.models import tiny_hf_model, tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if family == "smollm2":
            model = ff.load_model("smollm2-135m")
            tok = model.tokenizer
            prompt = ff.load_facts("rome_known")[:200].known_by(model)[0]
            prompt = dataclasses.replace(prompt, prefix=(tok.bos_token or "<|endoftext|>")
                                         + prompt.prefix)
            corpus = ff.load_corpus(model=model, progress=False).split(0.05)[0]
            dicts = _relu_skip(model, ff.train_dictionaries(model, corpus, progress=False),
                               model.tokenize([prompt]))
            model.hf.save_pretrained(f"{tmp}/model")
        else:
            tok = tiny_tokenizer()
            hf = tiny_hf_model(family, len(tok))
            hf.save_pretrained(f"{tmp}/model")
            model = load_model((hf, tok))
            dicts = _relu_skip(model)
            prompt = ff.from_records([{"subject": "Michael Jordan", "relation": "sport",
                                       "template": "<|endoftext|>Fact: {} plays the sport of",
                                       "attribute": "basketball"}])[0]
        tok.save_pretrained(f"{tmp}/model")
        _for_transformers_4(Path(tmp) / "model" / "config.json")
        cfg_path = Path(tmp) / "model" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())  # transformers 5 names its own backend class
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg.update({k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)})
        cfg_path.write_text(json.dumps(cfg))  # and its special tokens (circuit-tracer zeroes
        # the features and errors of a leading special token, as factfind does)
        dicts.save(f"{tmp}/tc", format="circuit_tracer", overwrite=True)
        cap = {"max_feature_nodes": max_feature_nodes,
               "batch_size": 8 if max_feature_nodes else 64, "update_interval": 2}
        t0 = time.perf_counter()
        g = linear_graph(model, prompt, dicts, progress=False, **cap)
        ours_s = time.perf_counter() - t0
        (Path(tmp) / "ct.py").write_text(_CT_ATTRIBUTE)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        r = subprocess.run([python, f"{tmp}/ct.py", tmp, str(model.n_layers),
                            json.dumps(g.tokens.tolist()), str(threads), json.dumps(cap)],
                           capture_output=True, text=True, timeout=3000, env=env)
        if r.returncode:
            return {"family": family, "circuit_tracer": "failed: " +
                    r.stderr.strip().splitlines()[-1]}
        theirs_s = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
        t = load_file(f"{tmp}/theirs.safetensors")
    A, B = g.adjacency.double(), t["adjacency"].double()
    out: dict = {"family": family, "features": g.n_features,
                 "max_feature_nodes": max_feature_nodes,
                 "same_features": bool(torch.equal(g.features, t["features"])),
                 "factfind_s": round(ours_s, 2), "circuit_tracer_attribute_s":
                 round(theirs_s, 2)}
    if A.shape != B.shape:
        return {**out, "shapes": [list(A.shape), list(B.shape)]}
    scale = float(A.abs().max())
    n_f, n_e, P = g.n_features, g.n_errors, g.n_pos
    for name, cols in (("features", slice(0, n_f)), ("errors", slice(n_f, n_f + n_e)),
                       ("embeddings", slice(n_f + n_e, n_f + n_e + P))):
        x, y = A[:, cols], B[:, cols]
        out[f"{name}_max_diff_over_scale"] = float((x - y).abs().max()) / scale
        out[f"{name}_theirs_over_ours"] = float((y.flatten() @ x.flatten()) /
                                                (x.flatten() @ x.flatten()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", default="organism,smollm2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--heads", type=int, default=5,
                        help="split the edges of this many top targets by head (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--circuit-tracer", default=None, metavar="PYTHON",
                        help="a python with circuit-tracer 0.5.0: compare pruning, scores, schema")
    parser.add_argument("--edges-against", default=None, metavar="PYTHON",
                        help="a python with circuit-tracer 0.5.0: compare the edges themselves")
    parser.add_argument("--ct-pythonpath", default=None)
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="compare N sampled sources' edges with the slow reference")
    parser.add_argument("--edge-models", default="llama,gemma3")
    parser.add_argument("--max-feature-nodes", type=int, default=None,
                        help="with --edges-against: both sides keep this many features")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {machine()}; load average {os.getloadavg()}")
    for name in [m for m in args.models.split(",") if m and m != "none"]:
        print(json.dumps(bench(name, args.batch_size, args.heads, args.circuit_tracer,
                               args.check)),
              flush=True)
    if args.edges_against:
        for family in args.edge_models.split(","):
            print(json.dumps(edges_against(family, args.edges_against, args.ct_pythonpath,
                                           args.threads, args.max_feature_nodes)), flush=True)


if __name__ == "__main__":
    main()
