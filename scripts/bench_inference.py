"""CPU inference speed of pruned models against the dense one, measured honestly.

Pruning leaves zeros in dense weight matrices, and a dense matrix product does the same work
whatever the values, so an unstructured-pruned model saved as is runs at the dense speed. A speed-up
needs a sparse format and a kernel that skips the zeros. This script measures, on the CPU:

1. one linear layer of MiniLM's feed-forward block (1536 x 384, 2048 tokens) at several
   sparsities: dense product, the same zeros in a CSR matrix (``torch.sparse``), 4x4 blocks in a
   BSR matrix, and 2:4 (PyTorch's semi-structured kernels exist for CUDA only: reported as such);
2. the whole model: the dense MiniLM, the same model with its encoder's linear weights pruned
   (zeros in dense matrices), and with those layers' products done through CSR. Outputs are
   checked to agree.

    python scripts/bench_inference.py                     # default MiniLM, 80% and 90%
    python scripts/bench_inference.py --model runs/default  # a model saved by `curvature prune`

Timings are medians of several rounds, each round timing every variant once (so a drift of a
shared machine falls on all of them alike); read the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch
from _bench import environment

from curvature.integrations.speed import CSRLinear


def _prune_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(w.numel() * sparsity)
    if k == 0:
        return w.clone()
    thresh = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() <= thresh, torch.zeros_like(w), w)


def layer_rows(reps: int) -> list[dict]:
    """One feed-forward layer at each sparsity: dense, CSR and 4x4 BSR products (seconds)."""
    torch.manual_seed(0)
    x = torch.randn(2048, 384)
    rows = []
    for sparsity in (0.5, 0.8, 0.9, 0.95):
        w = _prune_magnitude(torch.randn(1536, 384), sparsity)
        csr = w.to_sparse_csr()
        # 4x4 block structure at the same sparsity (the blocks with the smallest norms removed)
        norms = w.view(384, 4, 96, 4).norm(dim=(1, 3))
        keep = norms > norms.flatten().kthvalue(max(1, int(norms.numel() * sparsity))).values
        wb = torch.randn(1536, 384) * keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
        bsr = wb.to_sparse_bsr((4, 4))
        t_dense, t_csr, t_bsr = _interleaved(
            [lambda w=w: x @ w.T, lambda c=csr: (c @ x.T).T, lambda b=bsr: (b @ x.T).T], reps
        )
        rows.append(
            {
                "sparsity": sparsity,
                "dense_s": t_dense,
                "csr_s": t_csr,
                "bsr_s": t_bsr,
                "semi_structured": _semi_structured_status(),
            }
        )
    return rows


def layer_table(rows: list[dict]) -> list[str]:
    lines = [
        "| sparsity | dense ms | CSR ms | CSR speed-up | BSR 4x4 ms | BSR speed-up | 2:4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t_dense, t_csr, t_bsr = r["dense_s"], r["csr_s"], r["bsr_s"]
        lines.append(
            f"| {r['sparsity']:.0%} | {t_dense * 1e3:.1f} | {t_csr * 1e3:.1f} | "
            f"{t_dense / t_csr:.2f}x | {t_bsr * 1e3:.1f} | {t_dense / t_bsr:.2f}x | "
            f"{r['semi_structured']} |"
        )
    return lines


def _semi_structured_status() -> str:
    try:
        from torch.sparse import to_sparse_semi_structured

        w = torch.zeros(64, 64)
        w[:, ::2] = 1.0
        to_sparse_semi_structured(w)
        return "supported"
    except Exception:  # the kernels are CUDA-only
        return "no CPU kernel"


def _interleaved(fns: list, reps: int) -> list[float]:
    """Median seconds of each function, timed in ``reps`` rounds that call every function once
    (after one warm-up call each), each round starting one function later: drifts of a shared
    machine, and whatever the previous call leaves behind, fall on every entry alike."""
    times = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn()
        for r in range(reps):
            for j in range(len(fns)):
                k = (r + j) % len(fns)
                t = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def model_rows(model_path: str | None, sparsities: list[float], reps: int) -> list[dict]:
    """The whole model, dense and pruned, with zeros in dense weights and through CSR, timed
    in interleaved rounds."""
    import copy

    from curvature.pruning.params import select_params
    from curvature.tasks.models import load_classifier

    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense, _ = load_classifier(model_path or "default", 5)
    dense.eval()
    rows = [{"model": "dense", "sparsity": _sparsity(dense)}]
    models = [dense]
    for sparsity in [None] if model_path else sparsities:
        model, _ = load_classifier(model_path or "default", 5)
        model.load_state_dict(dense.state_dict())  # same classifier head as the dense run
        model.eval()
        names = [n for n, _ in select_params(model, ["re:.*encoder.*dense.weight"])]
        with torch.no_grad():
            for n in names:
                mod = model.get_submodule(n.rsplit(".", 1)[0])
                if sparsity is not None:
                    mod.weight.copy_(_prune_magnitude(mod.weight, sparsity))
        label = "pruned" if sparsity is None else f"magnitude {sparsity:.0%}"
        csr = copy.deepcopy(model)
        for n in names:
            parent, attr = n.rsplit(".", 1)[0].rsplit(".", 1)
            setattr(
                csr.get_submodule(parent), attr, CSRLinear(csr.get_submodule(f"{parent}.{attr}"))
            )
        with torch.inference_mode():
            diff = (csr(**batch).logits - model(**batch).logits).abs().max().item()
        sp = _sparsity(model, names)
        rows.append({"model": f"{label}, zeros in dense weights", "sparsity": sp})
        rows.append({"model": f"{label}, CSR linears", "sparsity": sp, "logit_diff": diff})
        models += [model, csr]
    seconds = _interleaved([lambda m=m: m(**batch) for m in models], reps)
    for row, secs in zip(rows, seconds):
        row["seconds"] = secs
    return rows


def model_table(rows: list[dict]) -> list[str]:
    """Times against the dense row of the same run."""
    lines = [
        "| model | sparsity of encoder linears | forward ms (batch 16 x 128) | x dense | "
        "max abs logit diff vs dense-format |",
        "|---|---|---|---|---|",
    ]
    t_ref = rows[0]["seconds"]
    for r in rows:
        diff = f"{r['logit_diff']:.1e}" if "logit_diff" in r else ""
        lines.append(
            f"| {r['model']} | {r['sparsity']:.1%} | {r['seconds'] * 1e3:.0f} | "
            f"{r['seconds'] / t_ref:.2f} | {diff} |"
        )
    return lines


def _sparsity(model, names=None) -> float:
    params = dict(model.named_parameters())
    names = names or [n for n in params if "encoder" in n and n.endswith("dense.weight")]
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / sum(params[n].numel() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a pruned model folder (default: MiniLM)")
    ap.add_argument("--sparsities", default="0.8,0.9")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the raw times to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    raw = {
        **environment(),
        "reps": args.reps,
    }
    print(
        f"# bench_inference on {platform.node()} ({raw['cpus']} CPUs, "
        f"{raw['threads']} torch threads), torch {raw['torch']}, {raw['date']}"
    )
    print("\nOne feed-forward linear layer (1536 x 384, 2048 tokens):\n")
    raw["layer"] = layer_rows(args.reps)
    print("\n".join(layer_table(raw["layer"])), flush=True)
    print("\nWhole model:\n")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    raw["model"] = model_rows(args.model, sparsities, args.reps)
    print("\n".join(model_table(raw["model"])))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    main()
