"""Measured inference latency and throughput of a (pruned) model, in the formats that exist on the
machine it runs on.

- ``dense``: the model as saved (pruned weights are zeros in dense matrices);
- ``csr``: every ``nn.Linear`` whose weight is at least :data:`CSR_MIN_SPARSITY` zeros does its
  product through a CSR matrix (``torch.sparse``); the other layers stay dense. Offered on the
  CPU only where some layer qualifies;
- ``2:4``: on CUDA only, the linear weights that satisfy 2:4 go through PyTorch's
  semi-structured kernels (``to_sparse_semi_structured``, half precision).

Each format is timed on one fixed batch (size and sequence length recorded): the median of
``reps`` forward passes after a warm-up, under ``torch.inference_mode``; the outputs of a sparse
format are checked against the dense one's (``max_abs_diff``). Timings are the machine's own: read
them as ratios to ``dense`` from the same run.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch

CSR_MIN_SPARSITY = 0.5


class CSRLinear(torch.nn.Module):
    """``nn.Linear`` whose weight is a CSR matrix: ``y = x W^T + b`` with ``torch.sparse``."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, measured here
            warnings.simplefilter("ignore", UserWarning)
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.out_features = linear.out_features

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = (self.weight @ flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def _swap_linears(model, make, qualifies) -> int:
    """Replace the qualifying ``nn.Linear`` modules by ``make(linear)``; returns how many."""
    count = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and qualifies(child):
                setattr(mod, child_name, make(child))
                count += 1
    return count


def _sparsity(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def _is_2_4(w: torch.Tensor) -> bool:
    if w.shape[-1] % 4:
        return False
    return bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def _median(fn, reps: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def available_formats(model) -> list[str]:
    """The formats :func:`measure` can time for ``model`` here."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    out = ["dense"]
    device = next(model.parameters()).device
    if device.type == "cpu" and any(_sparsity(m.weight) >= CSR_MIN_SPARSITY for m in linears):
        out.append("csr")
    if device.type == "cuda" and any(_is_2_4(m.weight) for m in linears):
        out.append("2:4")
    return out


@torch.inference_mode()
def measure(model, batch: dict, *, reps: int = 5, formats: list[str] | None = None) -> dict:
    """``{"batch_size", "sequence_length", "device", "formats": {name: {...}}}`` with, per
    format, ``latency_ms`` (one forward of the batch), ``throughput`` (examples per second),
    ``layers`` (linear layers in that format) and ``max_abs_diff`` against dense."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    ids = batch["input_ids"]
    result = {
        "batch_size": int(ids.shape[0]),
        "sequence_length": int(ids.shape[1]),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "formats": {},
    }
    try:
        ref = _logits(model(**batch)).float()
        for fmt in formats or available_formats(model):
            if fmt == "dense":
                net, layers = model, 0
            else:
                net = copy.deepcopy(model)
                if fmt == "csr":
                    layers = _swap_linears(
                        net, CSRLinear, lambda m: _sparsity(m.weight) >= CSR_MIN_SPARSITY
                    )
                elif fmt == "2:4":
                    from torch.sparse import to_sparse_semi_structured

                    net = net.half()

                    def make(m):
                        m.weight = torch.nn.Parameter(to_sparse_semi_structured(m.weight.detach()))
                        return m

                    layers = _swap_linears(net, make, lambda m: _is_2_4(m.weight))
                else:
                    raise ValueError(f"format must be one of dense, csr, 2:4; got {fmt!r}")
            seconds = _median(lambda n=net: n(**batch), reps)
            diff = (_logits(net(**batch)).float() - ref).abs().max().item()
            result["formats"][fmt] = {
                "latency_ms": 1e3 * seconds,
                "throughput": result["batch_size"] / seconds,
                "layers": layers,
                "max_abs_diff": diff,
            }
    finally:
        model.train(was)
    return result


__all__ = ["CSRLinear", "CSR_MIN_SPARSITY", "available_formats", "measure"]
