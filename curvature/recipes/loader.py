"""Load and validate a recipe (YAML, or a Markdown file with a YAML front matter).

Syntax (compatible with existing recipe files):

.. code-block:: yaml

    num_epochs: 30
    target: 0.9
    training_modifiers:
      - !EpochRangeModifier {start_epoch: 0, end_epoch: eval(num_epochs)}
    pruning_modifiers:
      - !OBSPruningModifier
        params: ["re:bert.encoder.layer.*.(query|key|value|dense).weight"]
        init_sparsity: 0.7
        final_sparsity: eval(target)
        ...

Every list under a top-level key containing ``modifiers`` holds tagged modifiers; other top-level
keys are variables usable in ``eval(...)`` arithmetic. All validation happens here, before any
model is loaded or any output written.
"""

from __future__ import annotations

import ast
import difflib
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from curvature.recipes.schema import MODIFIERS, UNSUPPORTED, Modifier


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, line and field."""


@dataclass
class Recipe:
    modifiers: list[Modifier]
    variables: dict[str, Any] = field(default_factory=dict)
    source: str = "<recipe>"

    def of(self, *kinds: type) -> list:
        return [m for m in self.modifiers if isinstance(m, kinds)]

    @property
    def num_epochs(self) -> float:
        ends = [m.end_epoch for m in self.modifiers if m.end_epoch != -1]
        starts = [m.start_epoch for m in self.modifiers]
        return max(ends + starts + [0.0])


class _Tagged(dict):
    def __init__(self, tag: str, line: int, value: dict):
        super().__init__(value)
        self.tag, self.line = tag, line


class _Loader(yaml.SafeLoader):
    pass


def _construct(loader: _Loader, suffix: str, node: yaml.Node) -> _Tagged:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        keys = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}
    elif isinstance(node, yaml.ScalarNode) and not node.value:
        value, keys = {}, {}
    else:
        raise RecipeError(f"line {line}: !{suffix} must be followed by a mapping of fields")
    tagged = _Tagged(suffix, line, value)
    tagged.key_lines = keys
    return tagged


_Loader.add_multi_constructor("!", _construct)
# YAML 1.1 reads 2:4 as the base-60 integer 124; masks are written N:M, so keep them strings.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:int"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _safe_eval(expr: str, variables: dict[str, Any]):
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in variables:
                near = difflib.get_close_matches(node.id, list(variables), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise RecipeError(f"eval({expr}): unknown variable {node.id!r}{hint}")
            return variables[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        raise RecipeError(f"eval({expr}): only arithmetic on numbers and variables is allowed")

    try:
        return ev(ast.parse(expr, mode="eval"))
    except SyntaxError as exc:
        raise RecipeError(f"eval({expr}): not a valid expression ({exc.msg})") from None


def _resolve(value, variables):
    if isinstance(value, str) and value.startswith("eval(") and value.endswith(")"):
        return _safe_eval(value[5:-1], variables)
    if isinstance(value, list):
        return [_resolve(v, variables) for v in value]
    if isinstance(value, dict) and not isinstance(value, _Tagged):
        return {k: _resolve(v, variables) for k, v in value.items()}
    return value


_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)


def _front_matter(text: str) -> str:
    """A Markdown recipe keeps its YAML between the first two ``---`` lines.

    HTML comments (a licence header, say) and blank lines may stand before the opening line.
    Everything outside the front matter becomes blank lines so that YAML line numbers are the
    file's.
    """
    blanked = _HTML_COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    lines = blanked.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is not None and lines[first].strip() == "---":
        for i in range(first + 1, len(lines)):
            if lines[i].strip() == "---":
                return "\n".join([""] * (first + 1) + lines[first + 1 : i])
    return text


def _field_error(source: str, tag: str, item: _Tagged, err: dict, cls) -> str:
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else ""
    line = getattr(item, "key_lines", {}).get(name, item.line)
    where = f"{source} line {line}: {tag}"
    if err["type"] == "extra_forbidden":
        valid = [f for f in cls.model_fields if f != "line"]
        near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else f"; valid fields: {', '.join(valid)}"
        return f"{where}: unknown field {name!r}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: required field {name!r} is missing"
    if name:
        return f"{where}: field {name!r}: {msg} (got {err.get('input')!r})"
    return f"{where}: {msg}"


def parse_recipe(text: str, source: str = "<recipe>", overrides: dict | None = None) -> Recipe:
    """Parse and validate recipe text. Raises :class:`RecipeError` naming line and field."""
    try:
        data = yaml.load(_front_matter(text), Loader=_Loader)  # noqa: S506 (SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(
            f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}"
        ) from None
    if isinstance(data, list):
        data = {"modifiers": data}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of variables and modifier lists")
    variables = {
        k: v
        for k, v in data.items()
        if "modifiers" not in str(k) and not isinstance(v, (list, _Tagged))
    }
    variables.update(overrides or {})
    for k, v in list(variables.items()):
        variables[k] = _resolve(v, variables)
    modifiers: list[Modifier] = []
    lists = {k: v for k, v in data.items() if "modifiers" in str(k)}
    if not lists:
        raise RecipeError(f"{source}: no modifier list (a top-level key containing 'modifiers')")
    for key, items in lists.items():
        items = [items] if isinstance(items, _Tagged) else items
        if not isinstance(items, list):
            raise RecipeError(f"{source}: {key} must be a list of tagged modifiers")
        for item in items:
            if not isinstance(item, _Tagged):
                raise RecipeError(
                    f"{source}: {key}: every entry needs a tag such as !OBSPruningModifier, got {item!r}"
                )
            cls = MODIFIERS.get(item.tag)
            if cls is None and item.tag in UNSUPPORTED:
                raise RecipeError(
                    f"{source} line {item.line}: !{item.tag} ({UNSUPPORTED[item.tag]}) is not "
                    "supported by this toolkit; remove it or run it elsewhere"
                )
            if cls is None:
                near = difflib.get_close_matches(item.tag, list(MODIFIERS), n=1)
                hint = f"did you mean !{near[0]}? " if near else ""
                raise RecipeError(
                    f"{source} line {item.line}: unknown modifier !{item.tag}; {hint}known: "
                    + ", ".join(f"!{m}" for m in MODIFIERS)
                )
            fields = {k: _resolve(v, variables) for k, v in item.items()}
            try:
                modifiers.append(cls(**fields, line=item.line))
            except ValidationError as exc:
                # one line: an unknown field first (a misspelt required field is also "missing")
                errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
                message = _field_error(source, item.tag, item, errors[0], cls)
                if len(errors) > 1:
                    message += f" (and {len(errors) - 1} more in this modifier)"
                raise RecipeError(message) from None
            except RecipeError as exc:
                raise RecipeError(f"{source} line {item.line}: {exc}") from None
    return Recipe(modifiers, variables, source)


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    return parse_recipe(path.read_text(encoding="utf-8"), str(path), overrides)
