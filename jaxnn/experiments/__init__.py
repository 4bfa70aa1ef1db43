"""Reproduced results, one command each: ``jaxnn experiment NAME [--smoke] [--set key=value] [--out DIR]``.

An experiment is a module ``jaxnn/experiments/<name>.py`` (installed with the package) that defines

- ``CLAIM``: the claim of the notes in one sentence;
- ``CONFIG``: its full-size setting (a flat dict of numbers, strings and lists) and ``SMOKE``: the overrides that make
  it run in seconds (the test suite runs every experiment at smoke size);
- ``run(config, out_dir, progress) -> Result``: measure, draw the figures into ``out_dir`` and return the numbers
  and a verdict computed from them.

:func:`run_experiment` writes ``results/<name>/result.json`` (claim, setting, measured numbers, verdict and why,
where the notes were wrong, and the code that produced it: the sha256 of the experiment's source file, jaxnn's
version, the git commit where known), the figures and ``summary.md``; :func:`write_table` writes the table of the
result files into ``README.md`` beside them (``jaxnn experiment --table``), or into the file given
(``--readme experiments/README.md`` in a source checkout, whose root keeps both). Relative paths are read from the
working directory.

Data: an experiment's ``data_dir`` setting (``--set data_dir=PATH``: the data set's folder or its parent), else
``$JAXNN_DATA/<name>`` (``$JAXNN_DATA_DIR`` is read too), else ``~/.cache/jaxnn/data/<name>``; never downloaded.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import pathlib
import subprocess
import time
from typing import Any

EXPERIMENTS_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_RESULTS_DIR = "results"
VERDICTS = ("agrees", "partly", "disagrees")


@dataclasses.dataclass
class Result:
    """What an experiment measured. ``checks``: one entry per sub-claim, (description, measured text, agrees?);
    ``verdict`` follows from them (all agree: agrees; none: disagrees; else partly). ``reported``: (label, measured
    text) pairs shown beside the checks but not counted, for quantities that hold by construction or that the claim
    does not bound. ``measured``: the numbers, JSON-able; ``figures``: file names in the output folder;
    ``corrections``: where the notes were wrong."""

    measured: dict
    checks: list[tuple[str, str, bool]]
    figures: list[str] = dataclasses.field(default_factory=list)
    corrections: list[str] = dataclasses.field(default_factory=list)
    data: str = ""
    reported: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        agreed = [ok for _, _, ok in self.checks]
        if not agreed:
            raise ValueError("an experiment needs at least one check to reach a verdict")
        return "agrees" if all(agreed) else "disagrees" if not any(agreed) else "partly"


def mnist(config: dict, experiment: str, seed: int = 0, limit: int | None = None, **split):
    """The MNIST data set of :func:`data_folder` (``config["data_dir"]``, ``$JAXNN_DATA/mnist`` or the default),
    split by ``seed``, never downloaded: a folder without the IDX files raises FileNotFoundError naming the
    experiment, the folder, the four files, ``--set data_dir=`` and ``$JAXNN_DATA``."""
    from jaxnn import data as data_lib
    from jaxnn.data.idx import IDX_FILE_NAMES

    data_dir = data_folder(config, "mnist")
    try:
        return data_lib.load_dataset("mnist", data_dir=data_dir, seed=seed, download=False, limit=limit, **split)
    except FileNotFoundError as error:
        problem = (f"{error}" if "incomplete IDX pair" in str(error) else
                   f"{data_dir} {'holds no MNIST IDX files' if data_dir.is_dir() else 'does not exist'}")
        raise FileNotFoundError(
            f"experiment {experiment} needs MNIST: {problem}. Expected there: {', '.join(IDX_FILE_NAMES.values())} "
            f"(raw or .gz; the t10k pair alone is enough, it is split into train/val/test). Point the experiment at "
            f"them with --set data_dir=PATH, or set JAXNN_DATA to the folder holding mnist/") from None


def data_folder(config: dict, name: str) -> pathlib.Path:
    """Where an experiment reads data set ``name``: ``config["data_dir"]`` when set (relative to the working
    directory), else ``$JAXNN_DATA/<name>`` (or ``$JAXNN_DATA_DIR/<name>``), else ``~/.cache/jaxnn/data/<name>``."""
    from jaxnn.data.dataset import default_data_dir

    if config.get("data_dir"):
        return pathlib.Path(config["data_dir"]).expanduser()
    return default_data_dir(name)


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

    data_dir = data_folder(config, "cifar10")
    try:
        return data_lib.load_dataset("cifar10", data_dir=data_dir, seed=seed, download=False, limit=limit, **split)
    except FileNotFoundError:  # the loader's message offers download=True, which experiments do not
        problem = (f"{data_dir} does not exist" if not data_dir.is_dir() else
                   f"{data_dir} (or its {CIFAR10_FOLDER} folder) lacks some of the batch files")
        raise FileNotFoundError(
            f"experiment {experiment} needs CIFAR-10: {problem}; expected {', '.join(CIFAR10_TRAIN_FILES)}, "
            f"{CIFAR10_TEST_FILE} (the python version). Point the experiment at them with --set data_dir=PATH, or set "
            f"JAXNN_DATA to the folder holding cifar10/"
        ) from None


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_PACKAGE_DIR.glob("*.py") if not p.stem.startswith("_"))


def experiment_source(name: str) -> pathlib.Path:
    """The source file of experiment ``name`` (ValueError listing the experiments when there is none)."""
    path = EXPERIMENTS_PACKAGE_DIR / f"{name}.py"
    if not name.isidentifier() or name.startswith("_") or not path.is_file():
        raise ValueError(f"unknown experiment {name!r}; experiments: {', '.join(experiment_names())}")
    return path


def load_experiment(name: str):
    path = experiment_source(name)
    module = importlib.import_module(f"{__name__}.{name}")
    for attribute in ("CLAIM", "CONFIG", "SMOKE", "run"):
        if not hasattr(module, attribute):
            raise ValueError(f"experiment {name}: {path} defines no {attribute}")
    return module


def code_record(name: str) -> dict:
    """What ties a result to its code: the sha256 of the experiment's source file, jaxnn's version and, in a git
    checkout, the commit and whether the experiment file differs from it (``null`` where unknown)."""
    from jaxnn import __version__

    path = experiment_source(name)
    record = {"experiment_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "jaxnn_version": __version__,
              "git_commit": None, "experiment_file_modified": None}
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode == 0:
            record["git_commit"] = head.stdout.strip()
            record["experiment_file_modified"] = run("diff", "--quiet", "HEAD", "--", path.name).returncode != 0
    except (OSError, subprocess.SubprocessError):
        pass
    return record


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
    """Run experiment ``name`` and write its result folder (default ``results/<name>``); returns result.json's dict.

    The experiment's compiled programs are released when it ends (``jax.clear_caches()``, which empties every jit
    cache of the process): XLA:CPU keeps each cached program's machine code mapped into the process, and a script or
    notebook that runs the experiments one after another would otherwise accumulate them towards Linux's limit of
    65,530 memory mappings, past which the next compilation crashes (JAX issue #27201)."""
    module = load_experiment(name)
    config = experiment_config(module, smoke, overrides)
    code = code_record(name)  # before the run: the file that is imported is the file that is hashed
    out = pathlib.Path(out_dir or pathlib.Path(DEFAULT_RESULTS_DIR) / name)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        result = module.run(config, out, progress)
    finally:
        import jax

        jax.clear_caches()
    record = {
        "name": name, "claim": module.CLAIM, "size": "smoke" if smoke else "full", "setting": config,
        "data": result.data, "measured": result.measured,
        "checks": [{"check": text, "measured": measured, "agrees": bool(ok)} for text, measured, ok in result.checks],
        "reported": [{"quantity": label, "measured": measured} for label, measured in result.reported],
        "verdict": result.verdict, "corrections": result.corrections, "figures": result.figures,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "date": datetime.date.today().isoformat(), "code": code,
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
    if record.get("reported"):
        lines += ["", "**Reported, not checked** (holds by construction, or the claim does not bound it).", ""]
        lines += [f"- {r['quantity']}: {r['measured']}" for r in record["reported"]]
    if record["corrections"]:
        lines += ["", "**Where the notes are wrong.**", ""] + [f"- {c}" for c in record["corrections"]]
    if record["figures"]:
        lines += [""] + [f"![{f}]({f})" for f in record["figures"]]
    code = record.get("code") or {}
    if code:
        lines += ["", f"Produced by jaxnn {code.get('jaxnn_version')}, experiment source sha256 "
                  f"{code.get('experiment_sha256', '')[:12]}…" + (f", commit {code['git_commit'][:10]}"
                                                                   if code.get("git_commit") else "")
                  + (" (experiment file modified)" if code.get("experiment_file_modified") else "") + "."]
    return "\n".join(lines) + "\n"


TABLE_BEGIN = "<!-- generated by `jaxnn experiment --table`: do not edit by hand -->"
TABLE_END = "<!-- end of generated table -->"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_table(results_dir: str | pathlib.Path = DEFAULT_RESULTS_DIR,
                readme: str | pathlib.Path | None = None) -> str:
    """The table claim | checks (each with its label, measured value and ✓/✗) | verdict | figure from every
    ``results_dir/*/result.json``, written between the markers of ``readme`` (default: ``README.md`` beside the
    results it read; created if missing; relative paths from the working directory); returns the table. No result
    files: FileNotFoundError, and nothing is written."""
    results_dir = pathlib.Path(results_dir)
    readme = pathlib.Path(readme or results_dir / "README.md")
    if not any(results_dir.glob("*/result.json")):
        raise FileNotFoundError(f"no result files in {results_dir.absolute()} (*/result.json): run an experiment "
                                "first, or point --results at the folder holding them")
    rows = ["| experiment | claim | checks: what was measured, the value, agrees (✓) or not (✗) | verdict | figure |",
            "| --- | --- | --- | --- | --- |"]
    for path in sorted(results_dir.glob("*/result.json")):
        record = json.loads(path.read_text())
        items = [f"{'✓' if c['agrees'] else '✗'} {_cell(c['check'])}: **{_cell(c['measured'])}**"
                 for c in record["checks"]]
        items += [f"(reported) {_cell(r['quantity'])}: {_cell(r['measured'])}" for r in record.get("reported", [])]
        figure = record["figures"][0] if record["figures"] else ""
        link = f"![]({os.path.relpath(path.parent / figure, readme.parent)})" if figure else ""
        rows.append(f"| {record['name']} ({record['size']}) | {_cell(record['claim'])} | {'<br>'.join(items)} | "
                    f"**{record['verdict']}** | {link} |")
    table = "\n".join(rows)
    text = readme.read_text() if readme.exists() else "# Experiments\n\n"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        tail = rest.split(TABLE_END, 1)[1]
        text = f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{TABLE_BEGIN}\n{table}\n{TABLE_END}\n"
    readme.parent.mkdir(parents=True, exist_ok=True)
    _write(readme, text)
    return table
