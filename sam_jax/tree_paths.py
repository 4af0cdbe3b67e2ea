"""Pytree paths as names, flat {"a/b/c": leaf} views of trees, and one-line key lists.

One naming for every place that reports or looks up a leaf: converted
weights, the train-state checkpointer, the optimizer's per-param rules and the
converters. A dict key, a dataclass field (`TrainState.params`), a sequence
index and orbax's flattened keys all read as plain names, so a state and the
metadata orbax saved for it compare path for path.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Union

import jax

Path = Union[str, tuple]


def path_names(path: Path) -> tuple[str, ...]:
    """A path as names: "a/b/c", a tuple of names, or a jax key path."""
    if isinstance(path, str):
        return tuple(path.split("/"))
    names = []
    for key in path:
        if isinstance(key, str):
            names.append(key)
            continue
        for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def path_str(path: Path) -> str:
    """A path as "a/b/c"."""
    return "/".join(path_names(path))


def flatten(tree: Any) -> dict[str, Any]:
    """Any pytree -> {"a/b/c": leaf}."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dicts."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def list_keys(keys: Iterable[str], limit: int = 8) -> str:
    """Sorted keys, the first `limit` of them and a count: for one-line error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown
