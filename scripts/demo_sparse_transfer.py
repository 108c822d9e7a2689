"""Upstream pruning then sparse transfer, against pruning downstream directly, against dense.

The offline demonstration of the masked-LM workflow on the embedded MiniLM (2-core CPU: 41
minutes with the defaults, with other work running):

1. ``upstream``: ``recipes/minilm-upstream-mlm-80.yaml`` on the BBC News texts (task
   ``masked-lm``, labels unused): the encoder pruned to 80% with the masked-LM loss;
2. ``transfer``: ``recipes/minilm-sparse-transfer.yaml`` fine-tunes it on bbc-news classification
   with every zero kept;
3. ``downstream``: ``recipes/default-minilm.yaml`` fine-tunes and prunes the dense MiniLM to 80%
   on bbc-news directly, with ``--dense-baseline`` (the dense model trained for the same steps).

Steps 2 and 3 train for the same number of steps on the same examples. The upstream corpus
documents are drawn from the whole BBC collection (a seeded shuffle of the texts), so they can
overlap the classification split's validation articles; their labels are never read.

    python scripts/demo_sparse_transfer.py --output runs/demo-transfer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from curvature.cli.main import main as cli


def run(argv: list[str]) -> None:
    start = time.perf_counter()
    code = cli(argv)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code})")
    print(f"  {argv[0]} {argv[1]}: {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--output", default="runs/demo-transfer")
    ap.add_argument("--upstream-docs", type=int, default=200, help="BBC texts for the masked LM")
    ap.add_argument("--max-train", type=int, default=512, help="bbc-news training examples")
    ap.add_argument("--max-eval", type=int, default=300, help="bbc-news validation examples")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upstream-recipe", default="recipes/minilm-upstream-mlm-80.yaml")
    ap.add_argument("--json", default=None, help="also write the three jobs' metrics to this file")
    args = ap.parse_args()
    out = Path(args.output)
    common = ["--max-length", str(args.max_length), "--seed", str(args.seed), "--no-progress"]
    cls = [
        "--data",
        "bbc-news",
        "--max-train",
        str(args.max_train),
        "--max-eval",
        str(args.max_eval),
    ]
    up = out / "upstream"
    if not (up / "metrics.json").is_file():
        run(
            ["prune", args.upstream_recipe, "--task", "masked-lm", "--data",
             "bbc-news", "--max-train", str(args.upstream_docs), "--max-eval", "60",
             "--output", str(up), *common]
        )  # fmt: skip
    if not (out / "transfer" / "metrics.json").is_file():
        run(
            ["prune", "recipes/minilm-sparse-transfer.yaml", "--model", str(up), *cls,
             "--output", str(out / "transfer"), *common]
        )  # fmt: skip
    if not (out / "downstream" / "metrics.json").is_file():
        run(
            ["prune", "recipes/default-minilm.yaml", *cls, "--dense-baseline",
             "--output", str(out / "downstream"), *common]
        )  # fmt: skip
    raw = {
        "upstream": json.loads((up / "metrics.json").read_text()),
        "transfer": json.loads((out / "transfer" / "metrics.json").read_text()),
        "downstream": json.loads((out / "downstream" / "metrics.json").read_text()),
    }
    if args.json:  # the raw file the documentation's table is made from (scripts/tables.py)
        Path(args.json).write_text(json.dumps(raw, indent=1))
    m_up, m_dn = raw["upstream"], raw["downstream"]
    lines = [
        f"bbc-news, {m_dn['train_examples']} training / {m_dn['validation_examples']} "
        f"validation examples, {args.max_length} tokens, seed {args.seed}",
        f"upstream: {m_up['train_documents']} BBC texts ({m_up['train_blocks']} blocks), "
        f"masked-LM perplexity {m_up['dense']['perplexity']:.1f} before pruning, "
        f"{m_up['pruned']['perplexity']:.1f} at {m_up['sparsity']:.0%}",
        "",
        *table(raw),
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


def table(raw: dict) -> list[str]:
    """The three models (dense and downstream-pruned from one job, the transferred one) from the
    jobs' ``metrics.json`` files gathered in one raw dict."""
    m_up, m_tr, m_dn = raw["upstream"], raw["transfer"], raw["downstream"]
    rows = [
        ("dense, fine-tuned for the same steps", 0.0, m_dn["dense_equal_budget"], m_dn["steps"],
         None),
        ("pruned downstream (fine-tune, OBS 50% to 80% on the task, recover)", m_dn["sparsity"],
         m_dn["pruned"], m_dn["steps"], m_dn["seconds"]),
        ("pruned upstream with the masked-LM task, then sparse transfer", m_tr["sparsity"],
         m_tr["pruned"], f"{m_tr['steps']} (+{m_up['steps']} upstream)",
         m_up["seconds"] + m_tr["seconds"]),
    ]  # fmt: skip
    lines = [
        f"| bbc-news, {m_dn['train_examples']} training / {m_dn['validation_examples']} "
        "validation examples | sparsity | accuracy | loss | training steps on the task | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, sp, ev, steps, secs in rows:
        s = f"{secs:,.0f}" if secs else "-"
        lines.append(
            f"| {name} | {sp:.2f} | {ev['accuracy']:.4f} | {ev['loss']:.4f} | {steps} | {s} |"
        )
    return lines


if __name__ == "__main__":
    main()
