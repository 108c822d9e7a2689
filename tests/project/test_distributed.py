"""torch.distributed: several gloo processes on 127.0.0.1 give the answer of one process.

Every test starts its processes with a deadline (process-group timeout and a join timeout), so a
failing rank never hangs the suite.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import prune_kw

from curvature.pruning import parts

F64 = torch.float64
DEADLINE = 240  # seconds for a whole multi-process test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears down while a peer is still inside a collective
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, *args, expect_fail=False):
    """Run ``fn(rank, world, *args)`` in ``world`` processes; fail (never hang) past DEADLINE."""
    ctx = mp.start_processes(
        _entry, args=(world, free_port(), fn, args), nprocs=world, join=False, start_method="spawn"
    )
    end = time.monotonic() + DEADLINE
    try:
        while not ctx.join(timeout=max(1.0, end - time.monotonic())):
            if time.monotonic() > end:
                pytest.fail(f"{world} processes did not finish in {DEADLINE} s")
    except mp.ProcessRaisedException as e:
        if expect_fail:
            return str(e)
        raise
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    assert not expect_fail, "a rank was expected to fail"
    return None


# ------------------------------------------------------------------ pruning
def _model_and_data(n_batches=12, batch=8, seed=0):
    from models import correlated_inputs, trained_mlp

    x = correlated_inputs(n=n_batches * batch, seed=seed)
    model, y = trained_mlp(x, steps=60, seed=seed)
    model = model.double()
    x = x.double()
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]
    return model, batches


PRUNE_CASES = {
    "greedy": dict(sparsity=0.6),
    "greedy-per-layer": dict(sparsity=0.5, global_sparsity=False),
    "independent-block4": dict(sparsity=0.5, selection="independent", mask="block4"),
    "greedy-2:4": dict(mask="2:4", sparsity=0.5),
    "mfac": dict(sparsity=0.6, method="mfac"),
    "magnitude": dict(sparsity=0.7, method="magnitude"),
    "sparsegpt": dict(sparsity=0.5, method="sparsegpt", global_sparsity=False),
    # the parts: outlier targets from every rank's statistics, reconstruction on the layer's
    # owner, and the pass after a non-layer-wise method
    "sparsegpt-parts": dict(sparsity=0.6, method="sparsegpt+reconstruct+outlier", m=1.5),
    "magnitude+reconstruct": dict(sparsity=0.6, method="magnitude+reconstruct"),
}
BASE = dict(gradients=12, block_size=8, fisher_damping=1e-4, progress=False)


def _shard(batches, rank, world, contiguous):
    if contiguous:  # rank r: the r-th run of consecutive batches (the single process's order)
        from curvature.pruning.distributed import local_count

        counts = [local_count(len(batches), r, world) for r in range(world)]
        start = sum(counts[:rank])
        return batches[start : start + counts[rank]]
    return batches[rank::world]  # as a DistributedSampler deals them


def _prune_worker(rank, world, out, contiguous):
    from models import ce_loss

    from curvature.pruning import prune

    results = {}
    for name, kw in PRUNE_CASES.items():
        model, batches = _model_and_data()
        report = prune(
            model,
            _shard(batches, rank, world, contiguous),
            loss_fn=ce_loss,
            **prune_kw(True, **BASE, **kw),
        )
        results[name] = {
            "params": [p.detach().clone() for p in model.parameters()],
            "report": {
                k: v
                for k, v in report.to_dict().items()
                if k not in ("memory_plan", "phases", "reconstruction")
            },
            "curvature_bytes": report.memory_plan.get("curvature", 0),
            "reconstruction": report.reconstruction,
        }
    # a budget below each rank's share: several gradient passes, curvature spilled to disk
    model, batches = _model_and_data()
    report = prune(
        model,
        _shard(batches, rank, world, contiguous),
        loss_fn=ce_loss,
        **prune_kw(True, **BASE, **PRUNE_CASES["greedy"], max_memory=6000),
    )
    results["greedy-split"] = {
        "params": [p.detach().clone() for p in model.parameters()],
        "groups": report.memory_groups,
    }
    torch.save(results, f"{out}/rank{rank}.pt")


def _single(name):
    from models import ce_loss

    from curvature.pruning import prune

    model, batches = _model_and_data()
    report = prune(model, batches, loss_fn=ce_loss, **prune_kw(True, **BASE, **PRUNE_CASES[name]))
    return [p.detach().clone() for p in model.parameters()], report


@pytest.mark.parametrize("world", [2, 3])
def test_pruning_across_processes_equals_one_process(world, tmp_path):
    """Same gradients in the same order (contiguous shards): masks and weights equal one process
    to float64 round-off; every rank holds the same model and report; the Fisher is sharded."""
    run_ranks(_prune_worker, world, str(tmp_path), True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    ref, _ = _single("greedy")
    for r in range(world):
        assert ranks[r]["greedy-split"]["groups"] > 1
        for a, b in zip(ranks[r]["greedy-split"]["params"], ref):
            assert torch.equal(a == 0, b == 0)
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for name in PRUNE_CASES:
        ref, ref_report = _single(name)
        for r in range(world):
            got = ranks[r][name]
            for a, b in zip(got["params"], ref):
                assert torch.equal(a == 0, b == 0), (name, r)
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
            assert got["report"]["param_sparsity"] == ref_report.param_sparsity
            assert got["report"] == ranks[0][name]["report"]  # the same report on every rank
            if ref_report.reconstruction is not None:
                for k, v in ref_report.reconstruction.items():
                    assert got["reconstruction"][k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
        if name not in (
            "magnitude",
            "sparsegpt",
            "sparsegpt-parts",
            "magnitude+reconstruct",
        ):  # layer-wise: every rank solves every layer
            one = ref_report.memory_plan["curvature"]
            per_rank = [ranks[r][name]["curvature_bytes"] for r in range(world)]
            assert max(per_rank) <= one / world * 1.5 + 8 * 8 * 8 * 4, (name, per_rank, one)
            assert sum(per_rank) == pytest.approx(one, rel=0.35)


def test_pruning_with_interleaved_shards_equals_one_process(tmp_path):
    """A DistributedSampler's shards: the same gradients in another order (round-off only)."""
    run_ranks(_prune_worker, 2, str(tmp_path), False)
    got = torch.load(tmp_path / "rank0.pt")
    for name in ("greedy", "independent-block4"):
        ref, _ = _single(name)
        for a, b in zip(got[name]["params"], ref):
            assert torch.equal(a == 0, b == 0), name
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def _failing_worker(rank, world):
    from models import ce_loss

    from curvature.pruning import prune

    model, batches = _model_and_data()

    def loss(m, b):
        if rank == 1:
            raise ValueError("this rank's batch is broken")
        return ce_loss(m, b)

    prune(model, batches[rank::world], loss_fn=loss, **prune_kw(True, **BASE, sparsity=0.5))


def test_a_failing_rank_stops_every_rank_with_its_message():
    msg = run_ranks(_failing_worker, 2, expect_fail=True)
    assert "this rank's batch is broken" in msg


def test_fsdp_sharded_parameters_are_refused_with_one_line():
    from models import ce_loss

    from curvature.pruning import prune

    class FullyShardedDataParallel(torch.nn.Module):  # what FSDP's wrapper class is called
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model, batches = _model_and_data()
    with pytest.raises(ValueError, match="sharded by FSDP"):
        prune(
            FullyShardedDataParallel(model),
            batches,
            loss_fn=ce_loss,
            **prune_kw(True, **BASE, sparsity=0.5),
        )


class _Mixed(torch.nn.Module):
    """Awkward shapes: a parameter whose last partial block lands alone on a rank, and a float32
    first layer before float64 ones (the gradients must travel in float64, not the first
    parameter's dtype)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 5)  # float32; 30 weights: blocks of 8 end in a partial one
        self.b = torch.nn.Linear(5, 4).double()
        self.c = torch.nn.Linear(4, 3).double()

    def forward(self, x):
        h = torch.tanh(self.a(x.float())).double()
        return self.c(torch.tanh(self.b(h)))


def _mixed_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (48,), generator=gen)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 48, 4)]


def _conv1d_model():
    from transformers.pytorch_utils import Conv1D

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = Conv1D(16, 6)  # weight stored [in, out]
            self.b = Conv1D(3, 16)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.float())))

    return M()


# (model, prune settings, tolerance): the gradient exchange keeps the one-process order, so the
# Fisher case is exact to round-off; the layer-wise sums of X^T X run in another order, and the
# float32 weights they write differ in the last bit
EDGE_CASES = {
    "tail-piece": (
        _Mixed,
        dict(sparsity=0.5, block_size=8, max_memory=600),
        dict(rtol=1e-10, atol=1e-12),
    ),
    "conv1d-sparsegpt": (
        _conv1d_model,
        dict(sparsity=0.5, method="sparsegpt", params=["a.weight", "b.weight"]),
        dict(rtol=1e-6, atol=1e-7),
    ),
}


def _edge_worker(rank, world, out):
    from models import ce_loss

    from curvature.pruning import prune

    results = {}
    for name, (make, kw, _) in EDGE_CASES.items():
        model = make()
        data = _shard(_mixed_data(), rank, world, True)
        kw = prune_kw(
            lenient=True, **{"gradients": 12, "fisher_damping": 1e-4, "progress": False, **kw}
        )
        if "max_memory" in kw:
            kw["max_memory"] = kw["max_memory"] * (1 + rank)  # ranks that disagree on memory
        prune(model, data, loss_fn=ce_loss, **kw)
        results[name] = [p.detach().clone() for p in model.parameters()]
    torch.save(results, f"{out}/rank{rank}.pt")


def test_awkward_shapes_dtypes_and_budgets_across_processes(tmp_path):
    """A partial last block alone in a piece, mixed float32/float64 parameters, ranks whose
    memory budgets differ (one plan: the smallest), transposed Conv1D layers solved on one rank
    and broadcast: every rank equals one process."""
    from models import ce_loss

    from curvature.pruning import prune

    run_ranks(_edge_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, (make, kw, tol) in EDGE_CASES.items():
        model = make()
        kw = prune_kw(
            lenient=True, **{"gradients": 12, "fisher_damping": 1e-4, "progress": False, **kw}
        )
        kw.pop("max_memory", None)
        prune(model, _mixed_data(), loss_fn=ce_loss, **kw)
        for r in range(2):
            for a, b in zip(ranks[r][name], model.parameters()):
                assert torch.equal(a == 0, b.detach() == 0), (name, r)
                torch.testing.assert_close(a, b.detach(), **tol)


#: methods whose calibration pass is given one batch for two processes
FEW_BATCHES = {
    "sparsegpt": lambda: parts.SparseGPT(batches=1),
    # the outlier pass before a method that reads no data has its own count
    "magnitude+outlier": lambda: parts.chain(parts.Magnitude(), parts.Outlier(batches=1)),
}


def _small_layerwise_worker(rank, world, method):
    from models import ce_loss

    from curvature.pruning import prune

    model, batches = _model_and_data()
    prune(model, batches[rank::world], loss_fn=ce_loss, sparsity=0.5, progress=False, global_sparsity=False, method=FEW_BATCHES[method]())  # fmt: skip


@pytest.mark.parametrize("method", FEW_BATCHES)
def test_a_pass_with_fewer_batches_than_processes_is_refused_on_every_rank(method):
    msg = run_ranks(_small_layerwise_worker, 2, method, expect_fail=True)
    assert "batches=1 calibration batches for 2 processes" in msg


# ------------------------------------------------------------------ the threshold
def _threshold_worker(rank, world, out):
    from curvature.pruning import distributed

    gen = torch.Generator().manual_seed(7)
    full = [torch.cummax(torch.randn(5, 6, generator=gen).abs(), 1).values for _ in range(6)]
    full[2][1] = full[4][0]  # ties across ranks
    full[3][:] = -1.0  # fixed groups
    full[5][0, 3:] = float("inf")
    mine = full[rank * 6 // world : (rank + 1) * 6 // world]
    res = {k: distributed.take_cheapest([mine], [k])[0] for k in (0, 1, 7, 33, 100, 10**6)}
    torch.save(res, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_threshold_equals_one_process_selection(world, tmp_path):
    from curvature.pruning.allocation import take_cheapest

    run_ranks(_threshold_worker, world, str(tmp_path))
    gen = torch.Generator().manual_seed(7)
    full = [torch.cummax(torch.randn(5, 6, generator=gen).abs(), 1).values for _ in range(6)]
    full[2][1] = full[4][0]
    full[3][:] = -1.0
    full[5][0, 3:] = float("inf")
    got = {}
    for r in range(world):
        for k, counts in torch.load(tmp_path / f"rank{r}.pt").items():
            got.setdefault(k, []).extend(counts)
    for k, counts in got.items():
        ref = take_cheapest(full, k)
        assert [c.tolist() for c in counts] == [c.tolist() for c in ref], k


# ------------------------------------------------------------------ optimizers
def _opt_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=gen)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    return model, x, y


def _make(kind, model):
    from curvature.optim import MFAC, MKOR, AdaHessian

    if kind == "adahessian":
        return AdaHessian(model.parameters(), lr=0.05, seed=3, probes="shared", weight_decay=0.01)
    if kind == "adahessian-per-rank":
        return AdaHessian(model.parameters(), lr=0.05, seed=3, probes="per-rank")
    if kind == "mkor":
        return MKOR(model, lr=0.05, inv_freq=1)
    if kind == "mfac-sharded":
        shard = dist.is_initialized()
        return MFAC(
            model.parameters(),
            lr=0.05,
            gradients=4,
            damping=0.1,
            fisher_dtype=F64,
            shard_window=shard,
        )
    return MFAC(model.parameters(), lr=0.05, gradients=4, damping=0.1, fisher_dtype=F64)


def _train(kind, model, opt, x, y, steps=4):
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=kind.startswith("adahessian"))
        opt.step()


OPT_KINDS = ["adahessian", "adahessian-per-rank", "mkor", "mfac", "mfac-sharded"]


def _opt_worker(rank, world, out):
    results = {}
    for kind in OPT_KINDS:
        model, x, y = _opt_setup()
        n = len(x) // world
        xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        if kind.startswith("adahessian"):  # the optimizer averages (no DDP: no double backward)
            opt = _make(kind, model)
            _train(kind, model, opt, xs, ys)
        else:  # DDP averages the gradients; the optimizer keeps the rest consistent
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = _make(kind, model)
            _train(kind, ddp, opt, xs, ys)
        results[kind] = [p.detach().clone() for p in model.parameters()]
        if kind.startswith("mfac"):
            results[kind + "-window"] = opt._fishers[0].grads.numel()
            if kind == "mfac-sharded":  # the slice saved on a rank loads on the same rank
                sd = opt.state_dict()
                again = _make(kind, model)
                again.load_state_dict(sd)
                assert torch.equal(again._fishers[0].grads, opt._fishers[0].grads)
    torch.save(results, f"{out}/rank{rank}.pt")


def test_optimizers_across_processes_equal_one_process_on_the_whole_batch(tmp_path):
    """AdaHessian (shared probes), MKOR and M-FAC steps on 2 ranks x 8 examples equal one process
    on the 16; with per-rank probes the replicas still agree, and differ from the shared ones."""
    run_ranks(_opt_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    total = ranks[0]["mfac-window"]  # a whole window on every rank without sharding
    assert ranks[0]["mfac-sharded-window"] + ranks[1]["mfac-sharded-window"] == total
    assert ranks[0]["mfac-sharded-window"] < total
    for kind in OPT_KINDS:
        for a, b in zip(ranks[0][kind], ranks[1][kind]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # replicas identical
        if kind == "adahessian-per-rank":
            assert any(
                not torch.allclose(a, b) for a, b in zip(ranks[0][kind], ranks[0]["adahessian"])
            )
            continue
        model, x, y = _opt_setup()
        opt = _make(kind, model)
        _train(kind, model, opt, x, y)
        for a, b in zip(ranks[0][kind], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ the command line
@pytest.fixture
def cli(tmp_path):
    """A tiny model folder, data file and gradual OBS recipe for the commands."""
    from types import SimpleNamespace

    from models import RECIPE, make_csv, make_model_dir, write_recipe

    return SimpleNamespace(
        model=str(make_model_dir(tmp_path / "model")),
        data=str(make_csv(tmp_path / "train.csv")),
        recipe=write_recipe(tmp_path, RECIPE.replace("MASK", "unstructured")),
    )


def _launch(launcher: list[str], args: list[str]):
    """``launcher ... -m curvature ARGS`` with a short peer timeout and one thread per rank."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", CURVATURE_DIST_TIMEOUT="120")
    cmd = [*launcher, "-m", "curvature", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE)


def _torchrun(args, nproc=2):
    import sys

    return _launch(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_addr", "127.0.0.1", "--master_port", str(free_port())],
        args,
    )  # fmt: skip


def _assert_one_output(res, out, sparsity):
    """The command succeeded, reached ``sparsity`` and left one output folder, no partial one."""
    import json

    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    return metrics


def test_prune_command_under_torchrun_writes_once(cli, tmp_path):
    """``torchrun --nproc_per_node 2 -m curvature prune ...``: both ranks prune from their own
    shard of the gradient batches, rank 0 alone writes the output (no partial folder left)."""
    out = tmp_path / "runs" / "oneshot"
    res = _torchrun(
        ["prune", cli.recipe, "--oneshot", "--model", cli.model, "--data", cli.data,
         "--output", str(out), "--no-progress"]
    )  # fmt: skip
    _assert_one_output(res, out, 0.6)


def test_prune_command_under_accelerate_launch(cli, tmp_path):
    """``accelerate launch --num_processes 2 --cpu -m curvature prune ...`` sets up the same."""
    import shutil

    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    out = tmp_path / "runs" / "acc"
    res = _launch(
        [launcher, "launch", "--num_processes", "2", "--cpu", "--main_process_port",
         str(free_port())],
        ["prune", cli.recipe, "--oneshot", "--model", cli.model, "--data", cli.data,
         "--output", str(out), "--no-progress"],
    )  # fmt: skip
    _assert_one_output(res, out, 0.6)


def test_gradual_recipe_under_torchrun(cli, tmp_path):
    """A gradual recipe inside HF Trainer (DDP across the 2 ranks): the pruning callback takes
    each rank's shard of the Fisher batches; rank 0 writes the one output."""
    out = tmp_path / "runs" / "gradual"
    res = _torchrun(
        ["prune", cli.recipe, "--model", cli.model, "--data", cli.data, "--output", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert _assert_one_output(res, out, 0.6)["steps"] > 0


def test_sweep_under_torchrun_writes_once_and_resumes(cli, tmp_path):
    """``torchrun -m curvature sweep``: rank 0 alone writes; a rerun skips the finished points on
    every rank (the others start from rank 0's resume log)."""
    import json

    out = tmp_path / "runs" / "sweep"
    args = [
        "sweep", "--output", str(out), "--model", cli.model, "--data", cli.data,
        "--methods", "obs,magnitude", "--sparsities", "0.5", "--finetune-epochs", "1",
        "--gradients", "8", "--block-size", "8", "--params", "re:bert.encoder", "--no-progress",
    ]  # fmt: skip
    res = _torchrun(args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["method"] for r in rows) == ["dense", "magnitude", "obs"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["sweep"]
    before = (out / "points.jsonl").read_text()
    res = _torchrun(args)  # everything done: both ranks skip every point
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "points.jsonl").read_text() == before


def test_gradual_sweep_under_torchrun(cli, tmp_path):
    """A gradual sweep point trains under DDP, is saved by rank 0 and read back by both ranks."""
    import json

    out = tmp_path / "runs" / "gradual-sweep"
    args = [
        "sweep", "--output", str(out), "--model", cli.model, "--data", cli.data,
        "--methods", "obs", "--sparsities", "0.6", "--finetune-epochs", "1", "--recipe",
        cli.recipe, "--no-progress",
    ]  # fmt: skip
    res = _torchrun(args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    point = [r for r in rows if r["method"] == "obs"][0]
    assert point["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert sorted(p.name for p in out.parent.iterdir()) == ["gradual-sweep"]
    assert not list(out.glob(".point-*"))  # removed once every rank had read it


def test_train_with_adahessian_under_torchrun_is_refused_with_one_line(monkeypatch, capsys):
    from curvature.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["train", "--optimizer", "adahessian", "--output", "unused"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adahessian under torchrun" in err[0]


# ------------------------------------------------------------------ optimizer edge cases
def _opt_edge_worker(rank, world, out):
    from curvature.core.sliding import SlidingWindowFisherInverse
    from curvature.optim import MKOR, AdaHessian

    results = {}
    # MKOR-H: each rank sees other data, so other losses; the switch must happen on every rank at
    # the same step (a rank that stopped its factor all-reduce alone would hang the others)
    model, x, y = _opt_setup()
    n = len(x) // world
    xs, ys = x[rank * n : (rank + 1) * n] * (1 + 3 * rank), y[rank * n : (rank + 1) * n]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = MKOR(model, lr=0.05, inv_freq=1, hybrid=True, switch_window=2, switch_patience=1,
               switch_ratio=0.99)  # fmt: skip
    for _ in range(16):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(xs), ys)
        loss.backward()
        opt.observe_loss(loss)
        opt.step()
    results["mkor-h"] = ([p.detach().clone() for p in model.parameters()], opt.switched_at_step)
    # AdaHessian: float32 and float64 layers, and a layer only rank 0 uses
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 5).double()
    b = torch.nn.Linear(5, 3)
    extra = torch.nn.Linear(3, 3)
    params = [*a.parameters(), *b.parameters(), *extra.parameters()]
    opt = AdaHessian(params, lr=0.05, seed=1)
    for _ in range(3):
        opt.zero_grad()
        h = b(torch.tanh(a(xs)).float())
        if rank == 0:
            h = extra(h)
        torch.nn.functional.cross_entropy(h, ys).backward(create_graph=True)
        opt.step()
    results["adahessian"] = [p.detach().clone() for p in params]
    # a sharded window over fewer coordinates than ranks, 16-bit storage
    f = SlidingWindowFisherInverse(1, window=3, damping=0.1, dtype=torch.bfloat16, shard=True)
    results["window"] = [f.add_and_mul(torch.tensor([float(i + 1)])) for i in range(4)]
    torch.save(results, f"{out}/rank{rank}.pt")


def test_optimizer_edge_cases_across_processes(tmp_path):
    from curvature.core.sliding import SlidingWindowFisherInverse

    run_ranks(_opt_edge_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    (p0, s0), (p1, s1) = ranks[0]["mkor-h"], ranks[1]["mkor-h"]
    assert s0 is not None and s0 == s1  # switched, at the same step on both ranks
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)
    for a, b in zip(ranks[0]["adahessian"], ranks[1]["adahessian"]):
        assert torch.equal(a, b)  # replicas agree despite dtypes and an unused layer
    f = SlidingWindowFisherInverse(1, window=3, damping=0.1, dtype=torch.bfloat16)
    for i, got in enumerate(ranks[1]["window"]):  # rank 1 holds no column of the window
        torch.testing.assert_close(got, f.add_and_mul(torch.tensor([float(i + 1)])))


def _teardown_worker(rank, world, reps):
    from models import ce_loss

    from curvature.pruning import prune

    for _ in range(reps):
        model, batches = _model_and_data()
        prune(model, batches[rank::world], loss_fn=ce_loss, **prune_kw(True, **BASE, sparsity=0.6))


@pytest.mark.parametrize("world", [2, 3])
def test_pruning_ranks_start_and_tear_down_many_times_under_cpu_load(world):
    """A 2-rank prune once aborted in teardown ('terminate called without an active exception')
    while the machine was busy. Under two busy processes, start, prune and tear down the ranks
    repeatedly: every run must finish cleanly."""
    import subprocess
    import sys

    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for _ in range(4):
            assert run_ranks(_teardown_worker, world, 2) is None
    finally:
        for p in load:
            p.kill()
            p.wait()
