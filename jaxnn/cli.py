"""The ``jaxnn`` command.

    jaxnn run                                  # the main job: digits MLP + curvature + landscape report
    jaxnn train CONFIG.yaml --set optimizer.lr=0.05 [--resume]
    jaxnn curvature RUN_DIR [--k 5] [--density] [--blocks layer] [--data-batches N]
    jaxnn influence RUN_DIR --test-index 0 3 [--top 5]  # training examples that drive each test prediction
    jaxnn laplace RUN_DIR [--structure kfac]        # Laplace posterior: marginal likelihood, calibration (NLL, ECE)
    jaxnn landscape RUN_DIR --dirs filter --grid 51 --span 1.0 [--other RUN_DIR2] [--trajectory]
    jaxnn sweep CONFIG [--curvature] [--resume] # a population of the config's sweep section, best member exported
    jaxnn diagnose RUN_DIR                     # per-layer activations, dead/saturated units, gradients, updates
    jaxnn doctor CONFIG                        # sanity checks of a new model: ln(C) at init, overfit 20, grad check
    jaxnn experiment NAME [--smoke]            # reproduce a result of the notes: results/NAME/ (--list, --table)
    jaxnn configs                              # list the shipped configs
    jaxnn train CONFIG --devices 8             # data-parallel over 8 devices (simulated on a CPU-only machine)
    jaxnn launch --processes 2 --devices-per-process 4 -- train CONFIG   # multi-host, as local processes
"""

from __future__ import annotations

# Only the standard library at module level: ``jaxnn --help`` must not wait for jax, and the runtime settings
# (compilation cache, simulated devices) must be in place before jax is imported.
import argparse
import contextlib
import os
import sys


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--x64", action="store_true", help="float64 throughout")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="use N devices (data parallel); on a CPU-only machine N CPU devices are simulated "
                        "(default: the config's parallel.devices, -1 = all)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent compilation cache (default: on, in $JAXNN_CACHE_DIR "
                        "or ~/.cache/jaxnn/xla)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its latest checkpoint")
    p.add_argument("--run-dir", help="run folder (default: a fresh OUTPUT_DIR/NAME/version_N; with --resume the "
                                     "latest one, or the folder CONFIG lies in)")
    _add_runtime_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxnn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train the default (or given) config, then write the curvature and landscape report")
    p.add_argument("--config", default="digits_mlp", help="a YAML path or a shipped config name (default: digits_mlp)")
    p.add_argument("--no-analysis", action="store_true", help="skip the curvature and landscape report")
    _add_train_args(p)

    p = sub.add_parser("train", help="train from a config file")
    p.add_argument("config", help="a YAML path or a shipped config name (see `jaxnn configs`)")
    _add_train_args(p)

    p = sub.add_parser("curvature", help="Hessian spectrum report of a trained run: curvature.json + spectrum.png")
    p.add_argument("run_dir")
    p.add_argument("--k", type=int, default=5, help="top-k and bottom-k eigenvalues (default 5)")
    p.add_argument("--density", action="store_true", help="also estimate the spectral density (SLQ)")
    p.add_argument("--blocks", choices=["layer"], default=None,
                   help="also every layer's Hessian block: top-k with residuals, trace, density -> blocks.png")
    p.add_argument("--data-batches", type=int, default=4, help="training batches the Hessian averages over")
    p.add_argument("--batch-size", type=int, default=None, help="analysis batch size (default: the run's)")
    p.add_argument("--step", default="latest", help="checkpoint: latest, best or a step number")
    p.add_argument("--mode", choices=["eval", "train"], default="eval",
                   help="batch norm: running statistics (eval, default) or batch statistics (train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: the run folder)")
    _add_runtime_args(p)

    p = sub.add_parser("landscape", help="1-D/2-D loss-landscape slices of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--dirs", default="filter", choices=["filter", "random", "layer", "eigen", "pca"],
                   help="direction kind (default: filter-normalised)")
    p.add_argument("--grid", type=int, default=51, help="points per axis (default 51)")
    p.add_argument("--span", type=float, default=1.0, help="alpha, beta in [-span, span] (default 1.0)")
    p.add_argument("--other", help="a second run folder: also plot the interpolation between the two")
    p.add_argument("--trajectory", action="store_true", help="overlay the checkpoints' trajectory (PCA plane)")
    p.add_argument("--data-batches", type=int, default=2, help="training batches each grid point averages over")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--step", default="latest", help="checkpoint: latest, best or a step number")
    p.add_argument("--log-scale", action="store_true")
    p.add_argument("--split", choices=["data", "points"], default="data",
                   help="with several devices: give each device a slice of the data (default) or of the grid points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: the run folder)")
    _add_runtime_args(p)

    p = sub.add_parser("laplace", help="Laplace approximation of a classification run: tuned prior precision, log "
                                       "marginal likelihood, test NLL / accuracy / ECE of MAP vs Laplace: laplace.json "
                                       "+ laplace.png")
    p.add_argument("run_dir")
    p.add_argument("--structure", choices=["kfac", "diag", "last_layer", "full"], default="kfac",
                   help="posterior precision: K-FAC blocks (default), exact diagonal, the last layer's dense GGN, or "
                        "the full dense GGN (small models)")
    p.add_argument("--prior-precision", type=float, default=None,
                   help="fixed prior precision (default: tuned, see --tune)")
    p.add_argument("--tune", choices=["marglik", "val_nll"], default="marglik",
                   help="how the prior precision is tuned: maximise the marginal likelihood (default), or minimise "
                        "the predictive's NLL on the run's validation split (for a run trained without weight decay)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--step", default="latest", help="checkpoint: latest, best or a step number")
    p.add_argument("--out", help="output folder (default: the run folder)")
    _add_runtime_args(p)

    p = sub.add_parser("influence", help="which training examples drive a test prediction (influence functions): "
                                         "influence.json + influence.png")
    p.add_argument("run_dir")
    p.add_argument("--test-index", type=int, nargs="+", default=[0], help="test-split examples to explain (default 0)")
    p.add_argument("--top", type=int, default=5, help="most helpful and most harmful training examples to list")
    p.add_argument("--damping", type=float, default=0.01, help="added to the Hessian (default 0.01)")
    p.add_argument("--method", choices=["minres", "cg", "lissa"], default="minres",
                   help="inverse-product solver (default minres: a network's Hessian is indefinite)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative residual of the solve (default 1e-3)")
    p.add_argument("--max-iters", type=int, default=1000,
                   help="solver iterations at most (default 1000, ~10 s for an 84k-parameter MLP; a result that "
                        "misses --tol is marked NOT converged: raise this or --damping)")
    p.add_argument("--train-limit", type=int, default=None, help="score only the first N training examples")
    p.add_argument("--data-batches", type=int, default=4, help="training batches the Hessian averages over")
    p.add_argument("--step", default="latest", help="checkpoint: latest, best or a step number")
    p.add_argument("--out", help="output folder (default: the run folder)")
    _add_runtime_args(p)

    p = sub.add_parser("diagnose", help="per-layer statistics of a trained run: diagnostics.json + diagnostics.png")
    p.add_argument("run_dir")
    p.add_argument("--batch-size", type=int, default=256, help="training examples to measure on (default 256)")
    p.add_argument("--layers", default=None, help="comma-separated layer names (default: every layer)")
    p.add_argument("--step", default="latest", help="checkpoint: latest, best or a step number")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--x64", action="store_true", help="float64 throughout")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent compilation cache")

    p = sub.add_parser("experiment", help="run a reproduced result of the notes (jaxnn/experiments/NAME.py)")
    p.add_argument("name", nargs="?", help="the experiment (see --list)")
    p.add_argument("--smoke", action="store_true", help="the small setting the test suite runs (seconds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the experiment's settings (repeatable)")
    p.add_argument("--out", help="output folder (default: results/NAME)")
    p.add_argument("--list", action="store_true", help="list the experiments and their claims")
    p.add_argument("--table", action="store_true",
                   help="regenerate the table in experiments/README.md from results/*/result.json")
    p.add_argument("--results", default="results", help="the results folder --table reads (default: results)")
    p.add_argument("--readme", default=None,
                   help="the file --table writes between its markers (default: README.md beside the results; in "
                        "a source checkout: --readme experiments/README.md)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent compilation cache")

    p = sub.add_parser("doctor", help="sanity checks of a config's model before training it (exit 1 if one fails)")
    p.add_argument("config", help="a YAML path or a shipped config name (see `jaxnn configs`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--overfit-steps", type=int, default=300, help="step budget to overfit 20 examples (default 300)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not read or write the persistent compilation cache")

    p = sub.add_parser("sweep", help="train every member of a config's sweep section as one population",
                       description="Train the variants a config's `sweep` section names (e.g. sweep: {optimizer.lr: "
                                   "{log_uniform: [1e-3, 1e-1], n: 4}, seed: [0, 1, 2]}) in one vmapped program; "
                                   "write sweep.csv/json, figures, and the best member as the run folder best/.")
    p.add_argument("config", help="a YAML path or a shipped config name (see `jaxnn configs`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set 'sweep.seed=[0, 1, 2]' (repeatable)")
    p.add_argument("--out", help="sweep folder (default: a fresh OUTPUT_DIR/NAME-sweep/version_N; with --resume the "
                                  "latest one)")
    p.add_argument("--curvature", action="store_true",
                   help="also measure every member's lambda_max and Hessian trace (one program for all)")
    p.add_argument("--resume", action="store_true", help="continue a killed sweep: finished chunks are not retrained")
    _add_runtime_args(p)

    sub.add_parser("configs", help="list the shipped configs")

    p = sub.add_parser("launch", help="run a jaxnn command as several local processes of one multi-host job",
                       description="Start P local processes of one jax.distributed job (coordinator on a free "
                                   "127.0.0.1 port, gloo CPU collectives), each running the given jaxnn command. "
                                   "Process 0's output is shown; a process that fails stops the others.")
    p.add_argument("--processes", type=int, required=True, help="number of processes (hosts) to start")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="CPU devices each process simulates (default: 1 on a CPU)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the whole job is stopped")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds the other processes get to stop by themselves after one fails (default 60)")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...: the jaxnn command every process runs")
    return parser


def _known_errors():
    from jaxnn.config import ConfigError
    from jaxnn.train import CheckpointError, NonFiniteLossError, RunFolderError
    return (ConfigError, CheckpointError, NonFiniteLossError, RunFolderError, FileNotFoundError, ValueError, KeyError)


def _prepare_runtime(args) -> None:
    """Process settings that must precede jax's start: quiet library logs, simulated devices, joining a multi-host
    job described by the environment, the persistent compilation cache."""
    from jaxnn import runtime

    if not args.debug:
        runtime.quiet_library_logs()
    if getattr(args, "devices", None) is not None:
        if args.devices < 1 and args.devices != -1:
            raise ValueError(f"--devices: expected a positive number of devices (or -1 for all), got {args.devices}")
        if args.devices > 0:
            runtime.simulate_cpu_devices(args.devices)
    if args.command != "launch":
        from jaxnn import parallel

        parallel.initialize_from_environment()
    if hasattr(args, "no_compile_cache"):
        if args.no_compile_cache:
            runtime.disable_compilation_cache()
        else:
            runtime.enable_compilation_cache()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "launch":  # no jax in the launcher: it only starts and watches the processes
        from jaxnn import launch

        from jaxnn.config import ConfigError
        from jaxnn.runfolders import RunFolderError

        try:
            job = _pin_job_folder(args.job)
            status = launch.launch(args.processes, job, devices_per_process=args.devices_per_process,
                                   timeout=args.timeout, grace=args.grace)
            if status and job != list(args.job) and job[-2] in ("--run-dir", "--out"):
                with contextlib.suppress(OSError):  # the folder claimed for the job, if the job left it empty
                    os.rmdir(job[-1])
            return status
        except (ValueError, ConfigError, RunFolderError, FileNotFoundError) as exc:
            print(f"jaxnn: error: {exc}", file=sys.stderr)
            return 2
    try:
        _prepare_runtime(args)
    except (OSError, RuntimeError, ValueError) as exc:
        if args.debug:
            raise
        print(f"jaxnn: error: {exc}", file=sys.stderr)
        return 2
    import jax

    precision = jax.enable_x64(True) if getattr(args, "x64", False) else contextlib.nullcontext()
    try:
        with precision:
            return _dispatch(args)
    except KeyboardInterrupt:
        print("jaxnn: interrupted; checkpoints written so far are intact (resume with --resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: the files are written, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _known_errors() as exc:
        if args.debug:
            raise
        print(f"jaxnn: error: {exc}", file=sys.stderr)
        return 2


def _experiment_command(args, progress: bool) -> int:
    from jaxnn import experiments as experiment
    from jaxnn.config import parse_overrides

    if args.list:
        for name in experiment.experiment_names():
            print(f"{name}: {experiment.load_experiment(name).CLAIM}")
        return 0
    if args.table:
        import pathlib

        readme = pathlib.Path(args.readme or pathlib.Path(args.results) / "README.md")
        rows = experiment.write_table(args.results, readme).count("\n") - 1  # less the header's two lines
        print(f"table of {rows} results from {args.results}/*/result.json written to {readme}")
        return 0
    if not args.name:
        raise ValueError(f"name an experiment (or --list): {', '.join(experiment.experiment_names())}")
    overrides = {key.removeprefix("--set "): value for key, value in parse_overrides(args.overrides).items()}
    record = experiment.run_experiment(args.name, smoke=args.smoke, overrides=overrides, out_dir=args.out,
                                       progress=progress)
    for check in record["checks"]:
        print(f"{'agrees   ' if check['agrees'] else 'DISAGREES'}  {check['check']}: {check['measured']}")
    print(f"{args.name}: {record['verdict']} ({record['size']} size, {record['wall_time_s']} s); "
          f"{args.out or 'results/' + args.name}/summary.md")
    return 0


def _config_overrides(args, progress: bool) -> list[str]:
    """A run/train/sweep command's config overrides: its --set items, the device count of --devices, and no
    training bar off a terminal (in a log file or a pipe it is carriage-return noise)."""
    quiet = [] if progress else ["train.progress=false"]
    return quiet + list(args.overrides) + ([f"parallel.devices={args.devices}"] if args.devices else [])


def _continue_config_folder(args) -> None:
    """``jaxnn train X/config.yaml --resume`` continues the run folder X (its config lies in it); ``jaxnn sweep
    S/config.yaml --resume`` the sweep folder S."""
    from jaxnn import runfolders

    sweep = args.command == "sweep"
    if args.resume and (args.out if sweep else args.run_dir) is None:
        folder = runfolders.run_folder_of_config(args.config, sweep=sweep)
        if folder is not None:
            setattr(args, "out" if sweep else "run_dir", str(folder))


def _latest_run(run_dir: str) -> str:
    """An analysis command given ``runs/NAME`` reads its latest ``version_N`` (and says so)."""
    import pathlib

    from jaxnn import runfolders

    latest = runfolders.latest_run(run_dir)
    if latest != pathlib.Path(run_dir):
        print(f"reading {latest} (the latest run in {run_dir})")
    return str(latest)


def _pin_job_folder(job: list[str]) -> list[str]:
    """Before ``jaxnn launch`` starts any process: the run (or sweep) folder a ``run``/``train``/``sweep`` job
    writes is resolved and checked here, so a refusal comes at once, and passed to every process as --run-dir
    (--out), so all of them write the same folder."""
    from jaxnn import config as config_lib, runfolders

    job = job[1:] if job and job[0] == "--" else list(job)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
            args = build_parser().parse_args(job)
    except SystemExit:
        return job  # not a jaxnn command: launch() says so
    if args.command not in ("run", "train", "sweep"):
        return job
    sweep = args.command == "sweep"
    pinned = args.out if sweep else args.run_dir
    if pinned is None and args.resume:
        pinned = runfolders.run_folder_of_config(args.config, sweep=sweep)
    cfg = config_lib.load_config(args.config, overrides=_config_overrides(args, progress=False))
    folder = runfolders.prepare(cfg, pinned, args.resume, sweep=sweep)
    if (args.out if sweep else args.run_dir) is None:
        # Claimed here (an exclusive mkdir), so a launch and a run started beside it never share a version_N.
        folder = runfolders.claim(folder, fresh=pinned is None and not args.resume)
        job += ["--out" if sweep else "--run-dir", str(folder)]
    return job


def _dispatch(args) -> int:
    from jaxnn import analysis, config as config_lib
    from jaxnn.plotting import FigureWorker

    if args.command == "configs":
        for name in config_lib.shipped_configs():
            print(name)
        return 0
    from jaxnn.parallel import is_primary

    primary = is_primary()  # with several processes, only process 0 draws figures (and writes the run folder)
    # Progress bars only on a terminal: in a log file or a pipe they are carriage-return noise. On a terminal
    # train.progress (default true) still turns the training bar off.
    progress = sys.stderr.isatty()
    config_overrides = lambda: _config_overrides(args, progress)  # noqa: E731  (run, train, sweep)
    # Figures are drawn by a background process while the next computation runs; all are written before exit.
    with FigureWorker(start=primary, preload=("jaxnn.curvature.plots", "jaxnn.landscape.plots")) as figures:
        draw = figures.submit if primary else (lambda *args, **kwargs: None)
        if args.command in ("run", "train"):
            cfg = config_lib.load_config(args.config, overrides=config_overrides())
            _continue_config_folder(args)
            report = analysis.run_report(cfg, run_dir=args.run_dir, resume=args.resume,
                                         analyse=args.command == "run" and not args.no_analysis, draw=draw,
                                         progress=progress, echo=print)
            figures.wait()
            print(f"run folder: {report['run_dir']}")
            return 0
        if getattr(args, "run_dir", None) is not None and args.command not in ("run", "train"):
            args.run_dir = _latest_run(args.run_dir)
        if args.command == "diagnose":
            stats = analysis.diagnose_run(args.run_dir, batch_size=args.batch_size, step=args.step, out_dir=args.out,
                                          layers=args.layers.split(",") if args.layers else None, draw=draw)
            print(stats.table())
            print(stats.gradient_noise.describe())
            figures.wait()
            return 0
        if args.command == "experiment":
            return _experiment_command(args, progress)
        if args.command == "doctor":
            from jaxnn.train import check_config, doctor

            try:
                cfg = check_config(config_lib.load_config(args.config, overrides=list(args.overrides)))
            except config_lib.ConfigError as error:
                print(doctor.table([doctor.Check("config is valid", "fail", str(error), "a valid config")]))
                return 1
            checks = doctor.doctor(cfg, overfit_steps=args.overfit_steps)
            print(doctor.table(checks))
            return 1 if any(check.status == "fail" for check in checks) else 0
        if args.command == "sweep":
            from jaxnn.train.sweep import run_sweep

            cfg = config_lib.load_config(args.config, overrides=config_overrides())
            _continue_config_folder(args)
            run_sweep(cfg, args.out, curvature=args.curvature, resume=args.resume, draw=draw)
            figures.wait()
            return 0
        if args.command == "curvature":
            report = analysis.curvature_for_run(args.run_dir, k=args.k, density=args.density,
                                                data_batches=args.data_batches, batch_size=args.batch_size,
                                                step=args.step, mode=args.mode, seed=args.seed, out_dir=args.out,
                                                draw=draw, devices=args.devices, progress=progress,
                                                blocks=args.blocks)
            print(analysis.describe_curvature(report))
            return 0
        if args.command == "laplace":
            report = analysis.laplace_for_run(args.run_dir, structure=args.structure, train_limit=args.train_limit,
                                              prior_precision=args.prior_precision, tune=args.tune, step=args.step,
                                              out_dir=args.out, draw=draw)
            print(analysis.describe_laplace(report))
            return 0
        if args.command == "influence":
            report = analysis.influence_for_run(args.run_dir, test_indices=tuple(args.test_index), top=args.top,
                                                damping=args.damping, method=args.method, tol=args.tol,
                                                max_iters=args.max_iters,
                                                train_limit=args.train_limit,
                                                data_batches=args.data_batches, step=args.step, out_dir=args.out,
                                                draw=draw)
            print(analysis.describe_influence(report))
            return 0
        if args.command == "landscape":
            report = analysis.landscape_for_run(args.run_dir, dirs=args.dirs, grid=args.grid, span=args.span,
                                                other=args.other, trajectory=args.trajectory,
                                                data_batches=args.data_batches, batch_size=args.batch_size,
                                                step=args.step, log_scale=args.log_scale, seed=args.seed,
                                                out_dir=args.out, draw=draw, devices=args.devices,
                                                split=args.split, progress=progress)
            print(analysis.describe_landscape(report))
            return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
