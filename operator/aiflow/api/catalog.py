"""The models the operator knows: the model directories of a Triton model repository.

Reads each model's `config.pbtxt` with a small parser of the protobuf text format, enough for the
fields the operator checks (`name` and string `parameters`), so the control plane never imports the
data plane or Triton's client to learn what a model accepts and emits.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from aiflow.api.locations import model_repo_path
from aiflow.contract import ACCEPTS, EMITS

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[{}\[\]:,;<>])
      | (?P<word>[^\s{}\[\]:,;<>"'\#]+)
    )""",
    re.VERBOSE,
)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


class PbtxtError(ValueError):
    """A config.pbtxt that the parser cannot read."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise PbtxtError(f"unexpected text at offset {pos}: {text[pos:pos + 20]!r}")
            break
        pos = m.end()
        kind = m.lastgroup
        if kind == "comment":
            continue
        value = m.group(kind)
        if kind == "string":
            value = re.sub(r"\\(.)", lambda e: _ESCAPES.get(e.group(1), e.group(1)), value[1:-1])
        out.append((kind, value))
    return out


def parse_pbtxt(text: str) -> dict[str, list]:
    """Protobuf text format -> {field: [values]}; messages become nested dicts of the same shape,
    scalars stay strings (quoted strings unquoted)."""
    tokens = _tokens(text)
    msg, pos = _message(tokens, 0, end=None)
    return msg


def _message(tokens, pos, end):
    msg: dict[str, list] = {}
    while pos < len(tokens):
        kind, value = tokens[pos]
        if kind == "punct" and value == end:
            return msg, pos + 1
        if kind == "punct" and value in ",;":
            pos += 1
            continue
        if kind != "word":
            raise PbtxtError(f"expected a field name, found {value!r}")
        name, pos = value, pos + 1
        if pos < len(tokens) and tokens[pos] == ("punct", ":"):
            pos += 1
        values, pos = _value(tokens, pos)
        msg.setdefault(name, []).extend(values)
    if end is not None:
        raise PbtxtError(f"missing {end!r}")
    return msg, pos


def _value(tokens, pos):
    if pos >= len(tokens):
        raise PbtxtError("missing a value at the end")
    kind, value = tokens[pos]
    if kind == "punct" and value in "{<":
        sub, pos = _message(tokens, pos + 1, end="}" if value == "{" else ">")
        return [sub], pos
    if kind == "punct" and value == "[":
        items, pos = [], pos + 1
        while True:
            if pos >= len(tokens):
                raise PbtxtError("missing ']'")
            if tokens[pos] == ("punct", "]"):
                return items, pos + 1
            if tokens[pos] == ("punct", ","):
                pos += 1
                continue
            item, pos = _value(tokens, pos)
            items.extend(item)
    if kind in ("string", "word"):
        # adjacent string literals concatenate, as in C
        while kind == "string" and pos + 1 < len(tokens) and tokens[pos + 1][0] == "string":
            value += tokens[pos + 1][1]
            pos += 1
        return [value], pos + 1
    raise PbtxtError(f"unexpected {value!r}")


@dataclass(frozen=True)
class ModelInfo:
    """One Triton model of the repository and what the operator needs to know about it."""

    name: str
    path: Path
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def accepts(self) -> str | None:
        return self.parameters.get(ACCEPTS)

    @property
    def emits(self) -> str | None:
        return self.parameters.get(EMITS)


def model_info(config_path: Path) -> ModelInfo:
    """Reads one model's config.pbtxt (the directory name is the model name when `name` is absent)."""
    config = parse_pbtxt(config_path.read_text(encoding="utf-8"))
    name = (config.get("name") or [config_path.parent.name])[0]
    parameters = {}
    for entry in config.get("parameters", []):
        if not isinstance(entry, dict) or not entry.get("key"):
            continue
        value = (entry.get("value") or [{}])[0]
        if isinstance(value, dict) and "string_value" in value:
            parameters[entry["key"][0]] = value["string_value"][0]
    return ModelInfo(name=name, path=config_path.parent, parameters=parameters)


def load_catalog(root: Path | None = None) -> dict[str, ModelInfo]:
    """Model name -> ModelInfo for every directory of `root` (default: the configured model
    repository) that holds a config.pbtxt. A missing repository yields an empty catalog. Parsed
    configs are cached until a config.pbtxt changes."""
    root = model_repo_path() if root is None else Path(root)
    if not root.is_dir():
        return {}
    configs = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.glob("*/config.pbtxt")))
    return dict(_catalog(configs))


@functools.lru_cache(maxsize=16)
def _catalog(configs: tuple[tuple[str, int, int], ...]) -> dict[str, ModelInfo]:
    catalog = {}
    for path, _, _ in configs:
        info = model_info(Path(path))
        catalog[info.name] = info
    return catalog
