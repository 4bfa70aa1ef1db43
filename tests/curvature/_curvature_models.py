"""Small pure-JAX models and losses shared by the curvature tests.

Parameters and data are generated with numpy (no device programs to compile) and the functions are module-level,
so compiled operator programs are shared between tests.
"""

from __future__ import annotations

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

MLP_SIZES = (6, 12, 3)  # 6*12 + 12 + 12*3 + 3 = 123 parameters
IMAGE_SHAPE = (6, 6, 1)
NUM_CLASSES = 3


def mlp_params(seed=0, sizes=MLP_SIZES, dtype=np.float64):
    d, h, c = sizes
    rng = np.random.default_rng(seed)
    return {
        "dense1": {"kernel": rng.normal(size=(d, h)) / np.sqrt(d), "bias": 0.1 * rng.normal(size=h)},
        "dense2": {"kernel": rng.normal(size=(h, c)) / np.sqrt(h), "bias": 0.1 * rng.normal(size=c)},
    } if dtype == np.float64 else jax.tree.map(lambda a: a.astype(dtype), mlp_params(seed, sizes))


def mlp_predict(params, x):
    hidden = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return hidden @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def cross_entropy(logits, labels):
    """Batch-mean softmax cross-entropy with integer labels (natural log)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_loss(params, batch):
    x, y = batch
    return cross_entropy(mlp_predict(params, x), y)


def classification_data(seed=1, num_examples=32, num_features=MLP_SIZES[0], num_classes=NUM_CLASSES):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, num_features))
    y = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
    return x, y


def cnn_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv1": {"kernel": rng.normal(size=(3, 3, 1, 4)) / 3.0, "bias": 0.1 * rng.normal(size=4)},
        "conv2": {"kernel": rng.normal(size=(3, 3, 4, 4)) / 6.0, "bias": np.zeros(4)},
        "dense": {"kernel": rng.normal(size=(4, NUM_CLASSES)) / 2.0, "bias": np.zeros(NUM_CLASSES)},
    }


def _conv(x, kernel, bias, padding):
    out = jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


def cnn_predict(params, x):
    h = jnp.tanh(_conv(x, params["conv1"]["kernel"], params["conv1"]["bias"], "SAME"))
    h = jnp.tanh(_conv(h, params["conv2"]["kernel"], params["conv2"]["bias"], "VALID"))
    return h.mean(axis=(1, 2)) @ params["dense"]["kernel"] + params["dense"]["bias"]


def cnn_loss(params, batch):
    x, y = batch
    return cross_entropy(cnn_predict(params, x), y)


def image_data(seed=1, num_examples=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples,) + IMAGE_SHAPE)
    y = rng.integers(0, NUM_CLASSES, size=num_examples).astype(np.int32)
    return x, y


def quadratic_loss(matrix, params, batch):
    """½ θᵀAθ (the batch is ignored); use as jax.tree_util.Partial(quadratic_loss, A)."""
    return 0.5 * params @ (matrix @ params)


def quadratic(matrix):
    return jax.tree_util.Partial(quadratic_loss, jnp.asarray(matrix))


def matrix_with_spectrum(eigenvalues, seed=0):
    """A = U diag(λ) Uᵀ with a random orthogonal U (float64 numpy)."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(eigenvalues.size, eigenvalues.size)))
    matrix = (basis * eigenvalues) @ basis.T
    return 0.5 * (matrix + matrix.T)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def random_like(seed, params):
    """A random numpy pytree shaped like params."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.normal(size=np.shape(p)), params)


@functools.partial(jax.jit, static_argnums=0)
def _dense_hessian(loss_fn, params, batch):
    flat_params, unravel = jax.flatten_util.ravel_pytree(params)
    return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat_params)


def dense_hessian_of(loss_fn, params, batch):
    """Oracle: jax.hessian of the loss over the flattened parameters (numpy); compiled once per loss and shapes."""
    return np.asarray(_dense_hessian(loss_fn, jax.tree.map(jnp.asarray, params), batch))


def tiny_conv_net():
    """A Flax conv(3x3, 1->2, tanh) - dense(3) classifier in float64 (layers Conv_0, Dense_0) for 4x4x1 images."""
    import flax.linen as nn
    import jax.numpy as jnp

    class TinyConvNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.tanh(nn.Conv(2, (3, 3), padding="SAME", param_dtype=jnp.float64)(x))
            return nn.Dense(3, param_dtype=jnp.float64)(x.reshape((x.shape[0], -1)))

    return TinyConvNet()
