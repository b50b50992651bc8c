"""Neuron AtP at Pythia-2.8B scale on one GPU (goal: 1,500 prompts, all 32 x 10,240 = 327,680
MLP neurons at the last subject token, in under 5 minutes on one H100).

Shape is what costs, so the model is a GPT-NeoX with Pythia-2.8B's configuration (32 layers,
d_model 2560, 32 heads, d_mlp 10240, vocabulary 50,304, rotary on a quarter of each head,
parallel attention and MLP) and random weights built directly on the GPU in bfloat16 - nothing
is downloaded. Prompts are ``organism:sport`` facts paired with corrupt partners under the
organism's tokenizer (its ids are a subset of the vocabulary). Reports the time of
``factfind.attribute.atp(model, pairs, components=["neurons"], positions=["subject_last"])``, the
batch size chosen from free GPU memory, and the peak CUDA memory.

    python benchmarks/bench_gpu_atp.py                 # needs CUDA
    python benchmarks/bench_gpu_atp.py --tiny          # same code path, small config, CPU
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from datetime import date

import torch

import factfind as ff
from factfind.attribute.atp import atp

PYTHIA_2_8B = dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=32,
                   intermediate_size=10240, vocab_size=50304, max_position_embeddings=2048,
                   rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                   layer_norm_eps=1e-5)
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
            vocab_size=50304, max_position_embeddings=128, rotary_pct=0.25,
            rotary_emb_base=10000, use_parallel_residual=True, layer_norm_eps=1e-5)


def build(shape: dict, device: torch.device, dtype: torch.dtype, tokenizer) -> ff.Model:
    """A randomly initialised GPT-NeoX of ``shape``, created on ``device`` in ``dtype``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(**{k: v for k, v in shape.items() if not k.startswith("rotary")},
                        rope_parameters={"rope_type": "default",
                                         "rope_theta": float(shape["rotary_emb_base"]),
                                         "partial_rotary_factor": shape["rotary_pct"]},
                        attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with device:
        hf = GPTNeoXForCausalLM._from_config(cfg, dtype=dtype)
    return ff.load_model((hf.eval(), tokenizer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true",
                    help="a small config on the CPU: checks the code path without a GPU")
    ap.add_argument("--prompts", type=int, default=None, help="default 1500 (64 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: from free memory")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not args.tiny and not cuda:
        print("bench_gpu_atp.py needs a CUDA GPU (a Pythia-2.8B-shaped model is ~5.6 GB in "
              "bf16 and its AtP over 1,500 prompts takes hours on a CPU). Run with --tiny to "
              "check the code path on the CPU.", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    n = args.prompts or (64 if args.tiny else 1500)

    from transformers import AutoTokenizer

    from factfind.organism import CHECKPOINT_DIR

    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    t0 = time.perf_counter()
    model = build(TINY if args.tiny else PYTHIA_2_8B, device, dtype, tok)
    t_build = time.perf_counter() - t0
    facts = ff.load_facts("organism:sport")[: n * 2]
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:n]
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} pairs available, asked for {n}")
    n_pos = model.tokenize(list(pairs.clean)).input_ids.shape[1]
    # AtP keeps the neurons' activations, gradients and source activations of every layer
    batch = args.batch_size or model.rows_that_fit(3 * model.activation_bytes(n_pos), cap=512)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    df = atp(model, pairs, components=["neurons"], positions=["subject_last"],
                batch_size=batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    neurons = model.n_layers * model.d_mlp
    assert len(df) == neurons, (len(df), neurons)
    assert df["effect"].abs().max() > 0, "AtP estimates are all zero"
    if device.type == "cuda":
        peak = f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        where = torch.cuda.get_device_name(device)
    else:
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
        where = "CPU (--tiny)"
    print(f"{date.today()}, {where}, torch {torch.__version__}, {dtype}")
    print(f"model: {model} (random weights, built in {t_build:.1f} s)")
    print(f"neuron AtP at subject_last: {len(pairs)} prompts x {neurons:,} neurons, "
          f"{n_pos} tokens, batch {batch}: {seconds:.1f} s ({seconds / 60:.2f} min), {peak}")
    if not args.tiny:
        print(f"goal: under 5 minutes -> {'met' if seconds < 300 else 'NOT met'}")


if __name__ == "__main__":
    main()
