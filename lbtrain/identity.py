"""A run's identity: the part of its resolved configuration that changes what is trained.

The resolved config splits into two kinds of keys, listed here and nowhere else:
- **identity**: data, model, recipe, regime, optimizer, seed, precision, batch, subset, ... Two runs with equal
  identities train the same thing; checkpoints and results.json store the identity and its short hash; resume
  refuses any difference; run folders are named from it; reports group by it (minus the seed).
- **run-only** (`run_only()`): keys that change how or where a run executes, or what it measures, never what it
  trains: device, determinism, memory layout, compilation, threads, progress, logging / evaluation / checkpoint
  cadence, data location, workers (`RUN_ONLY`), and every instrument's config node (from the instrument registry,
  `lbtrain.instruments`). They may differ between an interruption and its resume.

`epochs=N` equal to the recipe's `base.epochs` is the recipe unchanged (recorded as not set).
`micro_batch` is part of the identity only without ghost batch norm: with GBN every micro-batch holds whole ghost
batches and the update equals the one without accumulation (running statistics included), while with plain
BatchNorm the micro-batch is the group BN normalizes over, which changes what is trained.
A branch (`branch.parent=RUN`, lbtrain.branch) keeps its `branch` node without the parent's folder (run-only: where
the parent lies); `lbtrain.session` adds `branch.parent_identity`, the parent run's identity hash. A run that is not
a branch has no `branch` node.

Everything here is a pure function of plain dicts (`OmegaConf.to_container(cfg, resolve=True)`), so the
report can use it on results.json files without Hydra.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lbtrain.instruments import base as instruments

# Keys (dotted; a key covers everything below it) that never change what is trained, besides the instruments' nodes.
RUN_ONLY: tuple[str, ...] = (
    "device", "deterministic", "channels_last", "compile", "threads", "progress", "skip_bad_jobs",
    "log_every", "eval_every", "eval_per_decade", "target.log_all", "eval_test", "checkpoint", "resume",
    "dataset.root", "dataset.download", "dataset.workers",
    "regime.label", "regime.rank",  # how reports show a regime preset
    "effective",  # derived from the rest (shown by --cfg job), not a setting
    "branch.parent",  # where the parent run lies: lbtrain.session records its identity hash instead
)
SEED_KEY = "seed"
HASH_CHARS = 12


def run_only() -> tuple[str, ...]:
    """Every run-only key: `RUN_ONLY` and each registered instrument's config node."""
    return RUN_ONLY + instruments.config_keys()


def _drop(tree: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p)  # type: ignore[assignment]
        if not isinstance(tree, dict):
            return
    tree.pop(leaf, None)


def identity(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a run from its resolved config as plain containers (`hydra` key, if any, ignored)."""
    ident = json.loads(json.dumps(dict(resolved), default=str))  # a deep, JSON-typed copy
    ident.pop("hydra", None)
    if not (ident.get("branch") or {}).get("parent"):
        ident.pop("branch", None)  # not a branch: the node says nothing (identities from before it are unchanged)
    for key in run_only():
        _drop(ident, key)
    regime = ident.get("regime") or {}
    if regime.get("ghost_bn"):
        ident.pop("micro_batch", None)  # see the module docstring
    base = ident.get("base") or {}
    if ident.get("epochs") is not None and ident["epochs"] == base.get("epochs"):
        ident["epochs"] = None  # `epochs=N` spelling out the recipe's own length trains the same run
    return ident


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def canonical(ident: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The flat identity without the keys that equal `defaults` (the schema's defaults, flat) or are absent there
    as None. A key added to the schema in a later version, at a default that keeps the old behaviour, then leaves
    the canonical form (and the hash) of older runs unchanged."""
    flat = flatten(ident)
    if defaults is None:
        return flat
    return {k: v for k, v in flat.items() if not (k in defaults and _same(defaults[k], v))}


def identity_hash(ident: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> str:
    """A short, stable hash of the identity (of its canonical form)."""
    text = json.dumps(canonical(ident, defaults), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b) if isinstance(a, bool) or isinstance(b, bool) else a == b


def diff(a: Mapping[str, Any], b: Mapping[str, Any],
         defaults: Mapping[str, Any] | None = None, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """[(key, value in a, value in b)] for every flat key whose values differ. A key absent on one side counts as
    its schema default (`defaults`, flat) there, so identities written before a key existed still compare."""
    fa, fb = flatten(a), flatten(b)
    defaults = defaults or {}
    skip = tuple(ignore)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        va = fa.get(key, defaults.get(key, _MISSING))
        vb = fb.get(key, defaults.get(key, _MISSING))
        if not _same(va, vb):
            out.append((key, va, vb))
    return out


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


_MISSING = _Missing()


def describe_diff(changes: list[tuple[str, Any, Any]], a_label: str, b_label: str) -> str:
    """"key: A (a_label) vs B (b_label); ..." on one line."""
    return "; ".join(f"{k}: {fmt(va)} ({a_label}) vs {fmt(vb)} ({b_label})" for k, va, vb in changes)


def fmt(value: Any) -> str:
    """A value as it reads in a run-folder name or a message: true/false/null, floats exact (repr), lists and dicts
    compact. Equal values always give equal text, whatever way they were typed."""
    if value is _MISSING:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


MAX_NAME = 160  # characters; longer names keep their first keys and end in ~<hash>


def run_name(ident: Mapping[str, Any], reference: Mapping[str, Any], options: Mapping[str, Sequence[str]],
             subtree: Callable[[str, str], Mapping[str, Any] | None]) -> str:
    """The run folder's name: the identity's differences from `reference` (the identity of its experiment as
    shipped), "key=value" joined by commas in key order, or "default" when there are none.

    A config group (`options`: group -> its option names; `subtree(group, option)`: that option's identity subtree,
    composed with the same experiment) whose subtree equals one of its options reads as "group=option"; otherwise
    the option named like the subtree's `name` (if any) plus its differing keys, else the differing keys alone.
    Equal identities give equal names however the command was typed (defaults spelled out or not, true/True,
    1e6/1000000.0). The experiment's name is the parent folder, so it is left out.
    """
    tokens: dict[str, str] = {}  # sort key -> token
    for group, names in options.items():
        mine, ref = ident.get(group), reference.get(group)
        if not isinstance(mine, Mapping) or _same_tree(mine, ref):
            continue
        named = str(mine.get("name")) if mine.get("name") is not None else None
        order = ([named] if named in names else []) + sorted(o for o in names if o != named)
        subs = {}
        pick = None
        for option in order:  # the option named like the subtree first: usually the only one composed
            subs[option] = subtree(group, option)
            if subs[option] is not None and _same_tree(subs[option], mine):
                pick = option
                break
        if pick is not None:
            tokens[group] = f"{group}={pick}"
            continue
        base: Mapping[str, Any] = ref if isinstance(ref, Mapping) else {}
        if named in subs and subs[named] is not None and not _same_tree(subs[named], ref):
            tokens[group] = f"{group}={named}"
            base = subs[named]  # type: ignore[assignment]
        for key, _, value in diff(base, mine):
            if value is not _MISSING:
                tokens[f"{group}.{key}"] = f"{group}.{key}={fmt(value)}"
    rest_mine = {k: v for k, v in ident.items() if k not in options and k != "name"}
    rest_ref = {k: v for k, v in reference.items() if k not in options and k != "name"}
    for key, _, value in diff(rest_ref, rest_mine):
        if value is not _MISSING:
            tokens[key] = f"{key}={fmt(value)}"
    name = ",".join(tokens[k].replace("/", "%2F") for k in sorted(tokens)) or "default"
    if len(name) > MAX_NAME:
        head = name[: MAX_NAME - HASH_CHARS - 2].rsplit(",", 1)[0]
        name = f"{head}~{identity_hash(ident)}"
    return name


def _same_tree(a: Any, b: Any) -> bool:
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return _same(a, b)
    return not diff(a, b)
