"""Frozen dataclass configs: loaded from YAML/JSON, overridden from the CLI, validated before anything compiles.

    cfg = load_config("jaxnn/configs/digits_mlp.yaml", overrides=["optimizer.lr=0.05"])

Every invalid value raises :class:`ConfigError` naming the field (``optimizer.lr``) and the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
from typing import Any

import yaml

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """An invalid config: ``field`` is the dotted name, the message says why."""

    def __init__(self, field: str, reason: str):
        self.field = field
        super().__init__(f"config field {field!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    standardize: bool = True
    download: bool = True
    limit: int | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    kwargs: dict = dataclasses.field(default_factory=lambda: {"width": 256, "depth": 2, "activation": "relu"})


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.9                # rmsprop's cache decay
    weight_decay: float = 0.0
    clip_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None       # None: the run's total number of steps
    decay_rate: float = 0.1               # step and exponential schedules
    boundaries: tuple = ()                # step schedule: fractions of total steps (<1) or step numbers
    restart_period: int | None = None     # warm restarts: steps per cycle
    end_lr_fraction: float = 0.0          # cosine schedules decay to lr * end_lr_fraction
    kfac_damping: float = 0.1             # kfac: added to the Kronecker eigenvalues (fixed: no adaptive damping yet)
    kfac_decay: float = 0.95              # kfac: running average of the factors
    kfac_inverse_every: int = 10          # kfac: steps between eigendecompositions of the factors


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    loss: str = "softmax_cross_entropy"
    batch_size: int = 64
    epochs: float = 20
    steps: int | None = None              # overrides epochs when set
    grad_accum_steps: int = 1             # micro-batches accumulated inside one compiled step
    steps_per_call: int = 1               # optimizer steps per dispatch (lax.scan; bit-identical to 1)
    seed: int = 0                         # initialisation (and, unless data_seed is set, the batch order)
    data_seed: int | None = None          # batch order; None: train.seed
    log_every: int = 10
    eval_every: int | None = None         # None: once per epoch
    early_stop_patience: int | None = None
    early_stop_metric: str = "val_loss"
    nan_guard: bool = True
    nan_hunt: bool = True                 # when the NaN guard stops a run: replay to the step, name the layer/op
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_steps: int | None = None        # None: at every evaluation
    keep_last: int = 3
    keep_best: bool = True
    best_metric: str = "val_loss"
    best_mode: str = "min"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    devices: int = -1                     # -1: every device (of every process); on a CPU `--devices N` simulates N
    mode: str = "jit"                     # jit (XLA inserts the all-reduce) | shard_map | pmap (explicit pmean)
    params: str = "replicated"            # replicated | sharded (FSDP-style along the data axis; mode jit)


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
    chunk: int | None = None              # members trained at once (memory); None: all
    shuffle_per_member: bool = False      # each member its own batch order (its seed); default one shared stream
    steps_per_call: int = 50              # steps per compiled call (lax.scan)


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    curvature: bool = True                # `jaxnn run` writes curvature.json + spectrum.png
    curvature_k: int = 5
    curvature_batches: int = 4
    density: bool = True
    landscape: bool = True                # `jaxnn run` writes a 1-D and a 2-D slice
    landscape_grid: int = 21
    landscape_span: float = 1.0
    landscape_batches: int = 2
    hessian_every: int | None = None      # HessianCallback period during training (None: off)
    hessian_examples: int = 1024          # HessianCallback: the fixed training examples it measures on
    diagnostics_every: int | None = None  # per-layer statistics into metrics.jsonl every k steps (None: off)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "digits_mlp"
    output_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    analysis: AnalysisConfig = dataclasses.field(default_factory=AnalysisConfig)
    population: PopulationConfig = dataclasses.field(default_factory=PopulationConfig)
    # `jaxnn sweep`: swept field -> values (a list, or {log_uniform|uniform: [low, high], n: count}), and the
    # optional keys method (grid | random), samples and draw_seed (random). See jaxnn.train.sweep.
    sweep: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with dotted overrides, e.g. ``cfg.replace(**{"optimizer.lr": 0.1})``, validated."""
        return validate(_apply_overrides(self.to_dict(), overrides))


# ----------------------------------------------------------------------------------------------- building

def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(where, f"unknown field; valid fields of {prefix or 'the config'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        field = fields[name]
        dotted = f"{prefix}.{name}" if prefix else name
        sub = _SECTIONS.get(name) if not prefix else None
        if sub is not None:
            kwargs[name] = _build(sub, value or {}, dotted)
        else:
            kwargs[name] = _coerce(field, value, dotted)
    return cls(**kwargs)


def _coerce(field: dataclasses.Field, value: Any, dotted: str):
    kind = str(field.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(dotted, "must not be null")
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(dotted, f"expected true/false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(dotted, f"expected an integer, got {value!r}")
        return int(value)
    if kind.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(dotted, f"expected a number, got {value!r}")
        return float(value)
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(dotted, f"expected a string, got {value!r}")
        return value
    if kind == "dict":
        if not isinstance(value, dict):
            raise ConfigError(dotted, f"expected a mapping, got {value!r}")
        return dict(value)
    if kind == "tuple":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(dotted, f"expected a list, got {value!r}")
        return tuple(value)
    return value


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "optimizer": OptimizerConfig, "train": TrainConfig,
             "checkpoint": CheckpointConfig, "parallel": ParallelConfig, "analysis": AnalysisConfig,
             "population": PopulationConfig}
_FREE_MAPPINGS = ("kwargs", "sweep")  # mappings whose keys are not config fields


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars: ``0.05``, ``true``, ``null``, ``[1, 2]``, ``{width: 64}``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("--set", f"cannot parse value {text!r}: {exc}") from None


def _apply_overrides(base: dict, overrides: dict) -> dict:
    result = json.loads(json.dumps(base, default=list))
    for dotted, value in overrides.items():
        dotted = _canonical(dotted, overrides)
        if dotted.startswith("sweep."):  # sweep keys are dotted field names themselves: sweep.optimizer.lr=[...]
            result["sweep"][dotted[len("sweep."):]] = value
            continue
        parts = dotted.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(".".join(parts[: i + 1]), f"no such config section (sections: {', '.join(_SECTIONS)})")
            node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(dotted, "cannot set a field inside a non-mapping value")
        if parts[-1] not in node and not (len(parts) >= 3 and parts[-2] == "kwargs"):
            section = ".".join(parts[:-1]) or "the config"
            raise ConfigError(dotted, f"unknown field; valid fields of {section}: {', '.join(node)}")
        node[parts[-1]] = value
    return result


def parse_overrides(items: list[str] | None) -> dict:
    """``["optimizer.lr=0.05", "model.kwargs.width=64"]`` -> ``{"optimizer.lr": 0.05, ...}``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE (e.g. optimizer.lr=0.05), got {item!r}")
        key, text = item.split("=", 1)
        out[key.strip()] = _parse_value(text)
    return out


def from_dict(values: dict) -> Config:
    return validate(values)


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML/JSON config (a path, or the name of a shipped config such as ``digits_mlp``), apply
    ``KEY=VALUE`` overrides and validate."""
    values: dict = {}
    if path is not None:
        file = resolve_config_path(path)
        try:
            values = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("<file>", f"{file} is not valid YAML/JSON: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError("<file>", f"{file} must hold a mapping at the top level")
    base = Config().to_dict()
    merged = _merge(base, values, "")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    merged = _apply_overrides(merged, overrides or {})
    return validate(merged)


def resolve_config_path(path: str | pathlib.Path) -> pathlib.Path:
    file = pathlib.Path(path)
    if file.exists():
        return file
    shipped = CONFIG_DIR / f"{path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(shipped_configs())
    raise FileNotFoundError(f"config {str(path)!r} not found: not a file, and not a shipped config ({names})")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


# Other names a field is known by: optax and train_population call the rate learning_rate.
FIELD_ALIASES = {"optimizer.learning_rate": "optimizer.lr"}


def _canonical(dotted: str, given: Any = None) -> str:
    """The field an alias names; ConfigError when ``given`` (the keys of the same mapping, dotted) holds both."""
    canonical = FIELD_ALIASES.get(dotted, dotted)
    if canonical != dotted and given is not None and canonical in given:
        raise ConfigError(dotted, f"{dotted} and {canonical} name the same field; give one")
    return canonical


def _merge(base: dict, values: dict, prefix: str) -> dict:
    out = dict(base)
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        canonical = _canonical(dotted, {f"{prefix}.{k}" if prefix else k for k in values})
        if canonical != dotted:
            dotted, key = canonical, canonical.rsplit(".", 1)[-1]
        if key not in base:
            section = prefix or "the config"
            raise ConfigError(dotted, f"unknown field; valid fields of {section}: {', '.join(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in _FREE_MAPPINGS:
            out[key] = _merge(base[key], value, dotted)
        else:
            out[key] = value
    return out


def save_config(cfg: Config, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list)), sort_keys=False))


# ---------------------------------------------------------------------------------------------- validation

PARALLEL_MODES = ("jit", "shard_map", "pmap")
PARAM_LAYOUTS = ("replicated", "sharded")


def check_choice(field: str, value: Any, valid: Any, what: str) -> None:
    """ConfigError(field, "unknown {what} ...; valid {what}s: ...") unless ``value`` is one of ``valid``. The registries
    (datasets, models, optimizers, schedules, losses) check a config's names with it: see
    ``jaxnn.train.check_config``."""
    if value not in valid:
        plural = what + ("es" if what.endswith("s") else "s")
        raise ConfigError(field, f"unknown {what} {value!r}; valid {plural}: {', '.join(valid)}")


def check_parallel(mode: str, params: str) -> None:
    """The parallel-mode rules, written once (``validate`` and ``jaxnn.parallel`` apply them): a known mode and
    parameter layout, and sharded parameters only under ``jit`` (XLA inserts the gathers)."""
    check_choice("parallel.mode", mode, PARALLEL_MODES, "mode")
    check_choice("parallel.params", params, PARAM_LAYOUTS, "parameter layout")
    if params == "sharded" and mode != "jit":
        raise ConfigError("parallel.params", f"sharded parameters need parallel.mode jit (XLA inserts the gathers), "
                                             f"got mode {mode!r}")


def check(ok: bool, field: str, reason: str) -> None:
    """ConfigError(field, reason) unless ``ok``."""
    if not ok:
        raise ConfigError(field, reason)


def validate(values: dict | Config) -> Config:
    """Build and check a Config; raises ConfigError(field, reason) on the first problem.

    Checks the types, ranges and the rules between fields, and expands the sweep; the names that registries own
    (dataset, model, optimizer, schedule, loss) are checked against the registries when the config is used
    (``jaxnn.train.check_config``, which ``jaxnn train``/``run``/``sweep``/``doctor`` and ``train_run`` call first):
    this module imports no other part of jaxnn."""
    cfg = values if isinstance(values, Config) else _build(Config, values, "")

    check(bool(cfg.name) and "/" not in cfg.name, "name", f"must be a non-empty name without '/', got {cfg.name!r}")
    check(0 <= cfg.data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {cfg.data.val_fraction}")
    check(0 <= cfg.data.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {cfg.data.test_fraction}")
    check(cfg.data.val_fraction + cfg.data.test_fraction < 1, "data.val_fraction",
          "val_fraction + test_fraction must leave some training data")
    check(cfg.data.limit is None or cfg.data.limit > 0, "data.limit", f"must be positive, got {cfg.data.limit}")
    o = cfg.optimizer
    check(o.lr > 0 and o.lr == o.lr, "optimizer.lr", f"must be a positive number, got {o.lr}")
    check(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    check(0 <= o.b1 < 1, "optimizer.b1", f"must be in [0, 1), got {o.b1}")
    check(0 <= o.b2 < 1, "optimizer.b2", f"must be in [0, 1), got {o.b2}")
    check(0 < o.rms_decay < 1, "optimizer.rms_decay", f"must be in (0, 1), got {o.rms_decay}")
    check(o.eps > 0, "optimizer.eps", f"must be positive, got {o.eps}")
    check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    check(o.clip_norm is None or o.clip_norm > 0, "optimizer.clip_norm", f"must be positive or null, got {o.clip_norm}")
    check(o.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    check(o.decay_steps is None or o.decay_steps > 0, "optimizer.decay_steps", f"must be positive, got {o.decay_steps}")
    check(0 < o.decay_rate <= 1, "optimizer.decay_rate", f"must be in (0, 1], got {o.decay_rate}")
    check(o.restart_period is None or o.restart_period > 0, "optimizer.restart_period", "must be positive")
    check(o.schedule != "warm_restarts" or o.restart_period is not None, "optimizer.restart_period",
          "the warm_restarts schedule needs restart_period (steps per cycle)")
    check(o.schedule != "step" or len(o.boundaries) > 0, "optimizer.boundaries",
          "the step schedule needs boundaries (fractions of training or step numbers)")
    check(all(isinstance(b, (int, float)) and b > 0 for b in o.boundaries), "optimizer.boundaries",
          f"must be positive numbers, got {list(o.boundaries)}")
    t = cfg.train
    check(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    check(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
    check(t.steps is None or t.steps > 0, "train.steps", f"must be positive or null, got {t.steps}")
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    check(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
          f"must divide train.batch_size ({t.batch_size}), got {t.grad_accum_steps}")
    check(t.steps_per_call >= 1, "train.steps_per_call", f"must be >= 1, got {t.steps_per_call}")
    check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    check(t.eval_every is None or t.eval_every >= 1, "train.eval_every", f"must be >= 1 or null, got {t.eval_every}")
    check(t.early_stop_patience is None or t.early_stop_patience >= 1, "train.early_stop_patience", "must be >= 1")
    check(t.data_seed is None or t.data_seed >= 0, "train.data_seed", f"must be >= 0 or null, got {t.data_seed}")
    check(cfg.population.chunk is None or cfg.population.chunk >= 1, "population.chunk",
          f"must be >= 1 or null, got {cfg.population.chunk}")
    check(cfg.population.steps_per_call >= 1, "population.steps_per_call",
          f"must be >= 1, got {cfg.population.steps_per_call}")
    c = cfg.checkpoint
    check(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", f"must be >= 1, got {c.every_steps}")
    check(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}")
    check(c.best_mode in ("min", "max"), "checkpoint.best_mode", f"must be 'min' or 'max', got {c.best_mode!r}")
    check(c.best_metric in ("val_loss", "val_accuracy"), "checkpoint.best_metric",
          f"must be val_loss or val_accuracy, got {c.best_metric!r}")
    p = cfg.parallel
    check(p.devices == -1 or p.devices >= 1, "parallel.devices", f"must be -1 (all) or >= 1, got {p.devices}")
    check_parallel(p.mode, p.params)
    check(p.mode != "pmap" or t.steps_per_call == 1, "train.steps_per_call",
          f"parallel.mode pmap runs one step per call (pmap takes host batches), got {t.steps_per_call}")
    a = cfg.analysis
    check(a.curvature_k >= 1, "analysis.curvature_k", f"must be >= 1, got {a.curvature_k}")
    check(a.curvature_batches >= 1, "analysis.curvature_batches", "must be >= 1")
    check(a.landscape_grid >= 3, "analysis.landscape_grid", f"must be >= 3, got {a.landscape_grid}")
    check(a.landscape_span > 0, "analysis.landscape_span", f"must be positive, got {a.landscape_span}")
    check(a.landscape_batches >= 1, "analysis.landscape_batches", "must be >= 1")
    check(a.hessian_every is None or a.hessian_every >= 1, "analysis.hessian_every", "must be >= 1 or null")
    check(a.hessian_examples >= 1, "analysis.hessian_examples", "must be >= 1")
    check(a.diagnostics_every is None or a.diagnostics_every >= 1, "analysis.diagnostics_every",
          "must be >= 1 or null")
    if cfg.sweep:
        sweep_members(cfg)  # raises ConfigError naming the swept field
    return cfg


# ---------------------------------------------------------------------------------------------- sweeps
# The sweep grammar (a config's ``sweep`` section, see jaxnn.train.sweep for running one): which fields a
# population can vary, how a section expands into members, each member's config.

# swept config field -> the population column that carries it
SWEEPABLE = {
    "train.seed": "seed",
    "optimizer.lr": "lr",
    "optimizer.momentum": "momentum",
    "optimizer.b1": "b1",
    "optimizer.b2": "b2",
    "optimizer.eps": "eps",
    "optimizer.rms_decay": "rms_decay",
    "optimizer.weight_decay": "weight_decay",
    "model.kwargs.dropout": "dropout",
}
ALIASES = {"seed": "train.seed", "lr": "optimizer.lr", "learning_rate": "optimizer.lr",
           "optimizer.learning_rate": "optimizer.lr", "dropout": "model.kwargs.dropout"}
# The optimizer fields each optimizer reads (a population holds them in its state: optax.inject_hyperparams).
OPTIMIZER_FIELDS = {
    "sgd": ("lr", "weight_decay"),
    "momentum": ("lr", "momentum", "weight_decay"),
    "nesterov": ("lr", "momentum", "weight_decay"),
    "adagrad": ("lr", "eps", "weight_decay"),
    "rmsprop": ("lr", "rms_decay", "eps", "weight_decay"),
    "adam": ("lr", "b1", "b2", "eps", "weight_decay"),
    "adamw": ("lr", "b1", "b2", "eps", "weight_decay"),
}


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """``fields``: the swept config fields (dotted); ``values[field]``: one value per member."""

    fields: tuple[str, ...]
    values: dict[str, list]
    method: str

    @property
    def count(self) -> int:
        return len(self.values[self.fields[0]])

    def member(self, index: int) -> dict[str, Any]:
        return {field: self.values[field][index] for field in self.fields}


def _spec_values(field: str, where: str, spec: Any, method: str) -> tuple[list | None, tuple | None]:
    """(grid values, or None) and (distribution (kind, low, high), or None) of one swept field."""
    import numpy as np

    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
            raise ConfigError(where, f"expected a non-empty list of numbers, got {spec!r}")
        return list(spec), None
    if not isinstance(spec, dict):
        raise ConfigError(where, "expected a list of values or {log_uniform: [low, high], n: count} / "
                                 f"{{uniform: [low, high], n: count}}, got {spec!r}")
    kinds = [kind for kind in ("uniform", "log_uniform") if kind in spec]
    unknown = sorted(set(spec) - {"uniform", "log_uniform", "n"})
    if len(kinds) != 1 or unknown:
        raise ConfigError(where, f"expected exactly one of uniform / log_uniform (and n), got keys {sorted(spec)}")
    kind = kinds[0]
    bounds = spec[kind]
    if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        raise ConfigError(where, f"{kind} needs [low, high], got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise ConfigError(where, f"{kind} needs low < high, got [{low}, {high}]")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(where, f"log_uniform needs positive bounds, got [{low}, {high}]")
    if field == "train.seed":
        raise ConfigError(where, "seeds are integers: give a list, e.g. seed: [0, 1, 2]")
    if method == "random":
        if "n" in spec:
            raise ConfigError(where, "with method random the number of draws is sweep.samples, not n")
        return None, (kind, low, high)
    n = spec.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(where, f"a grid distribution needs n >= 1 values, got n={n!r} (or use method: random)")
    values = np.geomspace(low, high, n) if kind == "log_uniform" else np.linspace(low, high, n)
    return [float(v) for v in values], None


def sweep_members(cfg: Config) -> SweepPlan:
    """Expand and check ``cfg.sweep``: every member's values, each member's config validated (ConfigError naming
    the swept field otherwise)."""
    spec = dict(cfg.sweep)
    method = spec.pop("method", "grid")
    samples = spec.pop("samples", None)
    draw_seed = spec.pop("draw_seed", 0)
    if method not in ("grid", "random"):
        raise ConfigError("sweep.method", f"expected grid or random, got {method!r}")
    if not spec:
        raise ConfigError("sweep", "no swept field; e.g. sweep: {optimizer.lr: [0.1, 0.01], seed: [0, 1, 2]}")
    if cfg.optimizer.name not in OPTIMIZER_FIELDS:
        raise ConfigError("optimizer.name", f"{cfg.optimizer.name} cannot train as a population (its line search "
                                            f"needs the loss); sweepable optimizers: {', '.join(OPTIMIZER_FIELDS)}")
    sweepable = [field for field in SWEEPABLE if not field.startswith("optimizer.")
                 or field.split(".", 1)[1] in OPTIMIZER_FIELDS[cfg.optimizer.name]]
    axes: dict[str, list] = {}
    draws: dict[str, tuple] = {}
    for key, value in spec.items():
        field, where = ALIASES.get(key, key), f"sweep.{key}"
        if field in axes or field in draws:
            raise ConfigError(where, f"{field} is swept twice")
        if field not in sweepable:
            if field in SWEEPABLE:
                reason = (f"{cfg.optimizer.name} does not use {field}; its sweepable fields: {', '.join(sweepable)}")
            elif _is_config_field(cfg, field):
                reason = (f"{field} cannot vary inside one population (it changes the program or the data); "
                          f"sweepable fields: {', '.join(sweepable)}")
            else:
                reason = f"no such config field; sweepable fields: {', '.join(sweepable)}"
            raise ConfigError(where, reason)
        grid, draw = _spec_values(field, where, value, method)
        values_in_range = grid if grid is not None else list(draw[1:])
        if field == "model.kwargs.dropout" and not all(0 <= v < 1 for v in values_in_range):
            raise ConfigError(where, f"dropout rates must be in [0, 1), got {values_in_range!r}")
        if grid is not None:
            if field == "train.seed" and not all(float(v).is_integer() and v >= 0 for v in grid):
                raise ConfigError(where, f"seeds must be non-negative integers, got {grid!r}")
            axes[field] = [int(v) for v in grid] if field == "train.seed" else [float(v) for v in grid]
        else:
            draws[field] = draw
    if method == "random":
        if not draws:
            raise ConfigError("sweep.method", "random needs at least one distribution ({log_uniform: [low, high]})")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError("sweep.samples", f"method random needs samples >= 1, got {samples!r}")
        import numpy as np

        rng = np.random.default_rng(int(draw_seed))
        drawn = {field: (np.exp(rng.uniform(math.log(low), math.log(high), samples)) if kind == "log_uniform"
                         else rng.uniform(low, high, samples)).tolist()
                 for field, (kind, low, high) in draws.items()}
        rows = [dict(zip(drawn, point), **dict(zip(axes, combo)))
                for point in zip(*drawn.values()) for combo in itertools.product(*axes.values())]
    else:
        if samples is not None:
            raise ConfigError("sweep.samples", "only method random draws samples")
        rows = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    fields = tuple(rows[0])
    plan = SweepPlan(fields=fields, values={f: [row[f] for row in rows] for f in fields}, method=method)
    checked = set()
    for index in range(plan.count):  # every value once: out-of-range values are named with their field
        for field, value in plan.member(index).items():
            if (field, value) not in checked:
                checked.add((field, value))
                try:
                    cfg.replace(**{field: value, "sweep": {}})
                except ConfigError as error:
                    raise ConfigError(f"sweep.{field}", f"value {value!r}: {error}") from None
    return plan


def _is_config_field(cfg: Config, dotted: str) -> bool:
    node: Any = cfg.to_dict()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def member_config(cfg: Config, plan: SweepPlan, index: int) -> Config:
    """Member ``index`` as a single run's config: its swept values, the batch order it trained on, no sweep."""
    values = plan.member(index)
    seed = int(values.get("train.seed", cfg.train.seed))
    data_seed = seed if cfg.population.shuffle_per_member else shared_data_seed(cfg)
    return cfg.replace(**values, **{"train.data_seed": data_seed, "sweep": {}})


def shared_data_seed(cfg: Config) -> int:
    return cfg.train.seed if cfg.train.data_seed is None else cfg.train.data_seed
