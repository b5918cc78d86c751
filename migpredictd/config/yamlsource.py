"""YAML with locations: one loader for every YAML file migpredictd reads (the daemon config, its
targets files and the web config).

The text is composed into nodes (``yaml.compose``, libyaml when available), so every mapping key and
sequence item keeps its line, and converted into :class:`Node` values. Problems (bad UTF-8, invalid YAML,
duplicate keys, tags beyond YAML's standard ones, aliases that expand too far or refer to themselves,
nesting deeper than ``MAX_DEPTH``) are recorded in a :class:`Problems` for the file, each with its line
and dotted key, never raised one at a time. Schemas walk the nodes and add their own problems.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from migpredictd.core.errors import ConfigProblem

__all__ = ["MAX_DEPTH", "MAX_NODES", "Node", "Problems", "excerpt", "join", "key_lines", "plain", "read_yaml",
           "type_name"]  # fmt: skip

MAX_NODES: Final = 2_000_000  # after expanding aliases: a "billion laughs" file stops here
MAX_DEPTH: Final = 64


@dataclass(slots=True)
class Node:
    """A YAML value with its line: ``value`` is a scalar, ``dict[str, Node]`` or ``list[Node]``.

    ``line`` is where the value's key (in a mapping) or item (in a sequence) starts: what a reader of
    ``targets[3].interval`` looks for.
    """

    value: Any
    line: int


class Problems:
    """Collects problems for one file; never stops at the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[ConfigProblem] = []

    def add(self, line: int | None, key: str, message: str) -> None:
        self.items.append(ConfigProblem(self.file, line, key, message))

    def sorted(self) -> list[ConfigProblem]:
        """In file order, as a reader fixes them (YAML problems are found before schema ones)."""
        return sorted(self.items, key=lambda x: x.line or 0)


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: about 10x faster on big files
_STANDARD_TAGS: Final = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null", "merge")
)


def _read_text(path: Path, problems: Problems) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.add(None, "", f"cannot read: {e.strerror or e}")
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(data[: e.start].count(b"\n") + 1, "", f"not UTF-8: byte 0x{data[e.start]:02x}")
        return None


def _compose(text: str, problems: Problems) -> Node | None:
    """Parse ``text`` into line-tagged values; YAML errors, duplicate keys and odd tags become problems."""
    try:
        too_deep = _too_deep(text)
        if too_deep is not None:
            problems.add(too_deep, "", f"invalid YAML: nested more than {MAX_DEPTH} levels deep")
            return None
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(x for x in (e.context, e.problem) if x)
        if e.problem == "exceeded maximum nesting depth":  # PyYAML 6.0.4's libyaml checks depth itself
            what = f"nested more than {MAX_DEPTH} levels deep"
        problems.add(mark.line + 1 if mark else None, "", f"invalid YAML: {what}")
        return None
    except yaml.YAMLError as e:
        problems.add(None, "", f"invalid YAML: {e}")
        return None
    except RecursionError:
        problems.add(None, "", "invalid YAML: nested too deeply")
        return None
    if node is None:
        return None
    converter = _Converter(problems)
    y = converter.convert(node, node.start_mark.line + 1, "", 0)
    return None if converter.aborted else y  # a half-converted tree would only add noise


def excerpt(text: str, limit: int = 40) -> str:
    """A scalar's text for a message, cut short: the offending value may be kilobytes long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _too_deep(text: str) -> int | None:
    """The line where nesting first exceeds MAX_DEPTH, from the (iterative) event stream.

    libyaml's composer recurses in C: a file of 100,000 ``[`` crashes the process instead of raising.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return event.start_mark.line + 1 if event.start_mark else 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


class _Converter:
    """YAML nodes -> :class:`Node`, recording duplicate keys, odd tags and alias abuse as problems."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.constructor = yaml.SafeLoader("")
        self.budget = MAX_NODES
        self.open: set[int] = set()  # ids of the collections being converted: an alias to one is a cycle
        self.aborted = False

    def convert(self, node: yaml.Node, line: int, key: str, depth: int) -> Node:
        self.budget -= 1
        if self.aborted or self.budget < 0 or depth > MAX_DEPTH:
            if not self.aborted:
                what = "nested too deeply" if depth > MAX_DEPTH else "too many nodes after expanding aliases"
                self.problems.add(line, key, f"invalid YAML: {what}")
            self.aborted = True
            return Node(None, line)
        if isinstance(node, yaml.ScalarNode):
            try:
                return Node(self.constructor.construct_object(node), line)
            except (yaml.YAMLError, ValueError) as e:
                # YAMLError: e.g. !!python/object, which SafeLoader refuses. ValueError (found by
                # fuzzing): an int of 5,000 digits, a date such as 2001-02-30.
                what = getattr(e, "problem", None) or str(e).split(";")[0]
                self.problems.add(line, key, f"invalid YAML value {excerpt(node.value)}: {what}")
                return Node(None, line)
        if node.tag not in _STANDARD_TAGS:
            self.problems.add(line, key, f"unsupported YAML tag {node.tag!r}")
        if id(node) in self.open:
            self.problems.add(line, key, "invalid YAML: an alias refers to itself")
            return Node(None, line)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                items = [
                    self.convert(n, n.start_mark.line + 1, f"{key}[{i}]", depth + 1)
                    for i, n in enumerate(node.value)
                ]
                return Node(items, line)
            assert isinstance(node, yaml.MappingNode)
            return Node(self._mapping(node, key, depth), line)
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int) -> dict[str, Node]:
        own: dict[str, Node] = {}
        merged: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if self.aborted:
                break
            key_line = key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`; own keys win, first merge wins
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    converted = self.convert(source, key_line, path, depth + 1)
                    if not isinstance(converted.value, dict):
                        self.problems.add(
                            key_line, join(path, "<<"), "invalid YAML: '<<' merges only mappings"
                        )
                        continue
                    for k, v in converted.value.items():
                        merged.setdefault(k, v)
                continue
            key = self.convert(key_node, key_line, path, depth + 1).value
            if not isinstance(key, str):
                message = f"mapping keys must be strings, not {type_name(key)} {key!r}"
                self.problems.add(key_line, path, message)
                continue
            if key in own:
                message = f"duplicate key {key!r} (first at line {own[key].line})"
                self.problems.add(key_line, join(path, key), message)
                continue
            own[key] = self.convert(value_node, key_line, join(path, key), depth + 1)
        return {**merged, **own}


def type_name(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)  # fmt: skip


def join(key: str, child: str) -> str:
    return f"{key}.{child}" if key else child


def read_yaml(path: Path, problems: Problems) -> Node | None:
    """The file's YAML as :class:`Node` values, or None (empty file, or problems recorded)."""
    text = _read_text(path, problems)
    return None if text is None else _compose(text, problems)


def plain(node: Node) -> Any:
    """The plain Python value (dicts, lists, scalars) of a node tree."""
    if isinstance(node.value, dict):
        return {k: plain(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [plain(v) for v in node.value]
    return node.value


def key_lines(node: Node, prefix: str = "") -> dict[str, int]:
    """Each mapping key's dotted path (``tls_server_config.cert_file``) and its 1-based line."""
    out: dict[str, int] = {}
    if isinstance(node.value, dict):
        for k, v in node.value.items():
            path = join(prefix, k)
            out[path] = v.line
            out.update(key_lines(v, path))
    return out
