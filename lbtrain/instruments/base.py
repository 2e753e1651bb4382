"""The instrument plug-in interface and its registry. Torch-free: `lbtrain.identity` reads the registry to know
which config keys are instruments' (run-only), and config mistakes are reported without importing torch.

An instrument observes a run through the trainer's public hooks (`lbtrain.trainer.Hooks`) and the read-only
`Run` view below, and never changes what is trained. Adding one is:
1. a module with a class satisfying `Instrument` (its constructor takes the run and the instrument's config node);
2. one `register(InstrumentSpec(...))` entry in `lbtrain/instruments/__init__.py`;
3. its config node in `lbtrain/config.py` (`Config.<key>`), whose keys are run-only by being the instrument's;
4. its test.
Its results land in results.json under its name; its `state_dict()` (which must carry what `results()` needs)
travels in every checkpoint, so a kill between the final checkpoint and results.json loses nothing.
An instrument that can also measure after the fact (`lbtrain-measure RUN NAME`, on a finished run's checkpoints)
has a `measure()` method (`Measurable` below); `lbtrain-measure` refuses the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # typing only: this module stays importable without torch
    import torch


class Run(Protocol):
    """What an instrument may read of the run it observes (the trainer satisfies it)."""

    hooks: Any  # lbtrain.trainer.Hooks: append callables to its lists
    cfg: Any  # the run's composed config
    net: torch.nn.Module  # the plain module (no DDP / compile wrapper)
    model: torch.nn.Module  # what the trainer calls: net, or its DDP / compile wrapper (e.g. for a DDP comm hook)
    params: list[torch.Tensor]  # the trained parameters, in order
    w0: list[torch.Tensor]  # their initial values
    device: torch.device
    plan: Any  # lbtrain.regime.Plan
    dist: Any  # lbtrain.distributed.Dist: rank, world
    tb: Any  # lbtrain.tb.TBLogger: `scalars(step, values)`
    state: Any  # lbtrain.trainer.RunState: `step`, ...
    train_loader: Any  # lbtrain.data loader: `samples(indices)`, `len()`
    autocast: Any  # the run's autocast context (bf16 or disabled)
    micro_batch: int | None
    bn_batch: int  # samples per BatchNorm statistic
    has_batchnorm: bool
    target_updates: int  # where this run stops


@runtime_checkable
class Instrument(Protocol):
    """A plug-in measurement. `results()` is what results.json records under the instrument's name (None: nothing
    measured yet); `state_dict()` / `load_state_dict()` carry everything `results()` and later measurements need
    (plain containers and tensors only: checkpoints load with `weights_only=True`)."""

    def results(self) -> dict[str, Any] | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Measurable(Protocol):
    """An instrument that measures after the fact too (`lbtrain-measure`, lbtrain/measure.py), with the same code
    and definitions as in the run. `measure()` measures now, at the run's current weights: `run.state.step` is
    their update (the checkpoint's), and its TensorBoard scalars go through `run.tb.scalars(run.state.step, ...)`
    with the tags of the run (lbtrain-measure records them in a stream of its own, beside the run's). It returns
    the measurement as plain values (None: `results()` is recorded instead). It must not depend on what the
    instrument measured before: lbtrain-measure builds a fresh instrument (`InstrumentSpec.build(run, node)`) for
    each checkpoint, restores that checkpoint's model, w_0, optimizer, run state and random state, and trains
    nothing afterwards (the model may be left as the measurement leaves it, though `untouched` is the habit).
    An instrument that draws training batches of its own after the fact (the noise scale, which in a run uses the
    training steps' batches) takes a keyword `batches` (how many: `lbtrain-measure --batches N`) with a default."""

    def measure(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class InstrumentSpec:
    """One registry entry.

    name: results.json key and TensorBoard prefix; key: the config node (`Config.<key>`, run-only); enabled: from
    that node, whether the run asked for it; factory: "module:Class" built as `Class(run, node)` (imported only
    when used); check: optional (node, train_size) -> None raising `ConfigError` before anything is written
    (train_size None: the checks that need no data, run by `lbtrain.config.validate` without torch); options:
    optional second config node holding the instrument's settings when `key` is a plain switch (`gns=true` with
    `gns_options.bn=eval`: a boolean cannot be a node on the command line); run-only too, and it is the `node`
    that `check` and the factory get.
    """

    name: str
    key: str
    enabled: Callable[[Any], bool]
    factory: str
    check: Callable[[Any, int | None], None] | None = None
    options: str | None = None

    def build(self, run: Run, node: Any) -> Instrument:
        module, _, cls = self.factory.partition(":")
        return getattr(importlib.import_module(module), cls)(run, node)


REGISTRY: dict[str, InstrumentSpec] = {}


def register(spec: InstrumentSpec) -> InstrumentSpec:
    """Add (or replace) an instrument; returns the spec."""
    REGISTRY[spec.name] = spec
    return spec


def config_keys() -> tuple[str, ...]:
    """The config nodes that belong to instruments (run-only keys of every run's config)."""
    return tuple(dict.fromkeys(k for spec in REGISTRY.values() for k in (spec.key, spec.options) if k))


def _node(cfg: Any, key: str) -> Any:
    return cfg.get(key) if hasattr(cfg, "get") else getattr(cfg, key, None)


def node_of(cfg: Any, spec: InstrumentSpec) -> Any:
    """The instrument's switch node (`Config.<key>`), which `enabled` reads."""
    return _node(cfg, spec.key)


def options_of(cfg: Any, spec: InstrumentSpec) -> Any:
    """The node `check` and the factory get: the options node where the spec has one, else the switch node."""
    return _node(cfg, spec.options) if spec.options else node_of(cfg, spec)


def requested(cfg: Any) -> list[InstrumentSpec]:
    """The registered instruments a run's config switches on, in registration order."""
    return [spec for spec in REGISTRY.values() if spec.enabled(node_of(cfg, spec))]


def check(cfg: Any, train_size: int | None) -> None:
    """Each instrument's own config check (ConfigError on a mistake); every registered one, so a bad value of an
    instrument that is off is refused too."""
    for spec in REGISTRY.values():
        if spec.check is not None and options_of(cfg, spec) is not None:
            spec.check(options_of(cfg, spec), train_size)


def attach(run: Run) -> dict[str, Instrument]:
    """Build the instruments `run.cfg` asks for (name -> instrument); each attaches itself to `run.hooks`."""
    return {spec.name: spec.build(run, options_of(run.cfg, spec)) for spec in requested(run.cfg)}


__all__ = ["Run", "Instrument", "Measurable", "InstrumentSpec", "REGISTRY", "register", "config_keys", "requested",
           "check", "attach"]
