"""Reading a config file: YAML through a strict safe loader, every problem one ConfigError line.

`yaml.safe_load`'s loader never executes python tags; `StrictYamlLoader` also refuses what silently changes
or floods a config (a key given twice, aliases that expand past a limit or into themselves).
`tltool.config.load_config` validates what this returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tltool.errors import ConfigError
from tltool.files import path_problem

# At most this many YAML nodes once aliases are expanded: a whole config is ~100; an alias bomb is billions.
MAX_YAML_NODES = 10_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYamlLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (no python tags) that also refuses what silently changes or floods a config.

    A key given twice in one mapping (a duplicated `train:` section would replace the first one whole),
    and aliases that expand past MAX_YAML_NODES nodes or into themselves (an alias bomb: a few lines that
    take all memory once a consumer walks them). Both are yaml.YAMLError, reported with their line.
    """

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<: *base` merges on purpose; a complex key is refused by safe_load itself
            key = self.construct_object(key_node, deep=True)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first_line[key] + 1})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past MAX_YAML_NODES nodes, or refer to themselves.

    Each node's expanded size is computed once (shared alias targets are not walked again), so the check
    itself costs the size of the text, not of the expansion.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to the node that contains it (a recursive alias)", node.start_mark
            )
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?)", node.start_mark
            )
        sizes[key] = total
        return total

    size(root)


def yaml_text(text: str) -> Any:
    """Parse YAML text with the strict safe loader (see StrictYamlLoader); yaml.YAMLError when refused."""
    try:
        return yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file: safe YAML (python tags are refused, never executed), with no key given twice and
    no alias bomb (`StrictYamlLoader`); every problem is one ConfigError line with its line number."""
    path = Path(path)
    problem = path_problem(path)
    if problem is not None:
        raise ConfigError(f"config file {path} {problem}", "give the path of a YAML file (see `tltool config init`)")
    try:
        data = yaml_text(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1})" if mark else ""
        fix = (
            "tltool configs are plain YAML; python tags (!!python/...) are refused"
            if "tag" in str(exc.problem)
            else "fix the YAML"
        )
        raise ConfigError(f"{path}{where}: {exc.problem}", fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where} is not valid YAML: {problem}", "fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", "check the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} holds a {type(data).__name__}, not a mapping of sections",
            "start from `tltool config init`",
        )
    return data
