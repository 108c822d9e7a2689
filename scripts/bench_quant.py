"""GPTQ against the reference implementation on SmolLM2's layers, and against round-to-nearest.

Real calibration inputs: 16 BBC News sequences of 256 tokens through the embedded SmolLM2-135M;
the inputs of block 3's ``q_proj`` (576 columns), ``up_proj`` (576) and ``down_proj`` (1536) are
kept, and each layer is quantized from the same ``H = 2/N X^T X`` by this toolkit's
``quantize.gptq`` (float64, and float32 as the reference computes) and by the reference ``GPTQ.fasterquant`` (float32; its module is loaded
from ``--reference``, a checkout of the authors' repository, never copied here). Printed per
layer and setting: the output error ``||(Q - W) X^T||^2 / ||W X^T||^2`` of both and of
round-to-nearest, and the seconds of both (same process, same threads). The reference calls
``torch.cuda.synchronize()`` unconditionally; on a machine without CUDA it is replaced by a no-op.

    python scripts/bench_quant.py --reference /path/to/gptq --raw docs/bench-quant-fidelity.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from curvature.pruning import quantize
from curvature.pruning.quantize import Grid

SETTINGS = [  # (bits, group, act_order)
    (4, 128, False),
    (4, None, False),
    (3, 128, False),
    (3, None, False),
    (4, 128, True),
    (8, None, False),
]


def inputs(block=3, n=16, length=256):
    """``{layer: (weight, inputs [tokens, cols])}`` of block ``block`` of SmolLM2 on BBC News."""
    from transformers import AutoTokenizer

    from curvature.tasks.kinds import load_model
    from curvature.tasks.lm import read_corpus
    from curvature.tasks.models import model_source

    model = load_model("causal-lm", "smollm2").eval()
    path, extra = model_source("smollm2")
    tok = AutoTokenizer.from_pretrained(path, **extra)
    text = "\n\n".join(read_corpus("bbc-news")[:200])
    ids = tok(text, return_tensors="pt").input_ids[0][: n * length].reshape(n, length)
    layer = model.model.layers[block]
    mods = {
        "q_proj": layer.self_attn.q_proj,
        "up_proj": layer.mlp.up_proj,
        "down_proj": layer.mlp.down_proj,
    }
    got: dict[str, list] = {k: [] for k in mods}
    hooks = [
        m.register_forward_hook(
            lambda m, a, o, k=k: got[k].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for k, m in mods.items()
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return {k: (mods[k].weight.detach().clone(), torch.cat(v)) for k, v in got.items()}


def reference_gptq(ref, w, x, bits, group, act_order):
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w.clone().float()
    g = ref.gptq.GPTQ(layer)
    g.add_batch(x.float(), None)
    g.quantizer = ref.quant.Quantizer()
    g.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    t = time.perf_counter()
    g.fasterquant(percdamp=0.01, groupsize=group or -1, actorder=act_order)
    return layer.weight.data.double(), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of the authors' GPTQ repository")
    ap.add_argument("--raw", required=True, help="JSON lines written here")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, args.reference)
    import types

    import gptq as ref_gptq  # the authors' module
    import quant as ref_quant

    ref = types.SimpleNamespace(gptq=ref_gptq, quant=ref_quant)
    rows = []
    for name, (w, x) in inputs().items():
        x64 = x.double()
        h = 2.0 / x.shape[0] * x64.T @ x64
        target = x64 @ w.double().T
        norm = float((target**2).sum())

        def rel(q, x64=x64, target=target, norm=norm):
            return float(((x64 @ q.T - target) ** 2).sum()) / norm

        for bits, group, act in SETTINGS:
            grid = Grid(bits=bits, group=group)
            t = time.perf_counter()
            ours = quantize.gptq(w, h, grid, act_order=act)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ours32 = quantize.gptq(w, h, grid, act_order=act, dtype=torch.float32)
            t_ours32 = time.perf_counter() - t
            theirs, t_ref = reference_gptq(ref, w, x, bits, group, act)
            row = {
                "layer": name, "shape": list(w.shape), "tokens": x.shape[0], "bits": bits,
                "group": group, "act_order": act, "threads": args.threads,
                "error_ours": rel(ours.weight), "error_reference": rel(theirs),
                "error_ours_float32": rel(ours32.weight.double()),
                "error_rtn": rel(quantize.rtn(w, grid).weight),
                "seconds_ours": t_ours, "seconds_ours_float32": t_ours32,
                "seconds_reference": t_ref,
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row))
    with open(args.raw, "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
