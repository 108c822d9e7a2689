"""Masks and weights of the pruning engine on a tiny BERT with fixed batches.

``python tests/engine_golden.py`` writes ``tests/golden/engine.safetensors`` from the engine as it
is; ``test_engine_golden.py`` checks that the engine still produces them bit for bit. The file was
written before the engine was split into parts (curvature, solver, mask, allocation), so the test
guards that refactor and every later one: regenerate it only for a deliberate change of numbers,
and say why in the commit.
"""

from __future__ import annotations

from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "engine.safetensors"

# (method, selection, mask, sparsity, global_sparsity)
CASES = [
    ("obs", "greedy", "unstructured", 0.6, True),
    ("obs", "greedy", "block4", 0.5, True),
    ("obs", "greedy", "2:4", 0.5, True),
    ("obs", "independent", "unstructured", 0.6, True),
    ("obs", "independent", "block4", 0.5, True),
    ("obs", "independent", "2:4", 0.5, True),
    ("magnitude", "greedy", "unstructured", 0.6, True),
    ("magnitude", "greedy", "block4", 0.5, True),
    ("magnitude", "greedy", "2:4", 0.5, True),
    ("obs", "greedy", "unstructured", 0.6, False),
    ("obs", "independent", "unstructured", 0.6, False),
    ("magnitude", "greedy", "unstructured", 0.6, False),
]


def case_key(method, selection, mask, sparsity, global_sparsity) -> str:
    where = "global" if global_sparsity else "per-layer"
    return f"{method}-{selection}-{mask.replace(':', 'of')}-{sparsity}-{where}"


def golden_bert():
    """The shared tiny BERT at the golden file's size, without dropout, in float64."""
    from models import tiny_bert

    return tiny_bert(vocab_size=17, num_labels=2).eval().double()


def fixed_batches(n=12, batch=4, length=10):
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(5, 17, (batch, length), generator=gen),
            "labels": torch.randint(0, 2, (batch,), generator=gen),
        }
        for _ in range(n)
    ]


def loss_fn(model, batch):
    return model(**batch).loss


def run_case(method, selection, mask, sparsity, global_sparsity) -> dict[str, torch.Tensor]:
    from curvature.pruning import pipeline, prune

    model = golden_bert()
    report = prune(
        model,
        fixed_batches(),
        loss_fn=loss_fn,
        sparsity=sparsity,
        global_sparsity=global_sparsity,
        method=pipeline(method).with_settings(
            **({"selection": selection} if method in ("obs", "mfac") else {}),
            **({} if method == "magnitude" else {"gradients": 12, "fisher_damping": 1e-4}),
            **({} if method == "magnitude" else {"dtype": torch.float64}),
            block_size=8,
        ),
        mask=mask,
        params=["re:.*encoder.*(query|key|value|dense)\\.weight"],
        progress=False,
    )
    out = {}
    params = dict(model.named_parameters())
    for name in report.param_sparsity:
        out[f"weight/{name}"] = params[name].detach().clone().contiguous()
        out[f"mask/{name}"] = report.masks.get(name).to(torch.uint8).contiguous()
    return out


def all_cases() -> dict[str, torch.Tensor]:
    tensors = {}
    for case in CASES:
        for k, v in run_case(*case).items():
            tensors[f"{case_key(*case)}/{k}"] = v
    return tensors


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from safetensors.torch import save_file

    GOLDEN.parent.mkdir(exist_ok=True)
    save_file(all_cases(), GOLDEN)
    print(f"wrote {GOLDEN}")
