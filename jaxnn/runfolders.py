"""Where a run or a sweep writes, decided and checked before anything starts. No jax here: ``jaxnn launch`` checks a
job's folder before it starts any process.

By default every run gets a fresh numbered folder, ``OUTPUT_DIR/NAME/version_N`` (N one above the highest there,
from 1), and every sweep ``OUTPUT_DIR/NAME-sweep/version_N``: running a command again never collides with an earlier
run. ``--run-dir`` (``--out`` for a sweep) pins one folder; ``--resume`` continues the pinned folder, or else the
latest version that holds checkpoints. Analysis commands given ``OUTPUT_DIR/NAME`` read its latest version.
Existing checkpoints are never overwritten; every refusal names the flag that gets past it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

from jaxnn import config as config_lib

VERSION = "version_"


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked (exists already, nothing to resume, config differs)."""


def versions(parent: str | pathlib.Path) -> list[pathlib.Path]:
    """The ``version_N`` folders in ``parent``, by N."""
    parent = pathlib.Path(parent)
    if not parent.is_dir():
        return []
    found = [(int(p.name[len(VERSION):]), p) for p in parent.iterdir()
             if p.is_dir() and p.name.startswith(VERSION) and p.name[len(VERSION):].isdigit()]
    return [p for _, p in sorted(found)]


def next_version(parent: str | pathlib.Path) -> pathlib.Path:
    """``parent/version_N`` with N one above the highest there (1 for the first)."""
    found = versions(parent)
    number = int(found[-1].name[len(VERSION):]) + 1 if found else 1
    return pathlib.Path(parent) / f"{VERSION}{number}"


def has_checkpoints(run_dir: pathlib.Path) -> bool:
    ckpt_dir = pathlib.Path(run_dir) / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def has_sweep(out: pathlib.Path) -> bool:
    return (out / "config.yaml").exists() or (out / "chunks").exists()


def default_parent(cfg: config_lib.Config, sweep: bool = False) -> pathlib.Path:
    return pathlib.Path(cfg.output_dir) / (f"{cfg.name}-sweep" if sweep else cfg.name)


def resolve(cfg: config_lib.Config, run_dir: str | pathlib.Path | None, resume: bool,
            sweep: bool = False) -> pathlib.Path:
    """The folder a run (``sweep``: a sweep) of ``cfg`` writes: ``run_dir`` when given; with ``resume`` the latest
    version holding a run (or ``OUTPUT_DIR/NAME`` itself when it holds one, as folders did before versions); else
    a fresh version. Creates nothing."""
    if run_dir is not None:
        return pathlib.Path(run_dir)
    parent = default_parent(cfg, sweep)
    if not resume:
        return next_version(parent)
    holds = has_sweep if sweep else has_checkpoints
    found = [p for p in versions(parent) if holds(p)]
    if found:
        return found[-1]
    if holds(parent):
        return parent
    flag = "--out (out_dir=)" if sweep else "--run-dir (run_dir=)"
    raise RunFolderError(f"nothing to resume in {parent}: no {VERSION}N folder there holds a "
                         f"{'sweep' if sweep else 'checkpoint'}; leave out --resume to start one, or name the "
                         f"folder to continue with {flag}")


def check(cfg: config_lib.Config, run_dir: pathlib.Path, resume: bool, pinned: bool, sweep: bool = False) -> None:
    """Refuse, in one line naming the fix, a folder that cannot be used as asked: resuming one with nothing to
    resume or with a config that differs in more than the run's length and device layout, or starting a new run
    in a pinned folder that already holds one. Creates nothing."""
    flag = "--out (out_dir=)" if sweep else "--run-dir (run_dir=)"
    what = "sweep folder" if sweep else "run folder"
    holds = has_sweep(run_dir) if sweep else has_checkpoints(run_dir)
    fresh = f"leave out {flag} for a fresh {default_parent(cfg, sweep)}/{VERSION}N"
    if resume and (run_dir / "fit.json").exists():
        raise RunFolderError(f"cannot resume {run_dir}: fit() wrote it, and its optimizer is not recorded; continue "
                             "it from your script (fit(..., checkpointer=Checkpointer(RUN_DIR/'checkpoints'), "
                             "start_step=...)), or leave out --resume for a fresh run of this config")
    if resume:
        if not holds:
            raise RunFolderError(f"nothing to resume: {what} {run_dir} holds no "
                                 f"{'sweep' if sweep else 'checkpoint'}; leave out --resume (resume=) to start a run there")
        saved_path = run_dir / "config.yaml"
        if saved_path.exists():
            changeable = ("train.progress",) if sweep else ("train.progress", "train.epochs", "train.steps",
                                                            "parallel.")
            differences = [d for d in config_differences(config_lib.load_config(saved_path).to_dict(), cfg.to_dict())
                           if not d.startswith(changeable)]
            if differences:
                allowed = "" if sweep else (" (only train.steps/train.epochs/train.steps_per_call and the parallel "
                                            "section may change)")
                raise RunFolderError(f"cannot resume {run_dir}: the config differs from the saved one in "
                                     f"{', '.join(differences)}{allowed}; to train the changed config, leave out "
                                     f"--resume{' and ' + flag if pinned else ''} (a fresh {VERSION}N folder)")
    elif holds:
        raise RunFolderError(f"{what} {run_dir} already holds a {'sweep' if sweep else 'run with checkpoints'}: add "
                             f"--resume (resume=True) to continue it, or {fresh} (nothing there is ever overwritten)")


def prepare(cfg: config_lib.Config, run_dir: str | pathlib.Path | None, resume: bool,
            sweep: bool = False) -> pathlib.Path:
    """:func:`resolve` then :func:`check`; returns the folder (not created yet: the caller makes it once the data
    has loaded, so a failed start leaves nothing behind)."""
    folder = resolve(cfg, run_dir, resume, sweep)
    check(cfg, folder, resume, pinned=run_dir is not None, sweep=sweep)
    return folder


def claim(folder: pathlib.Path, fresh: bool) -> pathlib.Path:
    """Create the run (or sweep) folder. ``fresh`` (a default ``version_N``, not pinned): created only if it does
    not exist yet, else the next free number, so runs started at the same time never share a folder."""
    folder = pathlib.Path(folder)
    if not fresh:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    while True:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # taken (or a file of that name): the next number above both
            taken = int(folder.name[len(VERSION):]) if folder.name[len(VERSION):].isdigit() else 0
            following = next_version(folder.parent)
            folder = folder.parent / f"{VERSION}{max(taken + 1, int(following.name[len(VERSION):]))}"


def run_folder_of_config(path: str | pathlib.Path, sweep: bool = False) -> pathlib.Path | None:
    """The run folder a config path lies in (``X/config.yaml`` beside what a run writes: checkpoints/,
    metrics.jsonl or summary.json; ``sweep``: chunks/ or sweep.json), else None: so ``jaxnn train X/config.yaml
    --resume`` continues X (or says that X has nothing to resume), never another run."""
    path = pathlib.Path(path)
    marks = ("chunks", "sweep.json") if sweep else ("checkpoints", "metrics.jsonl", "summary.json")
    if path.name == "config.yaml" and path.is_file() and any((path.parent / name).exists() for name in marks):
        return path.parent
    return None


def is_run(folder: pathlib.Path) -> bool:
    """A folder analysis can read: a config and at least one checkpoint."""
    return (folder / "config.yaml").exists() and has_checkpoints(folder)


def latest_run(run_dir: str | pathlib.Path, is_run: Callable[[pathlib.Path], bool] = is_run) -> pathlib.Path:
    """The latest ``version_N`` of ``run_dir`` that is a run (so ``jaxnn curvature runs/digits_mlp`` reads the
    newest finished or checkpointed run, not one that has not saved yet), else ``run_dir`` itself."""
    run_dir = pathlib.Path(run_dir)
    found = [p for p in versions(run_dir) if is_run(p)]
    return found[-1] if found else run_dir


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted fields in which two config dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        dotted = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "kwargs":
            out += config_differences(va, vb, dotted)
        elif json.dumps(va, default=list, sort_keys=True) != json.dumps(vb, default=list, sort_keys=True):
            out.append(dotted)
    return out
