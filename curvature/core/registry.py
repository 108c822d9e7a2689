"""A table of named entries that refuses duplicates and answers an unknown name with the nearest.

The pruning presets (:mod:`curvature.pruning.registry`) and the optimizers
(:mod:`curvature.optim.registry`) are both such tables.
"""

from __future__ import annotations

import difflib


def unknown(kind: str, name, known) -> ValueError:
    """The one-line error for a name that is not in ``known``, with the nearest valid one."""
    near = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ValueError(f"unknown {kind} {name!r}{hint}; registered: {', '.join(known)}")


class Registry:
    """Entries by name (``kind`` names them in errors: ``"pruning method"``, ``"optimizer"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, object] = {}

    def add(self, name: str, entry) -> None:
        if not isinstance(name, str) or not name or "+" in name:
            raise ValueError(f"a {self.kind} name must be non-empty and without '+': {name!r}")
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str):
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise unknown(self.kind, name, self.names()) from None

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def describe(self) -> str:
        return "\n".join(f"{n}: {getattr(e, 'description', '')}" for n, e in self._entries.items())
