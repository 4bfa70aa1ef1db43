"""Frozen dataclass configs: loaded from YAML/JSON, overridden from the CLI, validated before anything compiles.

    cfg = load_config("jaxnn/configs/digits_mlp.yaml", overrides=["optimizer.lr=0.05"])

Every invalid value raises :class:`ConfigError` naming the field (``optimizer.lr``) and the reason.
"""

from __future__ import annotations

import dataclasses
import json
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


def _merge(base: dict, values: dict, prefix: str) -> dict:
    out = dict(base)
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
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

def validate(values: dict | Config) -> Config:
    """Build and check a Config; raises ConfigError(field, reason) on the first problem."""
    cfg = values if isinstance(values, Config) else _build(Config, values, "")
    from jaxnn import data as data_lib, models as models_lib, optim as optim_lib, losses as losses_lib

    def check(ok: bool, field: str, reason: str):
        if not ok:
            raise ConfigError(field, reason)

    check(bool(cfg.name) and "/" not in cfg.name, "name", f"must be a non-empty name without '/', got {cfg.name!r}")
    check(cfg.data.name in data_lib.dataset_names(), "data.name",
          f"unknown dataset {cfg.data.name!r}; valid datasets: {', '.join(data_lib.dataset_names())}")
    check(0 <= cfg.data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {cfg.data.val_fraction}")
    check(0 <= cfg.data.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {cfg.data.test_fraction}")
    check(cfg.data.val_fraction + cfg.data.test_fraction < 1, "data.val_fraction",
          "val_fraction + test_fraction must leave some training data")
    check(cfg.data.limit is None or cfg.data.limit > 0, "data.limit", f"must be positive, got {cfg.data.limit}")
    check(cfg.model.name in models_lib.model_names(), "model.name",
          f"unknown model {cfg.model.name!r}; valid models: {', '.join(models_lib.model_names())}")
    o = cfg.optimizer
    check(o.name in optim_lib.OPTIMIZERS, "optimizer.name",
          f"unknown optimizer {o.name!r}; valid optimizers: {', '.join(optim_lib.OPTIMIZERS)}")
    check(o.lr > 0 and o.lr == o.lr, "optimizer.lr", f"must be a positive number, got {o.lr}")
    check(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    check(0 <= o.b1 < 1, "optimizer.b1", f"must be in [0, 1), got {o.b1}")
    check(0 <= o.b2 < 1, "optimizer.b2", f"must be in [0, 1), got {o.b2}")
    check(0 < o.rms_decay < 1, "optimizer.rms_decay", f"must be in (0, 1), got {o.rms_decay}")
    check(o.eps > 0, "optimizer.eps", f"must be positive, got {o.eps}")
    check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
    check(o.clip_norm is None or o.clip_norm > 0, "optimizer.clip_norm", f"must be positive or null, got {o.clip_norm}")
    check(o.schedule in optim_lib.SCHEDULES, "optimizer.schedule",
          f"unknown schedule {o.schedule!r}; valid schedules: {', '.join(optim_lib.SCHEDULES)}")
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
    check(t.loss in losses_lib.LOSSES, "train.loss", f"unknown loss {t.loss!r}; valid losses: {', '.join(losses_lib.LOSSES)}")
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
    check(p.mode in ("jit", "shard_map", "pmap"), "parallel.mode",
          f"unknown mode {p.mode!r}; valid modes: jit, shard_map, pmap")
    check(p.params in ("replicated", "sharded"), "parallel.params",
          f"must be replicated or sharded, got {p.params!r}")
    check(p.params == "replicated" or p.mode == "jit", "parallel.params",
          f"sharded parameters need parallel.mode jit (XLA inserts the gathers), got mode {p.mode!r}")
    check(p.mode != "pmap" or t.steps_per_call == 1, "train.steps_per_call",
          f"parallel.mode pmap runs one step per call (pmap takes host batches), got {t.steps_per_call}")
    a = cfg.analysis
    check(a.curvature_k >= 1, "analysis.curvature_k", f"must be >= 1, got {a.curvature_k}")
    check(a.curvature_batches >= 1, "analysis.curvature_batches", "must be >= 1")
    check(a.landscape_grid >= 3, "analysis.landscape_grid", f"must be >= 3, got {a.landscape_grid}")
    check(a.landscape_span > 0, "analysis.landscape_span", f"must be positive, got {a.landscape_span}")
    check(a.landscape_batches >= 1, "analysis.landscape_batches", "must be >= 1")
    check(a.hessian_every is None or a.hessian_every >= 1, "analysis.hessian_every", "must be >= 1 or null")
    check(a.diagnostics_every is None or a.diagnostics_every >= 1, "analysis.diagnostics_every",
          "must be >= 1 or null")
    if cfg.sweep:
        from jaxnn.train.sweep import sweep_members

        sweep_members(cfg)  # raises ConfigError naming the swept field
    return cfg
