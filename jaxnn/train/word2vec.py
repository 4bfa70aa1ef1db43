"""Training word2vec's skip-gram with negative sampling and frequent-word subsampling (Mikolov et al. 2013).

Each epoch, on the host: every token w is kept with word2vec's probability (√(f_w/t) + 1)·t/f_w (f_w its share of
the corpus, t = ``subsample``; t = 0 keeps all), each kept token draws a window radius r ∈ {1..window} and pairs with
the kept tokens within r on each side, and the pairs are shuffled. On the device, each batch of pairs draws
``negatives`` noise contexts per pair from the unigram distribution raised to ``noise_power`` (0.75 in word2vec)
and takes one optimizer step on :func:`jaxnn.models.word2vec.negative_sampling_loss`; ``steps_per_call`` steps run
in one ``lax.scan`` (an epoch's remainder one step per call: every epoch reuses the same two compiled programs,
where a remainder of its own length compiled anew each epoch). The loss is the pure ``loss_fn(params, batch)`` of :func:`skipgram_loss_fn`, so the curvature
and landscape engines take it too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnn.models.word2vec import SkipGram, negative_sampling_loss
from jaxnn.validation import check_float, check_int


@dataclasses.dataclass(frozen=True)
class Word2VecOptions:
    """dim: vector size; window: the largest window radius; negatives: noise contexts per pair; subsample: t of
    the subsampling rule (0: off); noise_power: exponent of the noise distribution; batch_size: pairs per step;
    epochs; learning_rate: Adam's, decayed linearly to 0 over the run (word2vec decays its SGD rate the same way);
    steps_per_call: steps per compiled call; seed."""

    dim: int = 64
    window: int = 5
    negatives: int = 5
    subsample: float = 1e-3
    noise_power: float = 0.75
    batch_size: int = 512
    epochs: int = 5
    learning_rate: float = 0.01
    steps_per_call: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "window", "negatives", "batch_size", "epochs", "steps_per_call"):
            check_int(getattr(self, name), f"Word2VecOptions: {name}", allow_bool=False)
        check_int(self.seed, "Word2VecOptions: seed", minimum=0, allow_bool=False)
        check_float(self.subsample, "Word2VecOptions: subsample", minimum=0.0)
        check_float(self.noise_power, "Word2VecOptions: noise_power", minimum=0.0)
        check_float(self.learning_rate, "Word2VecOptions: learning_rate", minimum=0.0, exclusive_minimum=True)


@dataclasses.dataclass
class Word2VecResult:
    """params (``words`` input vectors and ``contexts`` output vectors), the model, the mean loss of every call, and
    the number of pairs each epoch produced."""

    params: Any
    model: SkipGram
    losses: list[float]
    pairs_per_epoch: list[int]

    @property
    def embeddings(self) -> np.ndarray:
        """The input vectors (vocab_size, dim): word2vec's word vectors."""
        return np.asarray(self.params["words"]["embedding"])


def keep_probabilities(counts: np.ndarray, subsample: float) -> np.ndarray:
    """word2vec's probability of keeping each word: min(1, (√(f/t) + 1)·t/f), f = count / total (1 where t = 0 or
    the word is absent)."""
    counts = np.asarray(counts, np.float64)
    if subsample == 0:
        return np.ones_like(counts)
    share = counts / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (np.sqrt(share / subsample) + 1) * subsample / share
    return np.where(share > 0, np.minimum(keep, 1.0), 1.0)


def skipgram_pairs(ids: np.ndarray, keep: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """(P, 2) int32 (word, context) pairs of one epoch, shuffled (see the module docstring)."""
    ids = np.asarray(ids)
    kept = ids[rng.random(len(ids)) < keep[ids]]
    reach = rng.integers(1, window + 1, size=len(kept))
    pairs = []
    for offset in range(1, window + 1):
        centres = np.flatnonzero(reach >= offset)
        right = centres[centres + offset < len(kept)]
        left = centres[centres - offset >= 0]
        pairs.append(np.stack([kept[right], kept[right + offset]], 1))
        pairs.append(np.stack([kept[left], kept[left - offset]], 1))
    pairs = np.concatenate(pairs).astype(np.int32)
    return pairs[rng.permutation(len(pairs))]


def noise_cdf(counts: Any, power: float = 0.75) -> jax.Array:
    """The cumulative noise distribution: counts^power, normalised, summed (float32)."""
    weights = np.asarray(counts, np.float64) ** power
    cdf = np.cumsum(weights / weights.sum())
    cdf[-1] = 1.0  # rounding must not leave mass past the last id
    return jnp.asarray(cdf, jnp.float32)


def draw_noise(key: jax.Array, cdf: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Token ids of ``shape`` drawn from the distribution whose cumulative sums are ``cdf``, by inverting the CDF
    (O(log V) per draw; ``jax.random.categorical`` would draw V Gumbel numbers per id)."""
    uniform = jax.random.uniform(key, shape, cdf.dtype)
    return jnp.minimum(jnp.searchsorted(cdf, uniform, side="right"), cdf.shape[0] - 1).astype(jnp.int32)


def skipgram_loss_fn(model: SkipGram) -> Callable:
    """The pure ``loss_fn(params, batch)``: batch (B, 2 + K) ids (word, context, noise contexts), mean loss."""
    def loss_fn(params, batch):
        return jnp.mean(negative_sampling_loss(model.apply({"params": params}, batch)))

    return loss_fn


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _train_steps(model, tx, negatives, params, opt_state, pairs, cdf, key):
    loss_fn = skipgram_loss_fn(model)

    def step(carry, inputs):
        params, opt_state = carry
        batch_pairs, step_key = inputs
        noise = draw_noise(step_key, cdf, (batch_pairs.shape[0], negatives))
        batch = jnp.concatenate([batch_pairs, noise.astype(batch_pairs.dtype)], axis=1)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    keys = jax.random.split(key, pairs.shape[0])
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (pairs, keys))
    return params, opt_state, jnp.mean(losses)


def train_word2vec(ids: Any, vocab_size: int, options: Word2VecOptions | None = None, *,
                   counts: Any = None, on_epoch: Callable[[int, Any], None] | None = None,
                   progress: bool = True) -> Word2VecResult:
    """Skip-gram vectors for the token stream ``ids`` (ints in [0, vocab_size)): see the module docstring.

    ``counts``: each token's corpus count for the subsampling and noise distributions (default: counted in
    ``ids``). ``on_epoch(epoch, params)`` runs after every epoch (epoch 1 first), e.g. to score analogies as
    training goes. Cost per epoch: P pairs · (1 + K) · dim multiply-adds twice (forward and backward), P ≈
    |kept tokens| · (window + 1)."""
    options = Word2VecOptions() if options is None else options
    if not isinstance(options, Word2VecOptions):
        raise TypeError(f"train_word2vec: options: expected Word2VecOptions, got {type(options).__name__}")
    vocab_size = check_int(vocab_size, "train_word2vec: vocab_size", minimum=2, allow_bool=False)
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"train_word2vec: ids: expected a 1-D integer token stream, got {ids.dtype} of shape "
                         f"{ids.shape}")
    if ids.size < 2:
        raise ValueError(f"train_word2vec: ids: expected at least 2 tokens, got {ids.size}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"train_word2vec: ids: expected token ids in [0, {vocab_size}), got ids in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    counts = np.bincount(ids, minlength=vocab_size) if counts is None else np.asarray(counts, np.float64)
    if counts.shape != (vocab_size,):
        raise ValueError(f"train_word2vec: counts: expected shape ({vocab_size},), got {counts.shape}")
    keep = keep_probabilities(counts, options.subsample)
    cdf = noise_cdf(counts, options.noise_power)

    rng = np.random.default_rng(options.seed)
    first = skipgram_pairs(ids, keep, options.window, rng)  # epochs draw their pairs one at a time (memory)
    if len(first) < options.batch_size:
        raise ValueError(f"train_word2vec: the corpus gives {len(first)} pairs in an epoch, fewer than "
                         f"batch_size={options.batch_size}")
    planned = len(first) // options.batch_size * options.epochs  # later epochs differ by a few pairs
    model = SkipGram(vocab_size, options.dim)
    key = jax.random.key(options.seed)
    init_key, key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1, 2 + options.negatives), jnp.int32))["params"]
    tx = optax.adam(optax.linear_schedule(options.learning_rate, 0.0, planned))
    opt_state = tx.init(params)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=planned, desc="word2vec", unit="step", leave=False)
    losses, pairs_per_epoch = [], []
    for epoch in range(1, options.epochs + 1):
        pairs = first if epoch == 1 else skipgram_pairs(ids, keep, options.window, rng)
        pairs_per_epoch.append(len(pairs))
        count = len(pairs) // options.batch_size
        batches = pairs[:count * options.batch_size].reshape(count, options.batch_size, 2)
        full = count - count % options.steps_per_call  # full calls, then single steps: two compiled shapes in all
        for begin, end in [(b, b + options.steps_per_call) for b in range(0, full, options.steps_per_call)] + [
                (b, b + 1) for b in range(full, count)]:
            key, call_key = jax.random.split(key)
            chunk = batches[begin:end]
            params, opt_state, loss = _train_steps(model, tx, options.negatives, params, opt_state, chunk,
                                                   cdf, call_key)
            losses.append(float(loss))
            if not np.isfinite(losses[-1]):
                raise FloatingPointError(f"train_word2vec: the loss became {losses[-1]} in epoch {epoch}; lower "
                                         f"learning_rate={options.learning_rate}")
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, params)
    if bar is not None:
        bar.close()
    return Word2VecResult(params=params, model=model, losses=losses, pairs_per_epoch=pairs_per_epoch)
