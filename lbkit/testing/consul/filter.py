"""The subset of Consul's filter expressions (go-bexpr) that :class:`ConsulServer` evaluates.

Supported: ``==``, ``!=``, ``is empty``, ``is not empty``, ``in``, ``not in``, ``contains``,
``not contains``, ``matches``, ``not matches``, joined with ``and``, ``or``, ``not`` and
parentheses; selectors like ``Service.Tags``, ``Service.Meta.version`` or ``Service.Meta["k-1"]``;
values quoted with double quotes or backticks, numbers, or bare words. Selectors are checked
against the endpoint's fields as Consul checks them: an unknown one is an error.

A selector that crosses a list (``Checks.Status``) matches when any element matches;
``!=`` and the ``not`` forms are the negation of that.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

__all__ = ["SCHEMAS", "FilterError", "compile_filter"]


class FilterError(ValueError):
    """The expression cannot be parsed or evaluated; the message says why."""


MAP = "map"
LIST = "list"
Schema = Any  # dict[str, Schema] (struct) | (MAP, Schema|None) | (LIST, Schema|None) | type (leaf)

_TAGGED_ADDR: Schema = (MAP, {"Address": str, "Port": int})
_LOCALITY: Schema = {"Region": str, "Zone": str}
NODE: Schema = {
    "ID": str,
    "Node": str,
    "Address": str,
    "Datacenter": str,
    "TaggedAddresses": (MAP, None),
    "Meta": (MAP, None),
    "Locality": _LOCALITY,
    "Partition": str,
}
CHECK: Schema = {
    "Node": str,
    "CheckID": str,
    "Name": str,
    "Status": str,
    "Notes": str,
    "Output": str,
    "ServiceID": str,
    "ServiceName": str,
    "ServiceTags": (LIST, None),
    "Type": str,
    "Namespace": str,
    "Partition": str,
}
_WEIGHTS: Schema = {"Passing": int, "Warning": int}
AGENT_SERVICE: Schema = {
    "Kind": str,
    "ID": str,
    "Service": str,
    "Tags": (LIST, None),
    "Address": str,
    "Meta": (MAP, None),
    "Port": int,
    "Weights": _WEIGHTS,
    "EnableTagOverride": bool,
    "TaggedAddresses": _TAGGED_ADDR,
    "Connect": {"Native": bool},
    "Locality": _LOCALITY,
    "Namespace": str,
    "Partition": str,
    "PeerName": str,
}
SERVICE_NODE: Schema = {
    "ID": str,
    "Node": str,
    "Address": str,
    "Datacenter": str,
    "TaggedAddresses": (MAP, None),
    "NodeMeta": (MAP, None),
    "ServiceKind": str,
    "ServiceID": str,
    "ServiceName": str,
    "ServiceTags": (LIST, None),
    "ServiceAddress": str,
    "ServiceTaggedAddresses": _TAGGED_ADDR,
    "ServiceMeta": (MAP, None),
    "ServicePort": int,
    "ServiceWeights": _WEIGHTS,
    "ServiceEnableTagOverride": bool,
    "ServiceConnect": {"Native": bool},
    "ServiceLocality": _LOCALITY,
    "Namespace": str,
    "Partition": str,
}
HEALTH_ENTRY: Schema = {"Node": NODE, "Service": AGENT_SERVICE, "Checks": (LIST, CHECK)}
SCHEMAS: dict[str, Schema] = {
    "agent_service": AGENT_SERVICE,
    "check": CHECK,
    "health_entry": HEALTH_ENTRY,
    "service_node": SERVICE_NODE,
    "node": NODE,
}

_KEYWORDS = {"and", "or", "not", "in", "is", "empty", "contains", "matches"}
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<lp>\()|(?P<rp>\))|(?P<op>==|!=)|
    (?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|
    (?P<num>-?\d+(?:\.\d+)?(?![\w.\[]))|
    (?P<word>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\["(?:[^"\\]|\\.)*"\])*)
    )""",
    re.X,
)
_SEGMENT = re.compile(r'\.?([A-Za-z_]\w*)|\[("(?:[^"\\]|\\.)*")\]')

Predicate = Callable[[Any], bool]


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            raise FilterError(f"unexpected input at offset {pos}: {text[pos : pos + 20]!r}")
        kind, value = m.lastgroup, m.group(m.lastgroup)
        if kind == "word" and value in _KEYWORDS:
            kind = value
        tokens.append((kind, value))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str, schema: Schema) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.schema = schema

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.tokens[i][0] if i < len(self.tokens) else "end"

    def take(self, *kinds: str) -> str:
        kind, value = self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")
        if kind not in kinds:
            found = repr(value) if value else "end of expression"
            raise FilterError(f"expected {' or '.join(kinds)}, found {found}")
        self.pos += 1
        return value

    def parse(self) -> Predicate:
        if not self.tokens:
            raise FilterError("empty expression")
        pred = self.or_expr()
        if self.peek() != "end":
            self.take("end")
        return pred

    def or_expr(self) -> Predicate:
        parts = [self.and_expr()]
        while self.peek() == "or":
            self.take("or")
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda obj: any(p(obj) for p in parts))

    def and_expr(self) -> Predicate:
        parts = [self.not_expr()]
        while self.peek() == "and":
            self.take("and")
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else (lambda obj: all(p(obj) for p in parts))

    def not_expr(self) -> Predicate:
        if self.peek() == "not":
            self.take("not")
            inner = self.not_expr()
            return lambda obj: not inner(obj)
        if self.peek() == "lp":
            self.take("lp")
            inner = self.or_expr()
            self.take("rp")
            return inner
        return self.match()

    def value(self) -> str:
        kind = self.peek()
        raw = self.take("str", "raw", "num", "word")
        if kind == "str":
            return str(json.loads(raw))
        if kind == "raw":
            return raw[1:-1]
        return raw

    def match(self) -> Predicate:
        # "value" [not] in Selector
        if self.peek() in ("str", "raw", "num") or (
            self.peek() == "word"
            and self.peek(1) in ("in", "not")
            and self.peek(1 if self.peek(1) == "in" else 2) == "in"
        ):
            value = self.value()
            negate = self.peek() == "not"
            if negate:
                self.take("not")
            self.take("in")
            sel, leaf = self.selector()
            _require(leaf, (LIST, MAP, str), "in")
            return _negated(negate, lambda obj: any(_contains(c, value) for c in _values(obj, sel)))
        sel, leaf = self.selector()
        kind = self.peek()
        if kind == "op":
            op = self.take("op")
            _require(leaf, (str, int, bool), op)
            value = self.value()
            return _negated(op == "!=", lambda obj: any(_equal(c, value) for c in _values(obj, sel)))
        if kind == "is":
            self.take("is")
            negate = self.peek() == "not"
            if negate:
                self.take("not")
            self.take("empty")
            _require(leaf, (LIST, MAP), "is empty")
            return _negated(negate, lambda obj: all(not c for c in _values(obj, sel)))
        negate = kind == "not"
        if negate:
            self.take("not")
        op = self.take("contains", "matches")
        value = self.value()
        if op == "contains":
            _require(leaf, (LIST, MAP, str), op)
            return _negated(negate, lambda obj: any(_contains(c, value) for c in _values(obj, sel)))
        _require(leaf, (str,), op)
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise FilterError(f"invalid regular expression {value!r}: {exc}") from exc
        return _negated(
            negate, lambda obj: any(isinstance(c, str) and pattern.search(c) for c in _values(obj, sel))
        )

    def selector(self) -> tuple[list[str], Any]:
        text = self.take("word")
        parts = [m.group(1) or json.loads(m.group(2)) for m in _SEGMENT.finditer(text)]
        node: Schema = self.schema
        for i, part in enumerate(parts):
            if isinstance(node, tuple) and node[0] == LIST and isinstance(node[1], dict):
                node = node[1]
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, tuple) and node[0] == MAP and i > 0:
                node = node[1] if node[1] is not None else str
            else:
                raise FilterError(f'Selector "{text}" is not valid')
        leaf = node[0] if isinstance(node, tuple) else node
        return parts, (dict if isinstance(leaf, dict) else leaf)


def _require(leaf: Any, allowed: tuple[Any, ...], op: str) -> None:
    if leaf not in allowed:
        kind = {LIST: "a list", MAP: "a map", dict: "a structure"}.get(
            leaf, getattr(leaf, "__name__", str(leaf))
        )
        raise FilterError(f"operator {op!r} is not supported on a selector of {kind}")


def _negated(negate: bool, pred: Predicate) -> Predicate:
    return (lambda obj: not pred(obj)) if negate else pred


def _values(obj: Any, parts: list[str]) -> list[Any]:
    current = [obj]
    for part in parts:
        nxt: list[Any] = []
        for item in current:
            for element in item if isinstance(item, list) else [item]:
                if isinstance(element, dict) and part in element:
                    nxt.append(element[part])
        current = nxt
    return current


def _equal(candidate: Any, value: str) -> bool:
    if isinstance(candidate, bool):
        if value.lower() not in ("true", "false"):
            raise FilterError(f"cannot compare a bool with {value!r}")
        return candidate == (value.lower() == "true")
    if isinstance(candidate, (int, float)):
        try:
            return float(candidate) == float(value)
        except ValueError:
            raise FilterError(f"cannot compare a number with {value!r}") from None
    return isinstance(candidate, str) and candidate == value


def _contains(candidate: Any, value: str) -> bool:
    if isinstance(candidate, (list, dict)):
        return value in candidate
    return isinstance(candidate, str) and value in candidate


@functools.lru_cache(maxsize=256)
def compile_filter(expression: str, schema_name: str) -> Predicate:
    """A predicate over one result element; FilterError names what is wrong or unsupported."""
    try:
        return _Parser(expression, SCHEMAS[schema_name]).parse()
    except FilterError as exc:
        raise FilterError(f"Failed to create boolean expression evaluator: {exc}") from None
