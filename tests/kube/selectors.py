"""Label and field selectors as the Kubernetes API server parses them (the common subset)."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any


class SelectorError(ValueError):
    """A selector the API server would reject with 400 Bad Request."""


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        # "!=" and "notin" match objects without the label too, as in Kubernetes.
        return not present or value not in self.values


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses: `a in (x,y),b` -> [`a in (x,y)`, `b`]."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


_SET_RE = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$")
_CMP_RE = re.compile(r"^(?P<key>[^\s!=(),]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^\s!=(),]*)$")
_KEY_RE = re.compile(r"^(?P<neg>!?)\s*(?P<key>[^\s!=(),]+)$")


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` into requirements; raise SelectorError if malformed."""
    requirements = []
    for part in _split_top_level(text or ""):
        if match := _SET_RE.match(part):
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append(Requirement(match["key"], match["op"], values))
        elif match := _CMP_RE.match(part):
            op = "=" if match["op"] in ("=", "==") else "!="
            requirements.append(Requirement(match["key"], op, (match["value"],)))
        elif match := _KEY_RE.match(part):
            requirements.append(Requirement(match["key"], "!" if match["neg"] else "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return requirements


def label_selector_from_match(selector: Mapping[str, Any] | None) -> list[Requirement]:
    """Requirements of a structured LabelSelector (matchLabels + matchExpressions)."""
    selector = selector or {}
    result = [Requirement(k, "=", (str(v),)) for k, v in (selector.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or []:
        result.append(Requirement(expr["key"], ops[expr["operator"]], tuple(expr.get("values") or ())))
    return result


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    """Parse `metadata.name=x,status.phase!=y` into (path, op, value) triples."""
    result = []
    for part in _split_top_level(text or ""):
        match = _CMP_RE.match(part)
        if not match:
            raise SelectorError(f"invalid field selector: {part!r}")
        result.append((match["key"], "=" if match["op"] in ("=", "==") else "!=", match["value"]))
    return result


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def make_matcher(label_selector: str | None, field_selector: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over objects for the `labelSelector` and `fieldSelector` query parameters."""
    labels_req = parse_label_selector(label_selector)
    fields_req = parse_field_selector(field_selector)

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if not all(req.matches(labels) for req in labels_req):
            return False
        return all((_field_value(obj, path) == value) == (op == "=") for path, op, value in fields_req)

    return matches
