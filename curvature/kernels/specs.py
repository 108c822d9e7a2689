"""Every launch configuration the dispatcher can choose, for compiling the kernels ahead of time.

Each :class:`Spec` is one kernel with one set of constexprs, warps and argument types, built from
the same ``config`` functions the launchers call, over every size the dispatch sends to a kernel
(blocks up to each kernel's limit, the group sizes and N:M runs it accepts, every AdaHessian
segment class). ``scripts/check_kernels.py`` compiles them for real GPU targets with Triton's own
compiler (no GPU needed) and reads registers and spills off the cubin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import adahessian, mkor, obs, woodbury
from ._triton import next_pow2

#: Groups (weights pruned together) and N:M run lengths the OBS kernels accept.
GROUPS = obs.GROUPS
NM_RUNS = obs.NM_RUNS


@dataclass(frozen=True)
class Spec:
    kernel: str  # module.function
    fn: object = field(compare=False, repr=False)
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    sizes: str = field(compare=False, default="")  # what the dispatch sends to it

    @property
    def label(self) -> str:
        c = ",".join(f"{k}={v}" for k, v in self.constexprs)
        types = sorted({t for _, t in self.signature if t.startswith("*fp") or t == "*bf16"})
        return f"{c} {'/'.join(t[1:] for t in types)} w{self.num_warps}"


def _ranges(values: dict) -> dict:
    """``{config: [sizes]}`` -> ``{config: "a-b"}`` text."""
    out = {}
    for key, sizes in values.items():
        lo, hi = min(sizes), max(sizes)
        out[key] = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return out


def _woodbury() -> list[Spec]:
    fn = woodbury._woodbury_kernel
    by_cfg: dict = {}
    for bsz in range(1, woodbury.MAX_BLOCK + 1):
        cfg = woodbury.config(bsz)
        by_cfg.setdefault(tuple(cfg.items()), []).append(bsz)
    specs = []
    for key, sizes in _ranges(by_cfg).items():
        cfg = dict(key)
        warps = cfg.pop("num_warps")
        for f, g in (("fp64", "fp64"), ("fp32", "fp32"), ("fp32", "bf16")):
            sig = (
                ("f_ptr", f"*{f}"),
                ("g_ptr", f"*{g}"),
                ("k", "i32"),
                ("bsz", "i32"),
                ("g_stride_k", "i64"),
                ("gradients", "fp32"),
            )
            specs.append(
                Spec("woodbury._woodbury_kernel", fn, sig, tuple(cfg.items()), warps, f"B {sizes}")
            )
    return specs


def _obs_sizes():
    """(bsz, group, nm) for every block size and structure the OBS kernels accept."""
    for bsz in range(1, obs.MAX_BLOCK + 1):
        for g in GROUPS:
            if bsz % g == 0:
                yield bsz, g, None
        for m in NM_RUNS:  # N only changes one compare constant: one N per run length M
            if bsz % m == 0:
                yield bsz, 1, (m // 2, m)


def _obs() -> list[Spec]:
    scores: dict = {}
    updates: dict = {}
    greedy: dict = {}
    for bsz, g, nm in _obs_sizes():
        cfg = obs.scores_config(bsz, g, nm)
        warps = cfg.pop("num_warps")
        scores.setdefault((tuple(cfg.items()), warps), []).append(bsz)
        if nm is None:
            cfg = obs.update_config(bsz, g)
            warps = cfg.pop("num_warps")
            updates.setdefault((tuple(cfg.items()), warps), []).append(bsz)
        if bsz <= obs.GREEDY_MAX_BLOCK and (nm is None or next_pow2(bsz) % nm[1] == 0):
            cfg = obs.greedy_config(bsz, g, nm)
            warps = cfg.pop("num_warps")
            greedy.setdefault((tuple(cfg.items()), warps), []).append(bsz)
    specs = []
    for dt in ("fp64", "fp32"):
        for kernel, configs in (("scores", scores), ("update", updates), ("greedy", greedy)):
            name = f"_{kernel}_kernel"
            for (key, warps), sizes in _ranges(configs).items():
                sig = _obs_signature(kernel, dt, nm=dict(key).get("NM_M", 1) > 1)
                specs.append(Spec(f"obs.{name}", getattr(obs, name), sig, key, warps, f"B {sizes}"))
    return specs


def _obs_signature(kernel: str, dt: str, nm: bool) -> tuple:
    """Argument types of an OBS kernel: the weights and inverse blocks in ``dt``, then its own."""
    own = {
        "scores": (("out_ptr", f"*{dt}"), ("mask_ptr", "*i8" if nm else f"*{dt}")),
        "update": (("p_ptr", "*i8"), ("out_ptr", f"*{dt}")),
        "greedy": (("flag_ptr", "*i8"), ("order_ptr", "*i64"), ("cost_ptr", "*fp64")),
    }[kernel]
    steps = (("steps", "i32"),) if kernel == "greedy" else ()
    return (
        ("w_ptr", f"*{dt}"),
        ("h_ptr", f"*{dt}"),
        *own,
        ("bsz", "i32"),
        ("ngroups", "i32"),
    ) + steps


def _adahessian() -> list[Spec]:
    specs = []
    sp = 1
    while sp <= adahessian.MAX_SEGMENT:
        cfg = adahessian.config(sp)
        warps = cfg.pop("num_warps")
        for has_d in (True, False):
            sig = (
                ("tile_tab", "*i32"),
                *((name, "*i64") for name in ("p_tab", "g_tab", "d_tab", "m_tab", "v_tab")),
                ("meta_ptr", "*i64"),
                ("bc_ptr", "*fp32"),
                *((name, "fp32") for name in ("lr", "beta1", "beta2", "eps", "weight_decay")),
                ("hessian_power", "fp32"),
            )
            key = (("HAS_D", has_d), *cfg.items())
            specs.append(
                Spec(
                    "adahessian._adahessian_kernel",
                    adahessian._adahessian_kernel,
                    sig,
                    key,
                    warps,
                    f"segments {sp // 2 + 1 if sp > 1 else 1}-{sp}",
                )
            )
        sp *= 2
    return specs


def _mkor() -> list[Spec]:
    tile = mkor.TILE
    matvec = (
        ("tile_tab", "*i32"),
        ("addr_ptr", "*i64"),
        ("vec_ptr", "*fp64"),
        ("voff_ptr", "*i64"),
        ("size_ptr", "*i32"),
        ("out_ptr", "*fp64"),
    )
    rank1 = (
        ("tile_tab", "*i32"),
        ("addr_ptr", "*i64"),
        ("vec_ptr", "*fp64"),
        ("au_ptr", "*fp64"),
        ("voff_ptr", "*i64"),
        ("size_ptr", "*i32"),
        ("coef_ptr", "*fp64"),
    )
    return [
        Spec("mkor._matvec_kernel", mkor._matvec_kernel, matvec, (("TILE", tile),), 4, "any"),
        Spec("mkor._rank1_kernel", mkor._rank1_kernel, rank1, (("TILE", tile),), 4, "any"),
    ]


def all_specs() -> list[Spec]:
    """Every dispatched launch configuration of every kernel."""
    return [*_woodbury(), *_obs(), *_adahessian(), *_mkor()]
