"""Cross-framework check: the same MLP weights in PyTorch (float64) give the same HVP and top eigenvalue."""

import jax
import numpy as np
import pytest

import jaxnn.curvature as curvature
from _curvature_models import classification_data, dense_hessian_of, flat, mlp_loss, mlp_params, random_like

pytestmark = pytest.mark.torch


def _torch_mlp(torch, params, x, y):
    tensors = {
        name: torch.tensor(np.asarray(params[layer][kind]), dtype=torch.float64, requires_grad=True)
        for name, (layer, kind) in {
            "w1": ("dense1", "kernel"), "b1": ("dense1", "bias"), "w2": ("dense2", "kernel"), "b2": ("dense2", "bias"),
        }.items()
    }
    inputs, labels = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.long)

    def loss():
        hidden = torch.tanh(inputs @ tensors["w1"] + tensors["b1"])
        return torch.nn.functional.cross_entropy(hidden @ tensors["w2"] + tensors["b2"], labels)

    return tensors, loss


def _torch_hvp(torch, tensors, loss, vector):
    """PyHessian's product: double backward through the gradient (create_graph=True)."""
    names = ["w1", "b1", "w2", "b2"]
    grads = torch.autograd.grad(loss(), [tensors[n] for n in names], create_graph=True)
    products = torch.autograd.grad(grads, [tensors[n] for n in names], grad_outputs=[vector[n] for n in names])
    return dict(zip(names, products))


def _as_torch_vector(torch, tree):
    return {
        "w1": torch.tensor(np.asarray(tree["dense1"]["kernel"])), "b1": torch.tensor(np.asarray(tree["dense1"]["bias"])),
        "w2": torch.tensor(np.asarray(tree["dense2"]["kernel"])), "b2": torch.tensor(np.asarray(tree["dense2"]["bias"])),
    }


def _jax_order(product):
    # ravel_pytree order: dense1/bias, dense1/kernel, dense2/bias, dense2/kernel
    return np.concatenate([product[n].detach().numpy().ravel() for n in ("b1", "w1", "b2", "w2")])


def test_hvp_and_top_eigenvalue_match_pytorch(x64):
    torch = pytest.importorskip("torch")
    params, (x, y) = mlp_params(0), classification_data(1)
    tensors, loss = _torch_mlp(torch, params, x, y)
    op = curvature.hessian(mlp_loss, params, (x, y))
    assert float(op.loss_value()) == pytest.approx(loss().item(), rel=1e-12)

    v = random_like(3, params)
    torch_product = _jax_order(_torch_hvp(torch, tensors, loss, _as_torch_vector(torch, v)))
    jax_product = flat(op(v))
    np.testing.assert_allclose(jax_product, torch_product, rtol=1e-5, atol=1e-5 * np.abs(torch_product).max())

    # PyHessian-style power iteration in PyTorch.
    exact = np.linalg.eigvalsh(dense_hessian_of(mlp_loss, params, (x, y)))
    assert abs(exact[-1]) > abs(exact[0])  # the dominant eigenvalue is the top one here
    generator = torch.Generator().manual_seed(0)
    vector = {n: torch.randn(t.shape, generator=generator, dtype=torch.float64) for n, t in tensors.items()}
    eigenvalue = None
    for _ in range(2000):
        norm = torch.sqrt(sum((u * u).sum() for u in vector.values()))
        vector = {n: u / norm for n, u in vector.items()}
        product = _torch_hvp(torch, tensors, loss, vector)
        new_eigenvalue = sum((product[n] * vector[n]).sum() for n in vector).item()
        vector = {n: p.detach() for n, p in product.items()}
        if eigenvalue is not None and abs(new_eigenvalue - eigenvalue) <= 1e-12 * abs(new_eigenvalue):
            eigenvalue = new_eigenvalue
            break
        eigenvalue = new_eigenvalue
    top, _ = curvature.top_eigenvalues(op, k=1, key=jax.random.key(1), num_iters=80, progress=False)
    power = curvature.power_iteration(op, jax.random.key(2), num_iters=2000, tol=1e-12, progress=False)
    assert float(top[0]) == pytest.approx(eigenvalue, rel=1e-5)
    assert float(power.eigenvalues[0]) == pytest.approx(eigenvalue, rel=1e-5)
    assert eigenvalue == pytest.approx(exact[-1], rel=1e-5)
