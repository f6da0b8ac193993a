"""One bounded YAML loader for every user file (pipeline configs, targets files).

`safe_load` alone is not enough for files from strangers: an alias bomb ("billion laughs") composes in
microseconds but expands to billions of nodes as soon as anything walks the result. This loader caps
the file size, counts the nodes the document expands to (aliases included) before constructing any
Python object, and accepts only the plain YAML types.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slimship.errors import ConfigError, SlimshipError

MAX_BYTES = 1 << 20  # 1 MiB: far more than any config or targets file needs
MAX_NODES = 100_000  # nodes after alias expansion
_CORE = "tag:yaml.org,2002:"
PLAIN_TAGS = frozenset(f"{_CORE}{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge"))


def load_yaml(path: str | Path, what: str, error: type[SlimshipError] = ConfigError) -> Any:
    """Parse the YAML file `path` (a `what`, e.g. "config file"); `error` names the file on any problem."""
    path = Path(path)
    data = _read_capped(path, what, error)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); give a YAML {what}") from None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters here
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, path, error)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise error(f"{path}: the YAML is nested too deeply to be a {what}") from None
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not a text file ({exc.reason} at byte {exc.start}); give a YAML {what}"
        ) from None
    finally:
        loader.dispose()


def _read_capped(path: Path, what: str, error: type[SlimshipError]) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc}") from None
    if len(data) > MAX_BYTES:
        raise error(f"{path}: larger than {MAX_BYTES // 1024} KiB; a {what} is a few KiB of YAML")
    return data


def _check_nodes(root: yaml.Node, path: Path, error: type[SlimshipError]) -> None:
    """Refuse non-plain tags and documents that expand (through aliases) to more than MAX_NODES nodes."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are still being sized: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if not children_done and id(node) in open_nodes:
            raise error(
                f"{path}: line {node.start_mark.line + 1}: an alias refers to a node that contains it "
                "(a recursive document); write the values out"
            )
        if node.tag not in PLAIN_TAGS:
            raise error(
                f"{path}: line {node.start_mark.line + 1}: tag {node.tag!r} is not allowed; "
                "use plain strings, numbers, booleans, lists and mappings (quote dates)"
            )
        children = _children(node)
        if not children_done:
            _check_unique_keys(node, path, error)
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        open_nodes.discard(id(node))
        sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
        if sizes[id(node)] > MAX_NODES:
            raise error(
                f"{path}: the document expands to more than {MAX_NODES:,} nodes (an alias bomb?); "
                "write the values out instead of nesting aliases"
            )


def _check_unique_keys(node: yaml.Node, path: Path, error: type[SlimshipError]) -> None:
    """A mapping may not name a key twice (YAML would keep the last one silently)."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            if key.value in seen:
                raise error(f"{path}: line {key.start_mark.line + 1}: key {key.value!r} appears twice")
            seen.add(key.value)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
