"""The config's YAML reader: `yaml.safe_load` that refuses alias bombs, self-reference and deep nesting before
building anything (a hostile or broken config fails in milliseconds with a ConfigError naming the file)."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

MAX_CONFIG_BYTES = 2**20
MAX_VALUES = 100_000  # keys, values and items after expanding aliases (a config has a few hundred)
MAX_DEPTH = 64  # levels of nesting (a config has about 4)


def parse_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load`, refusing documents that expand (through aliases) to more than MAX_VALUES
    nodes, nest deeper than MAX_DEPTH or refer to themselves: the node graph is measured before
    anything is built, so an alias bomb fails in milliseconds instead of exhausting memory."""
    if _rough_depth(text) > MAX_DEPTH:  # PyYAML's scanner is quadratic in nesting: refuse before it
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep", hint=_NESTING_HINT)
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep", hint=_NESTING_HINT) from None
        if node is None:
            return None
        _measure(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


_NESTING_HINT = "a config nests about 4 levels; check the file (or the --set value)"


def _rough_depth(text: str) -> int:
    """An upper estimate of the nesting, in one pass over the characters: open brackets outside
    quotes and comments, plus indentation levels and leading "- " markers of block style."""
    deepest, flow, quote, indents = 0, 0, "", [-1]
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if flow == 0 and not quote and stripped and not stripped.startswith("#"):
            indent = len(line) - len(stripped)
            while indents[-1] >= indent:
                indents.pop()
            indents.append(indent)
            dashes = len(stripped) - len(stripped.lstrip("- "))
            deepest = max(deepest, len(indents) - 1 + dashes // 2)
        previous = " "
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch == "#" and previous in " \t":
                break
            elif ch in "'\"" and previous in " \t[{,:":
                quote = ch
            elif ch in "[{":
                flow += 1
                deepest = max(deepest, flow + len(indents) - 1)
            elif ch in "]}":
                flow = max(flow - 1, 0)
            previous = ch
        quote = quote if quote == '"' else ""  # single-quoted scalars may span lines too, rarely in configs
    return deepest


def _measure(root: yaml.Node, where: str) -> None:
    """Expanded size and height of the node graph, iteratively, each shared node measured once."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            height[id(node)] = 1 + max((height[id(c)] for c in children), default=0)
            if size[id(node)] > MAX_VALUES:
                raise ConfigError(f"{where}: the YAML expands to more than {MAX_VALUES:,} values (aliases "
                                  "repeating aliases?)", hint="write the config out without nested aliases")
            if height[id(node)] > MAX_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep", hint=_NESTING_HINT)
            continue
        if id(node) in size:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise ConfigError(f"{where}: an alias refers to the value that contains it (line "
                                  f"{child.start_mark.line + 1})", hint="a config cannot contain itself")
            if id(child) not in size:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
