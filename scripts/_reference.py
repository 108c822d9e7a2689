"""The layer-wise methods side by side with their authors' scripts on SmolLM2-135M.

One point per process (``python scripts/bench_pruning.py --part reference``): the embedded
SmolLM2-135M (float32), the same 64 calibration sequences of 256 tokens (BBC News training
articles cut into blocks, drawn by a seeded shuffle), the same thread count, then the pruned or
quantized model's perplexity on the first validation articles (the project's evaluator, with its
per-document units kept for paired intervals). Every linear layer of the 30 blocks is treated
(210 matrices; the tied output head is left alone by both), one block's layers from the same
inputs (the published scripts without ``--true-sequential``), damping 1% of the mean diagonal.

This toolkit runs through its public API (``prune`` with ``SparseGPT``/``Wanda``,
``quantize_model`` with ``Quantize``); the published scripts run their own sequential loops
(``llama_sequential`` of the SparseGPT and GPTQ repositories, ``prune_wanda`` of the Wanda one)
with their own layer classes, imported from a checkout given on the command line. What the
harness adds to run them unchanged on this machine's libraries: their arguments as the
namespace their command line would build; their data loader given the same sequences (Wanda's
loader is replaced by one returning them); ``hf_device_map`` set empty (Wanda reads it);
``torch.cuda.synchronize`` a no-op on a machine without CUDA (they call it to time themselves); and,
because the decoder layers of the installed ``transformers`` take the rotary embeddings as an
argument the scripts do not pass, the layer's forward computes them from the positions when they
are missing. Timers wrap, without changing them, the calls that make up each side's time:
forward passes (the rest), ``X^T X`` accumulation, and the per-layer solve.
"""

from __future__ import annotations

import functools
import json
import os
import random
import resource
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

SEQUENCES, LENGTH, EVAL_ARTICLES = 64, 256, 40

#: (label, implementation, method, settings) in the order they run
POINTS = [
    ("dense", "dense", "dense", {}),
    ("sparsegpt 50%", "this toolkit", "sparsegpt", {"precision": "float64"}),
    ("sparsegpt 50%", "this toolkit, float32", "sparsegpt", {"precision": "float32"}),
    ("sparsegpt 50%", "published", "sparsegpt", {}),
    ("wanda 50%", "this toolkit", "wanda", {"precision": "float64"}),
    ("wanda 50%", "published", "wanda", {}),
    ("gptq 4-bit g128", "this toolkit", "gptq", {"precision": "float64"}),
    ("gptq 4-bit g128", "this toolkit, float32", "gptq", {"precision": "float32"}),
    ("gptq 4-bit g128", "published", "gptq", {}),
    # GPTQ's rounding decisions cascade: a second calibration draw (other sequences from the same
    # articles) shows how far two equally valid runs land apart
    ("gptq 4-bit g128, draw 2", "this toolkit", "gptq", {"precision": "float64", "draw": 1}),
    ("gptq 4-bit g128, draw 2", "published", "gptq", {"draw": 1}),
]


def key(label: str, impl: str) -> str:
    return f"{label} | {impl}"


class Timers:
    """Seconds spent inside wrapped callables, by name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def _setup(threads: int, seed: int = 0, draw: int = 0):
    from curvature.tasks.kinds import prepare

    torch.set_num_threads(threads)
    prep = prepare(
        "causal-lm", "smollm2", "bbc-news", seed=seed, max_train=200, max_eval=EVAL_ARTICLES,
        max_length=LENGTH, stride=LENGTH,
    )  # fmt: skip
    ids = torch.tensor(prep.train["input_ids"], dtype=torch.long)
    order = list(range(len(ids)))
    random.Random(draw).shuffle(order)  # the calibration draw (the split stays seed's)
    calib = ids[order[:SEQUENCES]]
    model = prep.model.float().eval()
    names = [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    ]
    return prep, model, calib, names


def _lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _ours(model, calib, names, method, settings, timers):
    from curvature.pruning import layerwise, parts, prune
    from curvature.pruning.quantization import Quantize, quantize_model

    data = list(calib.split(8))
    timers.wrap(layerwise._Stats, "_add", "products")
    if method == "gptq":
        part = Quantize(bits=4, group=128, batches=len(data), **settings)
        rep = quantize_model(model, data, _lm_loss, part, params=names, progress=False)
    else:
        chooser = {"sparsegpt": parts.SparseGPT, "wanda": parts.Wanda}[method]
        rep = prune(model, data, loss_fn=_lm_loss, sparsity=0.5, params=names, progress=False,
                    method=chooser(batches=len(data), **settings))  # fmt: skip
    return {"phases": {k: float(v) for k, v in rep.phases.items()}}


def _rotary_shim(model):
    """Decoder layers called without ``position_embeddings`` compute them (see the module)."""
    layer_cls = type(model.model.layers[0])
    rotary = model.model.rotary_emb
    forward = layer_cls.forward

    @functools.wraps(forward)
    def with_positions(self, hidden_states, *a, position_embeddings=None, **k):
        if position_embeddings is None:
            pos = k.get("position_ids")
            if pos is None:
                pos = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
            position_embeddings = rotary(hidden_states, pos)
        return forward(self, hidden_states, *a, position_embeddings=position_embeddings, **k)

    layer_cls.forward = with_positions


def _published(model, calib, method, checkout: Path, timers):
    _rotary_shim(model)
    if not torch.cuda.is_available():  # the scripts synchronize the device to time themselves
        torch.cuda.synchronize = lambda *a, **k: None
    model.seqlen = LENGTH
    model.hf_device_map = {}
    loader = [(calib[i : i + 1], None) for i in range(len(calib))]
    dev = torch.device("cpu")
    common = dict(nsamples=len(calib), seed=0, percdamp=0.01, true_sequential=False)
    sys.path.insert(0, str(checkout))
    if method == "wanda":
        import lib.layerwrapper as wrapper
        import lib.prune as wanda

        wanda.get_loaders = lambda *a, **k: (loader, None)
        timers.wrap(wrapper.WrappedGPT, "add_batch", "products")
        args = Namespace(**common, sparsity_ratio=0.5, use_variant=False)
        wanda.prune_wanda(args, model, None, dev, prune_n=0, prune_m=0)
        return {}
    import llama  # the checkout's script; its module globals are its command line's namespace

    if method == "sparsegpt":
        import sparsegpt

        cls, solve = sparsegpt.SparseGPT, "fasterprune"
        llama.args = Namespace(**common, sparsity=0.5, prunen=0, prunem=0, blocksize=128,
                               wbits=16, minlayer=-1, maxlayer=1000, prune_only="", invert=False)  # fmt: skip
    else:
        import gptq

        cls, solve = gptq.GPTQ, "fasterquant"
        llama.args = Namespace(**common, wbits=4, groupsize=128, sym=False, act_order=False,
                               static_groups=False)  # fmt: skip
    timers.wrap(cls, "add_batch", "products")
    timers.wrap(cls, solve, "solve")
    llama.llama_sequential(model, loader, dev)
    return {}


def run_point(label: str, impl: str, method: str, settings: dict, opts: dict) -> dict:
    """One point, in this process; returns its raw record."""
    settings = dict(settings)
    prep, model, calib, names = _setup(opts["threads"], draw=settings.pop("draw", 0))
    timers = Timers()
    out = {}
    seconds = 0.0
    if method != "dense":
        sink = open(os.devnull, "w")  # the published scripts print every layer
        real_stdout, sys.stdout = sys.stdout, sink
        t0 = time.perf_counter()
        try:
            if impl == "published":
                out = _published(model, calib, method, Path(opts["checkouts"][method]), timers)
            else:
                out = _ours(model, calib, names, method, settings, timers)
        finally:
            seconds = time.perf_counter() - t0
            sys.stdout = real_stdout
    torch.set_num_threads(opts["eval_threads"])
    zeros = sum(int((dict(model.named_parameters())[n] == 0).sum()) for n in names)
    total = sum(dict(model.named_parameters())[n].numel() for n in names)
    # a quantized layer has at most 2^bits values in a group of a row
    levels = len(torch.unique(dict(model.named_parameters())[names[0]][0, :128]))
    m = prep.evaluate(model)
    units = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in m["units"].items()}
    return {
        "label": label, "implementation": impl, "method": method, "settings": settings,
        "threads": opts["threads"], "sequences": SEQUENCES, "length": LENGTH,
        "seconds": seconds, "timers": timers.seconds, **out,
        "sparsity": zeros / total, "levels_in_first_group": levels,
        "perplexity": m["perplexity"], "tokens": m["tokens"], "units": units,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
    }  # fmt: skip


def child_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    rec = run_point(*spec["point"], spec["opts"])
    Path(spec["out"]).write_text(json.dumps(rec))
    return 0
