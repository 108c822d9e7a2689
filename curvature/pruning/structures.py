"""Structures of a transformer as coupled groups across matrices, traced from one forward pass.

A structure is removed from every matrix it lives in at once:

- an **attention head** is rows of the query, key and value projections and the matching input
  columns of the output projection; with grouped-query attention, one key/value head and the
  query heads that share it (``heads / kv_heads`` of them) are one structure;
- a **feed-forward neuron** is a row of the up (and gate) projection and an input column of the
  down projection.

The groups are found from the model's modules, not from names per architecture: one forward pass
records, inside each repeated block (the ``nn.ModuleList`` holding most linear layers), the order
in which its ``nn.Linear`` layers run and which of them read the same input tensor. A set of
layers reading one input (the *producers*) followed by one layer whose inputs are as wide as the
first producer's outputs (the *consumer*) is a coupled pair: three or more producers are an
attention (query first, then key and value), one or two (up, or gate and up) a feed-forward. The
number of heads comes from ``model.config`` (``num_attention_heads``, ``num_key_value_heads``).
A block where no such pair is found (a fused query-key-value matrix, GPT-2's ``Conv1D``) is one
clear error naming the block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

HEADS = "heads"
NEURONS = "neurons"
KINDS = (HEADS, NEURONS)


@dataclass
class Coupled:
    """One coupled group of structures in one block: ``count`` structures of the ``kind``, the
    ``producers`` whose output rows and the ``consumer`` whose input columns they are."""

    kind: str
    block: int
    producers: list[tuple[str, torch.nn.Linear]]
    consumer: tuple[str, torch.nn.Linear]
    count: int
    #: consumer columns (and the first producer's rows) per structure
    width: int
    #: rows of the other producers per structure (key/value rows of a key/value head)
    narrow: int = 0
    kept: list[int] = field(default_factory=list)
    #: the attention module holding the producers (its head counts follow the sizes)
    owner: torch.nn.Module | None = None

    def __post_init__(self):
        if not self.kept:
            self.kept = list(range(self.count))

    def columns(self, structures=None) -> torch.Tensor:
        """The consumer's input columns of ``structures`` (all of them by default), ``[n, width]``."""
        s = torch.as_tensor(
            range(self.count) if structures is None else structures, dtype=torch.long
        )
        return s[:, None] * self.width + torch.arange(self.width)[None, :]

    def rows(self, producer: torch.nn.Linear, structures) -> torch.Tensor:
        per = self.width if producer.out_features == self.consumer[1].in_features else self.narrow
        s = torch.as_tensor(structures, dtype=torch.long)
        return (s[:, None] * per + torch.arange(per)[None, :]).reshape(-1)

    def head_counts(self) -> tuple[int, int]:
        """``(query heads, key/value heads)`` an attention group has now."""
        return self.count * self.width // self.narrow, self.count

    @property
    def name(self) -> str:
        return f"block {self.block} {self.kind}"


def _linear_like(module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _repeated_blocks(model):
    names = {id(m): n for n, m in model.named_modules()}
    best, best_count = None, 0
    for lst in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        count = sum(_linear_like(m) for m in lst.modules())
        if count > best_count:
            best, best_count = lst, count
    if best is None:
        raise ValueError(
            f"structures: {type(model).__name__} has no repeated blocks of linear layers "
            "(an nn.ModuleList of transformer blocks) to trace"
        )
    return best, names[id(best)]


def _heads(model) -> tuple[int, int]:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise ValueError(
            f"structures: {type(model).__name__} has no config.num_attention_heads; attention "
            "heads cannot be traced (prune neurons only)"
        )
    kv = getattr(config, "num_key_value_heads", None) or heads
    return int(heads), int(kv)


def _head_dim(model, heads: int) -> int:
    """The size of one head: ``config.head_dim`` where the configuration has one, else the
    dense ``hidden_size / num_attention_heads`` (which removing heads does not change)."""
    config = model.config
    size = getattr(config, "head_dim", None)
    if isinstance(size, int) and size > 0:
        return size
    hidden = getattr(config, "hidden_size", None)
    return hidden // heads if isinstance(hidden, int) and hidden % heads == 0 else 0


def trace(model, run, kinds=KINDS) -> list[Coupled]:
    """The coupled groups of ``model`` (``kinds``: ``"heads"``, ``"neurons"``), in block order.
    ``run()`` makes one forward pass of the model (under ``torch.no_grad``)."""
    blocks, prefix = _repeated_blocks(model)
    calls: dict[int, list] = {}
    keep_alive = []

    def hook(module, args, out, b, name):
        x = args[0]
        if not module.in_features or not module.out_features:
            return  # a module removed whole (:func:`remove_module`): nothing left to couple
        keep_alive.append(x)
        calls.setdefault(b, []).append((name, module, id(x)))

    handles = []
    for b, block in enumerate(blocks):
        for n, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                full = f"{prefix}.{b}.{n}"
                handles.append(
                    m.register_forward_hook(lambda mod, a, o, b=b, n=full: hook(mod, a, o, b, n))
                )
            elif type(m).__name__ == "Conv1D":
                for h in handles:
                    h.remove()
                raise ValueError(
                    f"structures: {prefix}.{b}.{n} is a fused Conv1D layer; heads and neurons of "
                    f"{type(model).__name__} cannot be traced yet (separate nn.Linear query, key, "
                    "value and feed-forward layers are needed)"
                )
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for b in range(len(blocks)):
        found = _pairs(model, b, calls.get(b, []), kinds)
        out.extend(found)
    if not out:
        raise ValueError(
            f"structures: no {' or '.join(kinds)} found in the blocks of {type(model).__name__} "
            "(no layers reading one input followed by a layer consuming their outputs)"
        )
    return out


def _pairs(model, b, calls, kinds) -> list[Coupled]:
    # consecutive calls that read one tensor are one set of producers
    sets, seen = [], set()
    for name, module, key in calls:
        if name in seen:  # a layer called twice in one pass: only its first call counts
            continue
        seen.add(name)
        if sets and sets[-1][0] == key:
            sets[-1][1].append((name, module))
        else:
            sets.append((key, [(name, module)]))
    found, i = [], 0
    while i + 1 < len(sets):
        producers, nxt = sets[i][1], sets[i + 1][1]
        consumer = nxt[0]
        width = producers[0][1].out_features
        if len(nxt) == 1 and consumer[1].in_features == width:
            kind = HEADS if len(producers) >= 3 else NEURONS
            if kind in kinds:
                found.append(_coupled(model, kind, b, producers, consumer))
            i += 2
        else:
            i += 1
    return found


def _coupled(model, kind, b, producers, consumer) -> Coupled:
    width = consumer[1].in_features
    if kind == NEURONS:
        if any(p.out_features != width for _, p in producers):
            raise ValueError(
                f"structures: block {b}: the feed-forward layers {[n for n, _ in producers]} "
                f"do not all give {width} outputs"
            )
        return Coupled(NEURONS, b, producers, consumer, count=width, width=1)
    heads, kv = _heads(model)
    head_dim = _head_dim(model, heads) or width // heads
    if width != heads * head_dim and head_dim and heads % kv == 0:
        # a block whose heads were removed already (the configuration says the dense counts):
        # the head size and the query heads per key/value head stay what they were
        heads = width // head_dim
        kv = heads // (_heads(model)[0] // kv) if heads else 0
    if not head_dim or head_dim * heads != width or not kv or heads % kv:
        raise ValueError(
            f"structures: block {b}: {width} attention outputs are not {heads} heads "
            f"({kv} key/value heads)"
        )
    for n, p in producers:
        if p.out_features not in (width, kv * head_dim):
            raise ValueError(
                f"structures: block {b}: {n} gives {p.out_features} outputs, neither "
                f"{heads} nor {kv} heads of {head_dim}"
            )
    owner = _parent(model, producers[0][0])
    return Coupled(
        HEADS, b, producers, consumer, count=kv, width=width // kv, narrow=head_dim, owner=owner
    )


def _parent(model, name: str):
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


_HEAD_ATTRS = ("num_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")


def set_head_counts(module, heads: int, kv_heads: int) -> None:
    """Set the head counts an attention module keeps as attributes (and reads in its forward, as
    OPT's ``num_heads``) to the sizes of its resized projections."""
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in _KV_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, kv_heads)
    size = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
    if isinstance(getattr(module, "all_head_size", None), int) and isinstance(size, int):
        module.all_head_size = heads * size


#: the lists of :func:`recording` blocks open now; every parameter replaced is appended to each
_RECORDERS: list[list] = []


@contextmanager
def recording():
    """Collect ``(old parameter, new parameter, dim, index)`` for every parameter :func:`shrink`
    replaces inside the block (new = old.index_select(dim, index)), for :func:`follow`."""
    taken: list = []
    _RECORDERS.append(taken)
    try:
        yield taken
    finally:
        _RECORDERS.remove(taken)


def _replace(linear: torch.nn.Linear, attr: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(linear, attr)
    new = torch.nn.Parameter(old.index_select(dim, index).contiguous(), old.requires_grad)
    setattr(linear, attr, new)
    for taken in _RECORDERS:
        taken.append((old, new, dim, index))


def _take(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    index = index.to(linear.weight.device)
    with torch.no_grad():
        _replace(linear, "weight", dim, index)
        if dim == 0 and linear.bias is not None:
            _replace(linear, "bias", 0, index)
    if dim == 0:
        linear.out_features = int(index.numel())
    else:
        linear.in_features = int(index.numel())


def shrink(group: Coupled, keep: list[int], *, whole: bool = False) -> None:
    """Physically remove every structure of ``group`` not in ``keep`` (indices among its current
    structures): the producers' rows and the consumer's columns go; the others keep their
    values. An empty ``keep`` needs ``whole`` (:func:`remove_module`)."""
    keep = sorted(keep)
    if not keep and not whole:
        raise ValueError(f"structures: {group.name}: at least one structure must remain")
    for _, p in group.producers:
        _take(p, group.rows(p, keep), 0)
    _take(group.consumer[1], group.columns(keep).reshape(-1), 1)
    group.kept = [group.kept[k] for k in keep]
    group.count = len(keep)
    if group.kind == HEADS and group.owner is not None:
        set_head_counts(group.owner, *group.head_counts())


class Silent(torch.nn.Module):
    """Stands in for an attention module whose every head was removed: it returns, in the
    module's output format (a tuple of ``outputs`` items, or a tensor when ``outputs`` is 0), what
    the module's output projection gives on no input: ``bias`` (zeros without one) across
    ``width`` features, or a ``width``-0 context when the output projection lives outside the
    module (and gives its bias there). A key/value cache it is given grows by one head of zeros
    that nothing attends to, so that its length still counts the tokens seen (a forward given the
    cache reads the positions from it)."""

    def __init__(self, width: int, outputs: int, *, bias: bool = False, head_dim: int = 1,
                 layer_idx: int | None = None, cache_slots=()):  # fmt: skip
        super().__init__()
        self.width, self.outputs = width, outputs
        self.head_dim, self.layer_idx = head_dim, layer_idx
        #: the items of the module's output tuple that were the key/value cache (older model
        #: code returns it from each attention): given back in the same places
        self.cache_slots = tuple(cache_slots)
        self.bias = torch.nn.Parameter(torch.zeros(width)) if bias else None

    def forward(self, hidden_states=None, *args, **kwargs):
        x = hidden_states if hidden_states is not None else args[0]
        out = x.new_zeros(*x.shape[:-1], self.width)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        cache = None
        for value in kwargs.values():
            if hasattr(value, "get_seq_length"):
                cache = value
                if self.layer_idx is not None:
                    # one head of zeros (a cache layer of zero heads reads as empty): never read
                    dummy = x.new_zeros(x.shape[0], 1, x.shape[1], self.head_dim)
                    value.update(dummy, dummy, self.layer_idx)
        if not self.outputs:
            return out
        return (out, *[cache if i in self.cache_slots else None for i in range(1, self.outputs)])

    def spec(self) -> dict:
        """What :func:`load_structured` needs to build it again."""
        return {"width": self.width, "outputs": self.outputs, "bias": self.bias is not None,
                "head_dim": self.head_dim, "layer_idx": self.layer_idx,
                "cache_slots": list(self.cache_slots)}  # fmt: skip


def _inside(module: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in module.modules())


def remove_module(model, group: Coupled, outputs: int, cache_slots=()) -> str | None:
    """Remove every structure of ``group``: its block's whole feed-forward (the producers keep
    no rows and the consumer no columns, so it gives its bias) or whole attention (the attention
    module is replaced by :class:`Silent`; ``outputs`` is the length of the tuple it returned, 0
    for a tensor, ``cache_slots`` the items of it that were the key/value cache). Returns the
    name of the replaced module (attention), else ``None``."""
    if group.kind == NEURONS:
        shrink(group, [], whole=True)
        return None
    owner = group.owner
    names = {id(m): n for n, m in model.named_modules()}
    name = names[id(owner)]
    consumer = group.consumer[1]
    if _inside(owner, consumer):  # the output projection goes with the module
        width, bias = consumer.out_features, consumer.bias
    else:  # it stays, with no input columns: it gives its bias
        width, bias = 0, None
        _take(consumer, torch.arange(0), 1)
    layer_idx = getattr(owner, "layer_idx", None)
    silent = Silent(width, outputs, bias=bias is not None, head_dim=group.narrow or 1,
                    layer_idx=layer_idx if isinstance(layer_idx, int) else None,
                    cache_slots=cache_slots)  # fmt: skip
    if bias is not None:
        with torch.no_grad():
            silent.bias.copy_(bias.detach())
    silent.to(consumer.weight.device)
    parent, attr = (model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
    setattr(parent, attr, silent)
    group.kept, group.count = [], 0
    return name


def follow(optimizer: torch.optim.Optimizer, taken: list) -> int:
    """Make ``optimizer`` train the parameters :func:`shrink` put in place of the ones it had
    (``taken`` from :func:`recording`, in order): each new parameter takes the old one's place in
    its parameter group, and each per-element state tensor of the old one (moments, shaped like
    it) keeps the same elements the parameter kept; scalar state (step counts) is kept. State of
    another shape (a preconditioner over the whole matrix) cannot follow: one clear error, with
    the optimizer left as it was. Returns the number of parameters replaced in the optimizer."""
    for old, _, _, _ in taken:  # checked before anything moves
        for key, value in optimizer.state.get(old, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != old.shape:
                raise ValueError(
                    f"{type(optimizer).__name__} keeps state {key!r} of shape "
                    f"{tuple(value.shape)} for a {tuple(old.shape)} parameter, which cannot "
                    "follow removed structures: use an optimizer with per-element state (adamw, "
                    "sgd, lamb, adahessian) or remove the structures once (end_epoch -1)"
                )
    replaced = 0
    for old, new, dim, index in taken:
        for group in optimizer.param_groups:
            for k, p in enumerate(group["params"]):
                if p is old:
                    group["params"][k] = new
                    replaced += 1
        state = optimizer.state.pop(old, None)
        if state is not None:
            optimizer.state[new] = {
                key: value.index_select(dim, index.to(value.device)).contiguous()
                if torch.is_tensor(value) and value.dim() > 0
                else value
                for key, value in state.items()
            }
    return replaced


def sizes(groups: list[Coupled]) -> dict:
    """``{"heads": [per block], "neurons": [per block]}``: the structures each block keeps."""
    out: dict[str, list] = {}
    for g in groups:
        out.setdefault(g.kind, []).append(g.count)
    return out


def drop_blocks(model, drop: list[int]) -> int:
    """Remove the repeated blocks ``drop`` (indices among the current blocks) from ``model``: the
    residual stream passes the others unchanged. The configuration's layer count (and per-layer
    lists, such as ``layer_types``) and each attention's cache index follow. Returns the blocks
    left."""
    blocks, prefix = _repeated_blocks(model)
    drop = sorted(set(drop))
    if not drop:
        return len(blocks)
    if drop[0] < 0 or drop[-1] >= len(blocks) or len(drop) >= len(blocks):
        raise ValueError(
            f"structures: cannot remove blocks {drop} of {len(blocks)} (at least one must remain)"
        )
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    setattr(parent, prefix.rsplit(".", 1)[-1], torch.nn.ModuleList(kept))
    config = getattr(model, "config", None)
    if config is not None:
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(config, attr, None), int):
                setattr(config, attr, len(kept))
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(blocks):
            config.layer_types = [t for i, t in enumerate(types) if i not in drop]
    for i, block in enumerate(kept):  # key/value caches are indexed by position
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i
    return len(kept)
