"""Typed configuration schema (Hydra ConfigStore) and the checks Hydra's types cannot express.

The YAML files under `configs/` fill these dataclasses; OmegaConf rejects wrong types and unknown keys,
`validate()` rejects values that are well-typed but meaningless (batch < 1, lr <= 0, ...). Both kinds of
mistake reach the user as one line through `ConfigError` (see cli.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from lbtrain.data import DATASETS, DatasetKeyError, validate_dataset
from lbtrain.data import DatasetNotFoundError as DatasetNotFoundError  # re-exported: the data package raises it
from lbtrain.instruments import base as instruments


class ConfigError(ValueError):
    """A user mistake in the configuration: `key`, the offending `value` and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Sweep launchers (joblib, submitit) return a failed job's exception by pickling it: rebuild from the
        # three fields (the default would call __init__ with the message alone), with a plain, picklable value.
        plain = isinstance(self.value, (str, int, float, bool, type(None)))
        return (type(self), (self.key, self.value if plain else _Shown(repr(self.value)), self.allowed))


class _Shown(str):
    """A value already rendered by repr(): shown as is (ConfigError's message stays the same after pickling)."""

    def __repr__(self) -> str:
        return str(self)


class LRScaling(Enum):
    none = "none"
    sqrt = "sqrt"  # Hoffer et al.: keep the covariance of the update
    linear = "linear"  # Goyal et al.: keep the mean update, usually with warm-up


class Schedule(Enum):
    step = "step"  # the recipe's milestones (or explicit points): piecewise constant
    cosine = "cosine"  # lr (1 + cos(pi t / T)) / 2 per update after warm-up, down to 0
    linear = "linear"  # lr (1 - t / T) per update after warm-up, down to 0
    constant = "constant"  # lr after warm-up, to the end (with ewa.decay: Zhang et al.'s critical-batch runs)


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class BranchRule(Enum):
    """How a branch at batch k B scales the parent's LR (lbtrain.branch)."""

    none = "none"  # the parent's LR
    sqrt = "sqrt"  # sqrt(k) x (Adam-type optimizers: Malladi et al. 2022)
    linear = "linear"  # k x (SGD: Goyal et al. 2017)


@dataclass
class DatasetConfig:
    name: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagenet | synthetic
    root: str | None = None  # None: $LBTRAIN_DATA, else ./data
    download: bool = False
    augment: bool = False  # pad-4 random crop + horizontal flip
    subset: int | None = None  # train on a class-balanced subset of this many samples (fixed across seeds)
    # hold out this many class-balanced training samples (fixed seed) as the validation split (target detection,
    # trial selection); the official validation split becomes the test split, evaluated at the end only
    holdout: int | None = None
    cutout: int = 0  # side of a cutout square per training image (DeVries & Taylor 2017); 0 = off
    # synthetic only
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    train_size: int = 1024
    val_size: int = 256
    # imagenet only
    image_size: int = 224
    workers: int = 8


@dataclass
class ModelConfig:
    name: str = "fc"
    # model-specific keyword arguments (depth, widen, hidden, ...); see lbtrain/models
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LRPoint:
    epoch: float = 0.0
    lr: float = MISSING


@dataclass
class BaseRecipe:
    """The small-batch reference recipe that every regime is derived from."""

    batch: int = 128  # B_S
    lr: float = 0.1
    milestones: list[float] = field(default_factory=list)  # epochs where the LR is multiplied by gamma
    gamma: float = 0.1
    # Alternative to milestones+gamma: explicit piecewise-constant schedule [{epoch, lr}, ...]
    lr_schedule: list[LRPoint] | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    epochs: float = 200
    grad_clip: float | None = 5.0  # max gradient norm; null disables clipping
    schedule: Schedule = Schedule.step  # LR shape: step (milestones / points), cosine or linear decay to 0


@dataclass
class RegimeConfig:
    """Independent fields; the presets in configs/regime/ are compositions of them."""

    name: str = "baseline"
    lr_scaling: LRScaling = LRScaling.none
    ghost_bn: bool = False
    adapt_epochs: bool = False  # Hoffer et al.'s regime adaptation: epochs and milestones x r
    batch_increase: bool = False  # Smith et al.: multiply the batch instead of dropping the LR
    max_batch: int | None = None  # hybrid: past this batch, drop the LR instead (default: dataset size)
    warmup_epochs: float = 0.0  # linear warm-up from base.lr to the scaled LR
    momentum: float | None = None  # Smith et al.'s momentum rule: this momentum, with batch or LR keeping g
    # how reports show the preset (run-only: a label never changes what is trained)
    label: str | None = None  # short column/legend name (Hoffer et al.'s LB, +LR, +GBN, +RA); None: the name
    rank: int = 100  # column order in reports (lower first)


@dataclass
class OptimizerConfig:
    """`optimizer=sgd|adamw|lars|lamb` (configs/optimizer/*.yaml); momentum, weight decay and nesterov come from
    the base recipe (`base.*`), the LR from the regime."""

    name: str = "sgd"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, lamb
    eps: float = 1e-8  # adamw, lamb: denominator; lars: trust-ratio denominator
    trust_coefficient: float = 0.001  # lars: the layer-wise trust coefficient (eta)
    exclude_bn_bias: bool = False  # BatchNorm and bias parameters: no weight decay, no layer-wise trust ratio
    bias_correction: bool = True  # lamb: Adam's bias correction of the moments (the paper's versions differ)
    phi_bounds: list[float] | None = None  # lamb: phi(||w||) = min(max(||w||, lo), hi) in the trust ratio


@dataclass
class CheckpointConfig:
    every_epochs: int = 1  # 0 disables the epoch cadence
    every_steps: int = 0  # 0 disables the update cadence
    # History, besides the rolling checkpoint.pt: checkpoints/update_<N>.pt kept at these points, each a whole
    # checkpoint (disk: one checkpoint's size per point). Values >= 1 are updates, values in (0, 1) fractions of
    # the plan's updates; keep_per_decade=N adds N log-spaced updates per decade (and the last update). Run-only.
    keep: list[float] = field(default_factory=list)
    keep_per_decade: int = 0


@dataclass
class TargetConfig:
    """Stop at a target (steps to target, Shallue et al. 2018): at the first evaluation whose validation error
    (or loss) is at or below it. Evaluations are then spaced at most `resolution` of the update count apart (every
    update up to 1/resolution updates, then every ceil(resolution t)), on the validation split (the holdout split
    with dataset.holdout=N)."""

    error: float | None = None
    loss: float | None = None
    resolution: float = 0.02
    # false: at a target point only whether the target is reached is decided, from the hardest samples first (an
    # exact bound, lbtrain.target; ~10x cheaper); true: every point evaluated in full and logged. Run-only.
    log_all: bool = False


@dataclass
class EWAConfig:
    """Exponential weight averaging (Zhang et al. 2024): evaluation uses w_avg <- d w_avg + (1 - d) w after every
    update, d = min(decay, (1 + t) / (10 + t)) (the usual warm-up of the average); null: off."""

    decay: float | None = None


@dataclass
class SharpnessConfig:
    """Top Hessian eigenvalues (Lanczos), Hessian trace (Hutchinson) and batch sharpness of the training loss, and
    the edge-of-stability thresholds; definitions in lbtrain/instruments/sharpness.py. On when any cadence is set.
    Costs (iters + trace_samples) Hessian-vector products over `samples`, plus 2 x batch_batches passes over a
    training batch."""

    every_epochs: int = 0  # 0: off; N: at every N-th epoch end (and at the end of the run)
    every_steps: int = 0  # 0: off; N: after every N-th update (and at the end of the run)
    per_decade: int = 0  # 0: off; K: at lbtrain.metrics.log_spaced_steps(updates, K) (and at the end of the run)
    samples: int = 1024  # fixed training samples (the same for every run of a sweep)
    bn: str = "train"  # train: BN over fixed batches of bn_batch samples; eval: running statistics (PyHessian)
    bn_batch: int = "${base.batch}"  # type: ignore[assignment]  # B_S: fixed across the batch sizes of a sweep
    top_k: int = 1  # eigenvalues reported (k > 1: Lanczos with full reorthogonalisation, iters vectors in memory)
    iters: int = 20  # Lanczos steps (stops earlier when converged)
    trace_samples: int = 30  # Hutchinson probe vectors (0: no trace; >= 2 for a standard error)
    batch_batches: int = 8  # fixed mini-batches of the run's batch for the batch sharpness (0: not measured)


@dataclass
class BranchConfig:
    """A branch (lbtrain/branch.py): from the parent run's kept checkpoint at update `update`, train `samples` samples
    at batch k x B (B the parent's batch there) with the parent's LR there scaled by `rule`, held constant. The rest
    of the config must be the parent's (max_steps aside). `parent` (a folder) is run-only: the identity records the
    parent run's identity hash instead (branch.parent_identity)."""

    parent: str | None = None  # the parent's run folder; null: not a branch
    # its kept checkpoint checkpoints/update_<N>.pt (checkpoint.keep in the parent); read it as node["update"]:
    # on a DictConfig, node.update is the mapping's method
    update: int | None = None
    k: int = 1  # batch multiplier
    rule: BranchRule = BranchRule.linear  # LR x k (linear), x sqrt(k) (sqrt), x 1 (none)
    samples: int | None = None  # samples to train (a multiple of k B): samples / (k B) updates
    seed: int = 0  # data order after the branch point: 0 continues the parent's stream, N > 0 another one


@dataclass
class GNSOptions:
    """Options of the gradient noise scale (`gns=true`, a plain switch so that it stays a boolean on the command
    line); see lbtrain/instruments/noise_scale.py."""

    bn: str = "train"  # train: BN as trained (batch statistics of its groups); eval: running statistics (a fixed
    # function of each sample: per-example gradients and B_simple defined, comparable across batch sizes)
    beta: float = 0.95  # EMA factor per measurement (one per log step) of |G|^2 and tr(Sigma)


@dataclass
class Config:
    name: str = "digits"  # experiment name, used in run folders and reports
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseRecipe = field(default_factory=BaseRecipe)
    regime: RegimeConfig = field(default_factory=RegimeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    batch: int = "${base.batch}"  # type: ignore[assignment]  # B_L, the global batch
    ghost_batch: int = "${base.batch}"  # type: ignore[assignment]
    micro_batch: int | None = None  # gradient accumulation chunk (per rank)
    duplicates: int = 1  # batch augmentation (Hoffer et al. 2019): each step holds batch/duplicates distinct
    # samples, each served `duplicates` times with independent augmentation
    epochs: float | None = None  # replaces base.epochs, scaling its milestones
    max_steps: int | None = None  # stop after this many updates (smoke runs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # torch intra- and inter-op threads; null: what the environment says
    deterministic: bool = False
    precision: Precision = Precision.fp32
    channels_last: bool = False
    compile: bool = False
    log_every: int = 50  # updates between train/* scalars
    eval_every: int = 1  # epochs between validations; 0: only at the end
    eval_per_decade: int = 0  # also validate at this many log-spaced updates per decade (steps-to-target curves)
    # with dataset.holdout: evaluate the test split once at the end (a search's trials skip it: only its confirmed
    # runs report it; evaluating MNIST's 10,000 test images cost ~9% of an F1 trial at batch 32)
    eval_test: bool = True
    diverge_loss: float = 1e4  # a train loss above this (or non-finite) marks the run diverged
    target: TargetConfig = field(default_factory=TargetConfig)  # stop at a validation error / loss
    ewa: EWAConfig = field(default_factory=EWAConfig)  # evaluate an exponential average of the weights
    # instruments: they observe, never change training (not part of a run's identity)
    gns: bool = False  # gradient noise scale B_simple at log steps (McCandlish et al. 2018)
    gns_options: GNSOptions = field(default_factory=GNSOptions)  # its options (gns_options.bn=eval)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    layer_distance: bool = False  # ||w_t - w_0|| per layer, beside the total
    progress: bool | None = None  # tqdm bar; null: only when stderr is a terminal
    skip_bad_jobs: bool = False  # a sweep runs even if some jobs fail its pre-flight check (they are recorded)
    resume: str | None = None  # checkpoint to resume from; default: the run folder's own
    branch: BranchConfig = field(default_factory=BranchConfig)  # branch from a parent run's kept checkpoint
    effective: dict[str, Any] = field(default_factory=dict)  # derived values, shown by --cfg job


def register_configs() -> None:
    ConfigStore.instance().store(name="lbtrain_schema", node=Config)


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def _positive_int(key: str, value: Any) -> None:
    if value is None or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "must be an integer >= 1")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(key, value, "must be a number >= 0" if allow_zero else "must be a number > 0")


def check_known_keys(cfg: Any) -> None:
    """Reject keys the schema does not have (e.g. `+typo=1`, which Hydra's `+` adds to any config). Free-form
    mappings (`model.kwargs`, `effective`) may hold any key; the model builder checks its own options. A registered
    instrument's node is its own (an instrument added outside this schema checks its keys itself)."""
    schema = OmegaConf.structured(Config)

    def walk(node: Any, ref: Any, prefix: str) -> None:
        if not isinstance(node, DictConfig) or not isinstance(ref, DictConfig):
            return
        for key in node.keys():
            dotted = f"{prefix}{key}"
            if dotted in FREE_FORM or (prefix == "" and key == "hydra"):
                continue
            if key not in ref:
                if prefix == "" and key in instruments.config_keys():
                    continue
                raise ConfigError(dotted, OmegaConf.select(node, str(key), throw_on_resolution_failure=False),
                                  "unknown key (the valid keys are listed by `lbtrain --cfg job`)")
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                walk(child, ref._get_node(key), dotted + ".")

    walk(cfg, schema, "")


FREE_FORM = ("model.kwargs", "effective")
_BOOL_WORDS = ("true", "false")


def check_override_values(overrides: Any) -> None:
    """Values OmegaConf would coerce silently: a boolean key given anything but true/false (`gns=2` would read as
    true). `overrides`: the command line's `key=value` strings (sweeps `key=a,b` check each value)."""
    from omegaconf.nodes import BooleanNode

    schema = OmegaConf.structured(Config)
    for text in overrides or ():
        key, sep, value = str(text).lstrip("+~").partition("=")
        if not sep or key.startswith("hydra") or "(" in value or "[" in value:
            continue
        node: Any = schema
        for part in key.split("."):
            node = node._get_node(part) if isinstance(node, DictConfig) and part in node else None
        if isinstance(node, BooleanNode):
            allowed = _BOOL_WORDS + (("null",) if node._is_optional() else ())
            for v in value.split(","):
                if v.strip().lower() not in allowed:
                    raise ConfigError(key, v.strip(), f"must be {' or '.join(allowed)}")


def validate(cfg: Any, world_size: int = 1) -> None:
    """Reject meaningful-but-wrong values before any work is done (raises ConfigError), without importing torch.
    Checks that need torch (the model, the optimizer, the device), the data or the plan are in `lbtrain.session`,
    which calls this first."""
    check_known_keys(cfg)
    if cfg.dataset.name not in DATASETS:
        raise ConfigError("dataset.name", cfg.dataset.name, f"allowed: {', '.join(DATASETS)}")
    if not _DEVICE.match(str(cfg.device)):
        raise ConfigError("device", cfg.device, "allowed: auto, cpu, cuda, cuda:N, mps")
    for key in ("batch", "ghost_batch", "base.batch", "log_every"):
        _positive_int(key, _get(cfg, key))
    for key in ("base.lr", "base.epochs"):
        _positive(key, _get(cfg, key))
    if cfg.epochs is not None:
        _positive("epochs", cfg.epochs)
    for key in ("regime.warmup_epochs", "eval_every",
                "checkpoint.every_epochs", "checkpoint.every_steps"):
        _positive(key, _get(cfg, key), allow_zero=True)
    # (momentum, Nesterov and weight decay are the optimizer's options: lbtrain.optim.validate_optimizer_options)
    if cfg.base.grad_clip is not None:
        _positive("base.grad_clip", cfg.base.grad_clip)
    if not 0 < cfg.base.gamma <= 1:
        raise ConfigError("base.gamma", cfg.base.gamma, "must be in (0, 1]")
    if any(not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0 for m in cfg.base.milestones):
        raise ConfigError("base.milestones", list(cfg.base.milestones), "must be epochs >= 0")
    if list(cfg.base.milestones) != sorted(cfg.base.milestones):
        raise ConfigError("base.milestones", list(cfg.base.milestones), "must be in increasing order")
    if cfg.base.lr_schedule is not None:
        points = list(cfg.base.lr_schedule)
        epochs = [p.epoch for p in points]
        if not points or epochs[0] != 0 or epochs != sorted(epochs):
            raise ConfigError("base.lr_schedule", "...", "must start at epoch 0 with increasing epochs")
        for p in points:
            _positive("base.lr_schedule.lr", p.lr)
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**63:
        raise ConfigError("seed", cfg.seed, "must be an integer in [0, 2^63)")
    if cfg.max_steps is not None:
        _positive_int("max_steps", cfg.max_steps)
    if cfg.threads is not None:
        _positive_int("threads", cfg.threads)
    _positive("diverge_loss", cfg.diverge_loss)
    try:  # the registry's entries say which dataset keys each reads
        validate_dataset(cfg.dataset, DatasetConfig())
    except DatasetKeyError as e:
        raise ConfigError(e.key, e.value, e.allowed) from None
    _positive_int("duplicates", cfg.duplicates)
    t = cfg.target
    if t.error is not None and not 0 < t.error < 1:
        raise ConfigError("target.error", t.error, "must be a validation error in (0, 1)")
    if t.loss is not None:
        _positive("target.loss", t.loss)
    if t.error is not None and t.loss is not None:
        raise ConfigError("target.loss", t.loss, "give one target: target.error or target.loss")
    if not (isinstance(t.resolution, (int, float)) and 0 < t.resolution <= 0.5):
        raise ConfigError("target.resolution", t.resolution, "must be in (0, 0.5] (a fraction of the update count)")
    if cfg.ewa.decay is not None and not 0 < cfg.ewa.decay < 1:
        raise ConfigError("ewa.decay", cfg.ewa.decay, "must be in (0, 1) (null: off)")
    keep = list(cfg.checkpoint.keep)
    if any(not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0 or (k >= 1 and k != int(k))
           for k in keep):
        raise ConfigError("checkpoint.keep", keep, "must be updates (integers >= 1) or fractions of the plan in (0, 1)")
    if not isinstance(cfg.checkpoint.keep_per_decade, int) or cfg.checkpoint.keep_per_decade < 0:
        raise ConfigError("checkpoint.keep_per_decade", cfg.checkpoint.keep_per_decade, "must be an integer >= 0")
    if not isinstance(cfg.eval_per_decade, int) or cfg.eval_per_decade < 0:
        raise ConfigError("eval_per_decade", cfg.eval_per_decade, "must be an integer >= 0 (0: off)")
    instruments.check(cfg, None)  # each instrument's own options (those that need no data)
    _check_branch(cfg)
    if cfg.regime.momentum is not None and not 0 <= cfg.regime.momentum < 1:
        raise ConfigError("regime.momentum", cfg.regime.momentum, "must be in [0, 1)")

    # (how the batch splits into processes, micro-batches and ghost batches is checked for every epoch's batch in
    # lbtrain.regime.check_batch, the one place of those rules)
    if cfg.micro_batch is not None:
        _positive_int("micro_batch", cfg.micro_batch)
    if cfg.regime.ghost_bn and cfg.ghost_batch < 2:
        raise ConfigError("ghost_batch", cfg.ghost_batch, "must be >= 2 (batch norm over one sample is undefined)")
    if cfg.regime.max_batch is not None:
        _positive_int("regime.max_batch", cfg.regime.max_batch)
        if cfg.regime.max_batch < cfg.batch:
            raise ConfigError("regime.max_batch", cfg.regime.max_batch, f"must be >= batch ({cfg.batch})")


def _check_branch(cfg: Any) -> None:
    """The branch node's own values (lbtrain.branch checks them against the parent run, in lbtrain.session)."""
    b = cfg.get("branch") if isinstance(cfg, DictConfig) else getattr(cfg, "branch", None)
    if b is None:
        return
    b = b if isinstance(b, DictConfig) else OmegaConf.structured(b)  # (item access: DictConfig.update is a method)
    if b.parent is None:
        for key, default in (("update", None), ("samples", None), ("k", 1), ("seed", 0), ("rule", "linear")):
            value = getattr(b[key], "name", b[key])
            if value != default:
                raise ConfigError(f"branch.{key}", value, "needs branch.parent=RUN_FOLDER (a branch "
                                  "starts from a kept checkpoint of that run)")
        return
    if not str(b.parent).strip():
        raise ConfigError("branch.parent", b.parent, "must be a run folder")
    if b["update"] is None:
        raise ConfigError("branch.update", None, "give the update of the parent's kept checkpoint to branch from "
                          "(its checkpoints/update_<N>.pt)")
    for key in ("update", "k"):
        _positive_int(f"branch.{key}", b[key])
    if b.samples is None:
        raise ConfigError("branch.samples", None, "give the samples each branch trains (a multiple of k x the "
                          "parent's batch)")
    _positive_int("branch.samples", b.samples)
    if not isinstance(b.seed, int) or not 0 <= b.seed < 2**63:
        raise ConfigError("branch.seed", b.seed, "must be an integer in [0, 2^63) (0: the parent's data order)")
    for key in ("error", "loss"):
        if getattr(cfg.target, key) is not None:
            raise ConfigError(f"target.{key}", getattr(cfg.target, key), "a branch trains branch.samples samples: "
                              "it cannot stop at a target (branch from a run without one)")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def resolved(cfg: Any) -> dict[str, Any]:
    """The config as plain containers with every interpolation resolved and enums as names; without the `hydra`
    node and the derived `effective` block."""
    node = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k not in ("hydra", "effective")]) \
        if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    out = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


_DEFAULTS: dict[str, Any] | None = None


def schema_defaults() -> dict[str, Any]:
    """The schema's default value of every flat key (interpolated defaults left out), for
    `lbtrain.identity.canonical`: keys added later at a neutral default leave older identities' hashes alone."""
    global _DEFAULTS
    if _DEFAULTS is None:
        from lbtrain.identity import flatten

        tree = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False, enum_to_str=True)
        _DEFAULTS = {k: v for k, v in flatten(tree).items()  # type: ignore[arg-type]
                     if not (isinstance(v, str) and "${" in v)}
    return _DEFAULTS
