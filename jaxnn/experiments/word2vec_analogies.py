"""word2vec's analogies (the word2vec post; Mikolov et al. 2013, "Distributed representations of words and phrases").

Skip-gram vectors with negative sampling (:func:`jaxnn.train.train_word2vec`) are trained on a corpus and scored on
analogy questions in word2vec's ``questions-words.txt`` format (3CosAdd, a, b and c excluded) and on neighbours: the
fraction of planted word pairs (each question's a and b) whose partner is among a word's ``neighbours`` nearest.

By default the corpus is the generated language of :mod:`jaxnn.data.language`, whose relations (gender, plural,
capital–country, country–language) are planted, so every question has a known answer the corpus supports; with
``corpus`` a text file (text8, say) and ``analogies`` a questions-words.txt, the same measurements run on them.
Compared: the scores after each epoch (training), the number of noise samples K, and frequent-word subsampling
(t = ``subsample`` against none) — the post's claims that subsampling speeds training up and improves the vectors.
"""

from __future__ import annotations

import time

import numpy as np

CLAIM = ("Analogy accuracy and neighbours improve with training and with more negative samples, and subsampling "
         "frequent words makes training faster and the vectors better.")
CONFIG = {"corpus": "generated", "analogies": None, "sentences": 10000, "dim": 32, "window": 5, "epochs": 4,
          "learning_rate": 0.01, "batch_size": 512, "negatives": [1, 2, 5, 15], "default_negatives": 5,
          "subsample": 1e-3, "neighbours": 5, "margin": 0.05, "seeds": [0, 1, 2]}
SMOKE = {"sentences": 2000, "dim": 16, "epochs": 2, "negatives": [1, 5], "seeds": [0]}


def corpus_and_questions(config: dict):
    """(token ids, vocabulary, {section: question ids (N, 4)}, skipped questions) of the configured corpus."""
    from jaxnn.data import language, text

    if config["corpus"] == "generated":
        corpus = " ".join(language.generate_sentences(config["sentences"], seed=0))
    else:
        corpus = text.read_corpus_file(config["corpus"])
    tokens = text.tokenize(corpus, "word")
    vocabulary = text.Vocabulary.build(tokens)
    source = language.analogies_text() if config["analogies"] is None else config["analogies"]
    questions, skipped = text.read_analogies(source, vocabulary)
    return vocabulary.encode(tokens), vocabulary, questions, skipped


def neighbour_hits(embeddings, pairs: np.ndarray, k: int) -> float:
    """The fraction of (a, b) pairs with b among the k nearest neighbours (cosine) of a."""
    from jaxnn import models

    ids, _ = models.nearest_neighbours(embeddings, pairs[:, 0], k)
    return float(np.mean([b in row for b, row in zip(pairs[:, 1], ids)]))


def _train(ids, vocabulary, questions, config, negatives, subsample, seed, progress):
    from jaxnn import models
    from jaxnn.train import Word2VecOptions, train_word2vec

    every = np.concatenate(list(questions.values()))
    pairs = np.unique(every[:, :2], axis=0)
    scores = []

    ends, resumed = [], []

    def score(epoch, params):
        vectors = np.asarray(params["words"]["embedding"])  # waits for the epoch's last step
        ends.append(time.perf_counter())
        scores.append({"epoch": epoch, "accuracy": models.analogy_accuracy(vectors, every),
                       "neighbours": neighbour_hits(vectors, pairs, config["neighbours"])})
        resumed.append(time.perf_counter())  # scoring is not training time

    options = Word2VecOptions(dim=config["dim"], window=config["window"], negatives=negatives, subsample=subsample,
                              batch_size=config["batch_size"], epochs=config["epochs"],
                              learning_rate=config["learning_rate"], seed=seed)
    started = time.perf_counter()
    result = train_word2vec(ids, len(vocabulary), options, on_epoch=score, progress=progress)
    epochs = np.array(ends) - np.array([started] + resumed[:-1])  # the first includes compiling
    sections = {name: models.analogy_accuracy(result.embeddings, rows) for name, rows in questions.items()}
    return {"negatives": negatives, "subsample": subsample, "seed": seed, "by_epoch": scores,
            "sections": sections, "pairs_per_epoch": result.pairs_per_epoch[0],
            "first_epoch_seconds": float(epochs[0]),
            "steady_epoch_seconds": float(np.median(epochs[1:])) if len(epochs) > 1 else float("nan"),
            "final_loss": result.losses[-1]}


def run(config: dict, out_dir, progress: bool = True):
    from jaxnn.experiments import Result

    ids, vocabulary, questions, skipped = corpus_and_questions(config)
    seeds, k, t, margin = config["seeds"], config["default_negatives"], config["subsample"], config["margin"]
    by_negatives = {K: [_train(ids, vocabulary, questions, config, K, t, seed, progress) for seed in seeds]
                    for K in config["negatives"]}
    unsampled = [_train(ids, vocabulary, questions, config, k, 0.0, seed, progress) for seed in seeds]
    default = by_negatives[k]
    first_k = min(config["negatives"])

    def final(run, key="accuracy"):
        return run["by_epoch"][-1][key]

    def series(rows, key):
        return "; ".join(f"seed {r['seed']}: " + " → ".join(f"{e[key]:.3f}" for e in r["by_epoch"]) for r in rows)

    checks = [
        (f"analogy accuracy rises with training: after the last of {config['epochs']} epochs above the first by ≥ "
         f"{margin:g} (K = {k}, each of {len(seeds)} seeds)", series(default, "accuracy"),
         all(final(r) >= r["by_epoch"][0]["accuracy"] + margin for r in default)),
        (f"neighbours improve with training: planted partners among the {config['neighbours']} nearest, last epoch "
         f"above the first (each seed)", series(default, "neighbours"),
         all(final(r, "neighbours") > r["by_epoch"][0]["neighbours"] for r in default)),
        (f"more negative samples help: K = {k} above K = {first_k} by ≥ {margin:g} in analogy accuracy (each seed)",
         "; ".join(f"seed {a['seed']}: {final(a):.3f} vs {final(b):.3f}" for a, b in zip(default,
                                                                                         by_negatives[first_k])),
         all(final(a) >= final(b) + margin for a, b in zip(default, by_negatives[first_k]))),
        (f"subsampling (t = {t:g}) cuts the training pairs at least in half and the time of an epoch (steady state: "
         f"the median of epochs 2 on; each seed)",
         "; ".join(f"seed {a['seed']}: {a['pairs_per_epoch']:,} vs {b['pairs_per_epoch']:,} pairs per epoch, "
                   f"{a['steady_epoch_seconds']:.2f} s vs {b['steady_epoch_seconds']:.2f} s"
                   for a, b in zip(default, unsampled)),
         all(2 * a["pairs_per_epoch"] <= b["pairs_per_epoch"] and a["steady_epoch_seconds"] < b["steady_epoch_seconds"]
             for a, b in zip(default, unsampled))),
        (f"subsampling improves the vectors: analogy accuracy above no subsampling by ≥ {margin:g} (each seed)",
         "; ".join(f"seed {a['seed']}: {final(a):.3f} vs {final(b):.3f}" for a, b in zip(default, unsampled)),
         all(final(a) >= final(b) + margin for a, b in zip(default, unsampled))),
    ]
    counts = np.bincount(ids, minlength=len(vocabulary))
    reported = [
        ("analogy accuracy by K (mean over seeds, last epoch)",
         ", ".join(f"K={K}: {np.mean([final(r) for r in rows]):.3f}" for K, rows in by_negatives.items())),
        ("by section, K = {k}, subsampling against none (mean over seeds)".format(k=k),
         "; ".join(f"{name}: {np.mean([r['sections'][name] for r in default]):.3f} vs "
                   f"{np.mean([r['sections'][name] for r in unsampled]):.3f} (median word count "
                   f"{int(np.median(counts[np.unique(questions[name])]))})" for name in questions)),
        ("first epoch, compiling included: with subsampling against without (seconds)",
         "; ".join(f"seed {a['seed']}: {a['first_epoch_seconds']:.1f} vs {b['first_epoch_seconds']:.1f}"
                   for a, b in zip(default, unsampled))),
        ("questions skipped (a word outside the vocabulary)", str(skipped)),
    ]
    measured = {"by_negatives": {str(K): rows for K, rows in by_negatives.items()}, "no_subsampling": unsampled,
                "vocabulary_size": len(vocabulary), "corpus_tokens": int(len(ids)),
                "questions": {name: len(rows) for name, rows in questions.items()}}
    _plot(by_negatives, unsampled, k, out_dir / "word2vec_analogies.png")
    source = (f"the generated language ({config['sentences']} sentences, {len(ids):,} words, {len(vocabulary)} "
              f"distinct) and its planted analogies" if config["corpus"] == "generated" else
              f"{config['corpus']} ({len(ids):,} words) and {config['analogies']}")
    return Result(measured=measured, checks=checks, reported=reported, figures=["word2vec_analogies.png"],
                  data=source)


def _plot(by_negatives, unsampled, k, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    curves = {f"K = {K}": rows for K, rows in by_negatives.items()}
    curves[f"K = {k}, no subsampling"] = unsampled
    for index, (name, rows) in enumerate(curves.items()):
        for key, ax in (("accuracy", left), ("neighbours", right)):
            values = np.array([[e[key] for e in r["by_epoch"]] for r in rows])
            epochs = np.arange(1, values.shape[1] + 1)
            ax.errorbar(epochs, values.mean(0), yerr=values.std(0), color=f"C{index}", capsize=3, label=name,
                        linestyle="--" if "no subsampling" in name else "-")
    left.set_ylabel("analogy accuracy (3CosAdd)"), right.set_ylabel("planted partner among the nearest")
    for ax in (left, right):
        ax.set_xticks(epochs), ax.set_xlabel("epoch"), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.suptitle("skip-gram with negative sampling (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
