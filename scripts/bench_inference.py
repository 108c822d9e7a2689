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

Timings are medians of several runs; this machine is shared, so read the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

from curvature.integrations.speed import CSRLinear


def _median_time(fn, reps: int) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _prune_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(w.numel() * sparsity)
    if k == 0:
        return w.clone()
    thresh = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() <= thresh, torch.zeros_like(w), w)


def layer_table(reps: int) -> list[str]:
    torch.manual_seed(0)
    x = torch.randn(2048, 384)
    lines = [
        "| sparsity | dense ms | CSR ms | CSR speed-up | BSR 4x4 ms | BSR speed-up | 2:4 |",
        "|---|---|---|---|---|---|---|",
    ]
    for sparsity in (0.5, 0.8, 0.9, 0.95):
        w = _prune_magnitude(torch.randn(1536, 384), sparsity)
        t_dense = _median_time(lambda w=w: x @ w.T, reps)
        csr = w.to_sparse_csr()
        t_csr = _median_time(lambda csr=csr: (csr @ x.T).T, reps)
        # 4x4 block structure at the same sparsity (the blocks with the smallest norms removed)
        norms = w.view(384, 4, 96, 4).norm(dim=(1, 3))
        keep = norms > norms.flatten().kthvalue(max(1, int(norms.numel() * sparsity))).values
        wb = torch.randn(1536, 384) * keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
        bsr = wb.to_sparse_bsr((4, 4))
        t_bsr = _median_time(lambda bsr=bsr: (bsr @ x.T).T, reps)
        lines.append(
            f"| {sparsity:.0%} | {t_dense * 1e3:.1f} | {t_csr * 1e3:.1f} | {t_dense / t_csr:.2f}x | "
            f"{t_bsr * 1e3:.1f} | {t_dense / t_bsr:.2f}x | {_semi_structured_status()} |"
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


def model_table(model_path: str | None, sparsities: list[float], reps: int) -> list[str]:
    from curvature.pruning.params import select_params
    from curvature.tasks.models import load_classifier

    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lines = [
        "| model | sparsity of encoder linears | forward ms (batch 16 x 128) | x dense | "
        "max abs logit diff vs dense-format |",
        "|---|---|---|---|---|",
    ]
    dense, _ = load_classifier(model_path or "default", 5)
    dense.eval()
    t_ref = _median_time(lambda: dense(**batch), reps)
    lines.append(f"| dense | {_sparsity(dense):.1%} | {t_ref * 1e3:.0f} | 1.00 | |")
    variants = [None] if model_path else sparsities
    for sparsity in variants:
        model, _ = load_classifier(model_path or "default", 5)
        model.load_state_dict(dense.state_dict())  # same classifier head as the dense run
        model.eval()
        names = [n for n, _ in select_params(model, ["re:.*encoder.*dense.weight"])]
        modules = dict(model.named_modules())
        with torch.no_grad():
            for n in names:
                mod = modules[n.rsplit(".", 1)[0]]
                if sparsity is not None:
                    mod.weight.copy_(_prune_magnitude(mod.weight, sparsity))
        label = "pruned" if sparsity is None else f"magnitude {sparsity:.0%}"
        sp = _sparsity(model, names)
        t_zero = _median_time(lambda m=model: m(**batch), reps)
        with torch.inference_mode():
            ref = model(**batch).logits
        for n in names:
            parent, attr = n.rsplit(".", 1)[0].rsplit(".", 1)
            setattr(modules[parent], attr, CSRLinear(modules[n.rsplit(".", 1)[0]]))
        t_csr = _median_time(lambda m=model: m(**batch), reps)
        with torch.inference_mode():
            diff = (model(**batch).logits - ref).abs().max().item()
        lines.append(
            f"| {label}, zeros in dense weights | {sp:.1%} | {t_zero * 1e3:.0f} | "
            f"{t_zero / t_ref:.2f} | |"
        )
        lines.append(
            f"| {label}, CSR linears | {sp:.1%} | {t_csr * 1e3:.0f} | {t_csr / t_ref:.2f} | "
            f"{diff:.1e} |"
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    print(
        f"# bench_inference on {platform.node()} ({os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("\nOne feed-forward linear layer (1536 x 384, 2048 tokens):\n")
    print("\n".join(layer_table(args.reps)))
    print("\nWhole model:\n")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print("\n".join(model_table(args.model, sparsities, args.reps)))


if __name__ == "__main__":
    main()
