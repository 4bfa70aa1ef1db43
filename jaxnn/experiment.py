"""Reproduced results, one command each: ``jaxnn experiment NAME [--smoke] [--set key=value] [--out DIR]``.

An experiment is a script ``experiments/<name>.py`` that defines

- ``CLAIM``: the claim of the notes in one sentence;
- ``CONFIG``: its full-size setting (a flat dict of numbers, strings and lists) and ``SMOKE``: the overrides that make
  it run in seconds (the test suite runs every experiment at smoke size);
- ``run(config, out_dir, progress) -> Result``: measure, draw the figures into ``out_dir`` and return the numbers
  and a verdict computed from them.

:func:`run_experiment` writes ``results/<name>/result.json`` (claim, setting, measured numbers, verdict and why,
where the notes were wrong), the figures and ``summary.md``; :func:`write_table` regenerates the table in
``experiments/README.md`` from the result files (``jaxnn experiment --table``).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import time
from typing import Any

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"
VERDICTS = ("agrees", "partly", "disagrees")


@dataclasses.dataclass
class Result:
    """What an experiment measured. ``checks``: one entry per sub-claim, (description, measured text, agrees?);
    ``verdict`` follows from them (all agree: agrees; none: disagrees; else partly). ``measured``: the numbers,
    JSON-able; ``figures``: file names in the output folder; ``corrections``: where the notes were wrong."""

    measured: dict
    checks: list[tuple[str, str, bool]]
    figures: list[str] = dataclasses.field(default_factory=list)
    corrections: list[str] = dataclasses.field(default_factory=list)
    data: str = ""

    @property
    def verdict(self) -> str:
        agreed = [ok for _, _, ok in self.checks]
        if not agreed:
            raise ValueError("an experiment needs at least one check to reach a verdict")
        return "agrees" if all(agreed) else "disagrees" if not any(agreed) else "partly"


MNIST_DEFAULT_DIR = "../shared/data/mnist"


def mnist(config: dict, experiment: str, seed: int = 0, limit: int | None = None, **split):
    """The MNIST data set of ``config["data_dir"]`` (a relative path is read from the working directory, else from
    the repository root), split by ``seed``, never downloaded: a folder without the IDX files raises
    FileNotFoundError naming the experiment, the folder, the four files and ``--set data_dir=``."""
    from jaxnn import data as data_lib
    from jaxnn.data.idx import IDX_FILE_NAMES

    data_dir = _data_dir(config)
    try:
        return data_lib.load_dataset("mnist", data_dir=data_dir, seed=seed, download=False, limit=limit, **split)
    except FileNotFoundError as error:
        problem = (f"{error}" if "incomplete IDX pair" in str(error) else
                   f"{data_dir} {'holds no MNIST IDX files' if data_dir.is_dir() else 'does not exist'}")
        raise FileNotFoundError(
            f"experiment {experiment} needs MNIST: {problem}. Expected there: {', '.join(IDX_FILE_NAMES.values())} "
            f"(raw or .gz; the t10k pair alone is enough, it is split into train/val/test). Point the experiment at "
            f"them with --set data_dir=PATH") from None


def _data_dir(config: dict) -> pathlib.Path:
    """``config["data_dir"]``: a relative path is read from the working directory, else from the repository root."""
    data_dir = pathlib.Path(config["data_dir"]).expanduser()
    if not data_dir.is_absolute() and not data_dir.exists():
        data_dir = EXPERIMENTS_DIR.parent / data_dir
    return data_dir


IMAGE_DATA = ("digits", "mnist", "cifar10")


def image_data(config: dict, experiment: str, seed: int = 0, limit: int | None = None, **split):
    """The image data set an experiment's ``config["data"]`` names: "digits" (embedded), "mnist" (:func:`mnist`) or
    "cifar10" (the python batches in ``config["data_dir"]``: the ``cifar-10-batches-py`` folder or its parent; never
    downloaded). A missing folder or file raises FileNotFoundError naming the experiment, what is missing and
    ``--set data_dir=``; another name raises ValueError listing the choices. ``split``: load_dataset's
    ``val_fraction``/``test_fraction``."""
    from jaxnn import data as data_lib

    name = config.get("data", "digits")
    if name not in IMAGE_DATA:
        raise ValueError(f"experiment {experiment}: data must be one of {', '.join(IMAGE_DATA)}, got {name!r}")
    if name == "digits":
        return data_lib.load_dataset("digits", seed=seed, limit=limit, **split)
    if name == "mnist":
        return mnist(config, experiment, seed=seed, limit=limit, **split)
    from jaxnn.data.cifar import CIFAR10_FOLDER, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES

    data_dir = _data_dir(config)
    try:
        return data_lib.load_dataset("cifar10", data_dir=data_dir, seed=seed, download=False, limit=limit, **split)
    except FileNotFoundError:  # the loader's message offers download=True, which experiments do not
        problem = (f"{data_dir} does not exist" if not data_dir.is_dir() else
                   f"{data_dir} (or its {CIFAR10_FOLDER} folder) lacks some of the batch files")
        raise FileNotFoundError(
            f"experiment {experiment} needs CIFAR-10: {problem}; expected {', '.join(CIFAR10_TRAIN_FILES)}, "
            f"{CIFAR10_TEST_FILE} (the python version). Point the experiment at them with --set data_dir=PATH"
        ) from None


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_experiment(name: str):
    path = EXPERIMENTS_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(experiment_names())}")
    spec = importlib.util.spec_from_file_location(f"jaxnn_experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attribute in ("CLAIM", "CONFIG", "SMOKE", "run"):
        if not hasattr(module, attribute):
            raise ValueError(f"experiment {name}: {path} defines no {attribute}")
    return module


def experiment_config(module: Any, smoke: bool, overrides: dict | None) -> dict:
    """The full-size config, the smoke overrides when ``smoke``, then ``overrides`` (only keys the experiment has)."""
    config = dict(module.CONFIG)
    if smoke:
        config.update(module.SMOKE)
    for key, value in (overrides or {}).items():
        if key not in config:
            raise ValueError(f"--set {key}: the experiment has no such setting; its settings: {', '.join(config)}")
        config[key] = value
    return config


def run_experiment(name: str, *, smoke: bool = False, overrides: dict | None = None,
                   out_dir: str | pathlib.Path | None = None, progress: bool = True) -> dict:
    """Run experiment ``name`` and write its result folder (default ``results/<name>``); returns result.json's dict."""
    module = load_experiment(name)
    config = experiment_config(module, smoke, overrides)
    out = pathlib.Path(out_dir or pathlib.Path("results") / name)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = module.run(config, out, progress)
    record = {
        "name": name, "claim": module.CLAIM, "size": "smoke" if smoke else "full", "setting": config,
        "data": result.data, "measured": result.measured,
        "checks": [{"check": text, "measured": measured, "agrees": bool(ok)} for text, measured, ok in result.checks],
        "verdict": result.verdict, "corrections": result.corrections, "figures": result.figures,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "date": datetime.date.today().isoformat(),
    }
    _write(out / "result.json", json.dumps(record, indent=2, default=_json_default) + "\n")
    _write(out / "summary.md", summary_markdown(record))
    return record


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary_markdown(record: dict) -> str:
    lines = [f"# {record['name']}: {record['verdict']}", "", f"**Claim.** {record['claim']}", "",
             f"**Data and setting** ({record['size']} size). {record['data']} "
             + ", ".join(f"{k}={v}" for k, v in record["setting"].items()), "", "| check | measured | agrees |",
             "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {c['measured']} | {'yes' if c['agrees'] else 'no'} |" for c in record["checks"]]
    if record["corrections"]:
        lines += ["", "**Where the notes are wrong.**", ""] + [f"- {c}" for c in record["corrections"]]
    if record["figures"]:
        lines += [""] + [f"![{f}]({f})" for f in record["figures"]]
    return "\n".join(lines) + "\n"


TABLE_BEGIN = "<!-- generated by `jaxnn experiment --table`: do not edit by hand -->"
TABLE_END = "<!-- end of generated table -->"


def write_table(results_dir: str | pathlib.Path = "results", readme: str | pathlib.Path | None = None) -> str:
    """The table claim | measured | verdict | figure from every ``results/*/result.json``, written between the
    markers of ``experiments/README.md`` (created if missing); returns the table."""
    results_dir = pathlib.Path(results_dir)
    rows = ["| experiment | claim | measured | verdict | figure |", "| --- | --- | --- | --- | --- |"]
    for path in sorted(results_dir.glob("*/result.json")):
        record = json.loads(path.read_text())
        measured = "; ".join(f"{c['measured']}" for c in record["checks"])
        figure = record["figures"][0] if record["figures"] else ""
        link = f"![]({os.path.relpath(path.parent / figure, EXPERIMENTS_DIR)})" if figure else ""
        rows.append(f"| {record['name']} ({record['size']}) | {record['claim']} | {measured} | "
                    f"**{record['verdict']}** | {link} |")
    table = "\n".join(rows)
    readme = pathlib.Path(readme or EXPERIMENTS_DIR / "README.md")
    text = readme.read_text() if readme.exists() else "# Experiments\n\n"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        tail = rest.split(TABLE_END, 1)[1]
        text = f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{TABLE_BEGIN}\n{table}\n{TABLE_END}\n"
    _write(readme, text)
    return table
