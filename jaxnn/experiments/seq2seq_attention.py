"""Sequence to sequence: reversed sources, attention and beam search (the seq2seq post; Sutskever et al. 2014,
Bahdanau et al. 2015, Luong et al. 2015).

The task is copying strings of ``length`` letters (``jaxnn.data.sequences``, problem "copy"): answer token i comes
from source token i, the monotone alignment translation mostly has, which is what reversing the source was for
(the first answer tokens then sit next to their source tokens: short dependencies). An LSTM encoder–decoder
(:class:`jaxnn.models.Seq2Seq`) is trained by Adam with teacher forcing in four settings: without attention, the
source in order and reversed; with ("general") attention, in order and reversed; each from several seeds, on the
same data. Training speed is the number of steps until the teacher-forced token accuracy on the validation split
first reaches ``target`` (checked every ``eval_every`` steps; a run that never does counts as not reaching it).
At the end, held-out strings are decoded greedily and by beam search; the score is the fraction answered exactly.
"""

from __future__ import annotations

import numpy as np

CLAIM = ("Reversing the source sequence and adding attention each shorten the training of an encoder–decoder, and "
         "beam search answers more held-out sequences exactly than greedy decoding.")
CONFIG = {"length": 12, "alphabet": 10, "examples": 20000, "hidden": 64, "embed_dim": 32, "lr": 0.003,
          "clip_norm": 1.0, "batch_size": 64, "steps": 1500, "eval_every": 50, "target": 0.8, "beam_size": 4,
          "decode_examples": 1000, "seeds": [0, 1, 2]}
SMOKE = {"length": 5, "examples": 2000, "hidden": 24, "steps": 150, "eval_every": 25, "target": 0.5,
         "decode_examples": 200, "seeds": [0]}
SETTINGS = {"no attention, source in order": (None, False), "no attention, source reversed": (None, True),
            "attention, source in order": ("general", False), "attention, source reversed": ("general", True)}


def steps_to_target(history: list[dict], target: float) -> int | None:
    """The first logged step whose ``val_accuracy`` is at least ``target`` (None if none is)."""
    return next((row["step"] for row in history if row.get("val_accuracy", -1.0) >= target), None)


def _train(config, attention, reverse_source, seed, progress):
    import jax
    import optax

    from jaxnn import data, models
    from jaxnn.train import create_train_state, fit

    dataset = data.load_dataset("seq2seq", problem="copy", num_examples=config["examples"], length=config["length"],
                                alphabet=config["alphabet"], reverse_source=reverse_source, val_fraction=0.05,
                                test_fraction=0.05)
    model = models.get_model("seq2seq", num_classes=dataset.num_classes, hidden=config["hidden"],
                             embed_dim=config["embed_dim"], attention=attention)
    tx = optax.chain(optax.clip_by_global_norm(config["clip_norm"]), optax.adam(config["lr"]))
    state = create_train_state(model, tx, dataset.input_shape, jax.random.PRNGKey(seed))
    result = fit(state, dataset, loss="sequence_cross_entropy", batch_size=config["batch_size"],
                 num_steps=config["steps"], eval_every=config["eval_every"], log_every=config["eval_every"],
                 seed=seed, progress=progress)
    x, y = dataset.test.x[:config["decode_examples"]], dataset.test.y[:config["decode_examples"]]
    greedy = models.greedy_decode(model, result.state.params, x)
    beam, _ = models.beam_search(model, result.state.params, x, beam_size=config["beam_size"])
    curve = [(row["step"], row["val_accuracy"]) for row in result.history if "val_accuracy" in row]
    return {"seed": seed, "steps_to_target": steps_to_target(result.history, config["target"]),
            "final_val_accuracy": curve[-1][1], "greedy_accuracy": models.sequence_accuracy(greedy, y),
            "beam_accuracy": models.sequence_accuracy(beam, y), "curve": curve}


def _faster(a: int | None, b: int | None) -> bool:
    """Whether a run that reached the target at step ``a`` was faster than one at ``b`` (None: not reached)."""
    return a is not None and (b is None or a < b)


def run(config: dict, out_dir, progress: bool = True):
    from jaxnn.experiments import Result

    runs = {name: [_train(config, attention, reverse, seed, progress) for seed in config["seeds"]]
            for name, (attention, reverse) in SETTINGS.items()}
    measured = {name: [{k: v for k, v in row.items() if k != "curve"} for row in rows] for name, rows in runs.items()}
    budget, target, seeds = config["steps"], config["target"], len(config["seeds"])

    def reached(rows):
        return ", ".join(str(r["steps_to_target"]) if r["steps_to_target"] else f"> {budget}" for r in rows)

    def faster_every_seed(first, second):
        return all(_faster(a["steps_to_target"], b["steps_to_target"]) for a, b in zip(runs[first], runs[second]))

    checks = [
        (f"without attention, reversing the source reaches {target:.0%} validation token accuracy in fewer steps, "
         f"in each of {seeds} seeds", f"reversed: {reached(runs['no attention, source reversed'])}; in order: "
         f"{reached(runs['no attention, source in order'])}",
         faster_every_seed("no attention, source reversed", "no attention, source in order")),
        (f"with the source in order, attention reaches {target:.0%} in fewer steps than no attention, in each of "
         f"{seeds} seeds", f"attention: {reached(runs['attention, source in order'])}; none: "
         f"{reached(runs['no attention, source in order'])}",
         faster_every_seed("attention, source in order", "no attention, source in order")),
    ]
    beam_rows = [(name, row) for name in ("no attention, source in order", "no attention, source reversed")
                 for row in runs[name]]
    checks.append((f"beam search (beam {config['beam_size']}) answers more held-out strings exactly than greedy "
                   f"decoding, for every model without attention ({len(beam_rows)} runs)",
                   "; ".join(f"{name.split(', ')[1]}, seed {row['seed']}: {row['beam_accuracy']:.3f} vs "
                             f"{row['greedy_accuracy']:.3f}" for name, row in beam_rows),
                   all(row["beam_accuracy"] > row["greedy_accuracy"] for _, row in beam_rows)))
    reported = [(f"{name}: validation token accuracy after {budget} steps; exact answers greedy / beam",
                 "; ".join(f"seed {r['seed']}: {r['final_val_accuracy']:.3f}; {r['greedy_accuracy']:.3f} / "
                           f"{r['beam_accuracy']:.3f}" for r in rows)) for name, rows in runs.items()]
    _plot(runs, target, out_dir / "seq2seq_attention.png")
    return Result(measured=measured, checks=checks, reported=reported, figures=["seq2seq_attention.png"],
                  data=f"copying {config['length']} letters of {config['alphabet']} ({config['examples']} distinct "
                       f"strings, 90/5/5 split, exact answers scored on {config['decode_examples']} test strings)")


def _plot(runs, target, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for index, (name, rows) in enumerate(runs.items()):
        for row in rows:
            steps, accuracy = np.array(row["curve"]).T
            ax.plot(steps, accuracy, color=f"C{index}", alpha=0.8, label=name if row is rows[0] else None)
    ax.axhline(target, color="gray", linestyle=":", label=f"target {target:.0%}")
    ax.set_xlabel("step"), ax.set_ylabel("validation token accuracy (teacher forcing)")
    ax.set_title("copying strings: encoder–decoder training"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
