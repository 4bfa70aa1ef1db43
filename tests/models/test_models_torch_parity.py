"""The models against independently written PyTorch models with identical weights (float64, CPU).

Layout conversions: dense kernels (in, out) are torch weights (out, in); conv kernels HWIO are torch OIHW; jaxnn
images are NHWC and torch images NCHW, and jaxnn flattens conv features in (H, W, C) order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.models import get_model

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch


def _t(array):
    return torch.from_numpy(np.array(array, dtype=np.float64))


def _nchw(x):
    return _t(x).permute(0, 3, 1, 2)


def copy_dense(linear, p):
    linear.weight.data = _t(p["kernel"]).T.contiguous()
    linear.bias.data = _t(p["bias"])


def copy_conv(conv, p):
    conv.weight.data = _t(p["kernel"]).permute(3, 2, 0, 1).contiguous()
    if conv.bias is not None:
        conv.bias.data = _t(p["bias"])


def copy_norm(bn, p, stats):
    bn.weight.data = _t(p["scale"])
    bn.bias.data = _t(p["bias"])
    bn.running_mean.data = _t(stats["mean"])
    bn.running_var.data = _t(stats["var"])


def randomise(tree, seed):
    """Replace every leaf by a different random value (positive for scales and variances) so that a wrong
    layer, axis or transpose cannot go unnoticed."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape))
        std = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if "kernel" in name else 0.3
        return jnp.asarray(rng.normal(0.0, std, leaf.shape))

    return jax.tree_util.tree_map_with_path(draw, tree)


def jax_forward(model, params, state, x, train):
    variables = {"params": params, **state}
    if train:
        return model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    return model.apply(variables, jnp.asarray(x)), state


def test_mlp_with_batch_norm_matches_torch_in_train_and_eval_mode(x64, abstract_init):
    model = get_model("mlp", num_classes=4, features=[6, 5], activation="tanh", norm="batch")
    params, state = randomise(abstract_init(model, (3,)), seed=0)
    x = np.random.default_rng(1).normal(size=(7, 3)) * 2.0

    layers = [torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
              torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 4)]
    reference = torch.nn.Sequential(*layers).double()
    for i, (dense, norm) in enumerate([(0, 1), (3, 4)]):
        copy_dense(layers[dense], params[f"dense_{i}"])
        copy_norm(layers[norm], params[f"norm_{i}"], state["batch_stats"][f"norm_{i}"])
    copy_dense(layers[6], params["head"])

    reference.eval()
    logits, _ = jax_forward(model, params, state, x, train=False)
    np.testing.assert_allclose(np.asarray(logits), reference(_t(x)).detach().numpy(), rtol=1e-10, atol=1e-12)

    reference.train()
    logits, new_state = jax_forward(model, params, state, x, train=True)
    np.testing.assert_allclose(np.asarray(logits), reference(_t(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
    for i, norm in enumerate((1, 4)):
        ours = new_state["batch_stats"][f"norm_{i}"]
        old = state["batch_stats"][f"norm_{i}"]
        np.testing.assert_allclose(np.asarray(ours["mean"]), layers[norm].running_mean.numpy(), rtol=1e-10)
        # torch averages the unbiased batch variance (×n/(n−1)); jaxnn (like flax) the biased one.
        n = x.shape[0]
        ours_batch_var = (np.asarray(ours["var"]) - 0.9 * np.asarray(old["var"])) / 0.1
        torch_batch_var = (layers[norm].running_var.numpy() - 0.9 * np.asarray(old["var"])) / 0.1
        np.testing.assert_allclose(ours_batch_var * n / (n - 1), torch_batch_var, rtol=1e-9)


class TorchLeNet(torch.nn.Module):
    def __init__(self, in_channels, flat, padding, pool, activation, norm):
        super().__init__()
        pad = 2 if padding == "SAME" else 0
        self.conv = torch.nn.ModuleList([torch.nn.Conv2d(in_channels, 6, 5, padding=pad),
                                         torch.nn.Conv2d(6, 16, 5, padding=pad)])
        self.conv_norm = torch.nn.ModuleList([torch.nn.BatchNorm2d(c) if norm else torch.nn.Identity()
                                              for c in (6, 16)])
        self.dense = torch.nn.ModuleList([torch.nn.Linear(flat, 120), torch.nn.Linear(120, 84)])
        self.dense_norm = torch.nn.ModuleList([torch.nn.BatchNorm1d(c) if norm else torch.nn.Identity()
                                               for c in (120, 84)])
        self.head = torch.nn.Linear(84, 10)
        self.pool = F.max_pool2d if pool == "max" else F.avg_pool2d
        self.activation = activation

    def forward(self, x):
        for conv, norm in zip(self.conv, self.conv_norm):
            x = self.pool(self.activation(norm(conv(x))), 2)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        for dense, norm in zip(self.dense, self.dense_norm):
            x = self.activation(norm(dense(x)))
        return self.head(x)


@pytest.mark.parametrize(
    "side, padding, pool, activation, norm",
    [(8, "SAME", "max", "relu", "batch"), (32, "VALID", "avg", "tanh", None)],
)
def test_lenet_matches_torch(side, padding, pool, activation, norm, x64, abstract_init):
    model = get_model("lenet", num_classes=10, padding=padding, pool=pool, activation=activation, norm=norm)
    params, state = randomise(abstract_init(model, (side, side, 1)), seed=2)
    flat = params["dense_0"]["kernel"].shape[0]
    reference = TorchLeNet(1, flat, padding, pool, getattr(torch, activation), norm).double()
    for i in range(2):
        copy_conv(reference.conv[i], params[f"conv_{i}"])
        copy_dense(reference.dense[i], params[f"dense_{i}"])
        if norm:
            copy_norm(reference.conv_norm[i], params[f"conv_norm_{i}"], state["batch_stats"][f"conv_norm_{i}"])
            copy_norm(reference.dense_norm[i], params[f"dense_norm_{i}"], state["batch_stats"][f"dense_norm_{i}"])
    copy_dense(reference.head, params["head"])
    x = np.random.default_rng(3).normal(size=(3, side, side, 1))

    for train in (False, True):
        reference.train(train)
        logits, _ = jax_forward(model, params, state, x, train=train)
        np.testing.assert_allclose(np.asarray(logits), reference(_nchw(x)).detach().numpy(), rtol=1e-9, atol=1e-10)


class TorchBasicBlock(torch.nn.Module):
    """He et al. (2016) CIFAR basic block with the option-A shortcut, written from the paper."""

    def __init__(self, c_in, c_out, stride, plain, norm):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.norm1 = torch.nn.BatchNorm2d(c_out) if norm else torch.nn.Identity()
        self.norm2 = torch.nn.BatchNorm2d(c_out) if norm else torch.nn.Identity()
        self.stride, self.extra, self.plain = stride, c_out - c_in, plain

    def forward(self, x):
        out = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        if not self.plain:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            if self.extra:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            out = out + shortcut
        return F.relu(out)


class TorchCifarResNet(torch.nn.Module):
    def __init__(self, n, width, in_channels, classes, plain, norm):
        super().__init__()
        self.stem = torch.nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_norm = torch.nn.BatchNorm2d(width) if norm else torch.nn.Identity()
        blocks, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                blocks.append(TorchBasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1, plain, norm))
                c_in = c_out
        self.blocks = torch.nn.ModuleList(blocks)
        self.head = torch.nn.Linear(4 * width, classes)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("plain, norm", [(False, "batch"), (True, "batch"), (False, None)])
def test_cifar_resnet_matches_torch(plain, norm, x64, abstract_init):
    n, width = 1, 4
    model = get_model("plain" if plain else "resnet", depth=6 * n + 2, num_classes=10, base_width=width, norm=norm)
    params, state = randomise(abstract_init(model, (8, 8, 3)), seed=4)
    reference = TorchCifarResNet(n, width, 3, 10, plain, norm).double()
    stats = state.get("batch_stats", {})
    copy_conv(reference.stem, params["stem_conv"])
    if norm:
        copy_norm(reference.stem_norm, params["stem_norm"], stats["stem_norm"])
    names = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(n)]
    for block, name in zip(reference.blocks, names):
        for i in (1, 2):
            copy_conv(getattr(block, f"conv{i}"), params[name][f"conv{i}"])
            if norm:
                copy_norm(getattr(block, f"norm{i}"), params[name][f"norm{i}"], stats[name][f"norm{i}"])
    copy_dense(reference.head, params["head"])
    x = np.random.default_rng(5).normal(size=(4, 8, 8, 3))

    for train in (False, True):
        reference.train(train)
        logits, _ = jax_forward(model, params, state, x, train=train and norm is not None)
        np.testing.assert_allclose(np.asarray(logits), reference(_nchw(x)).detach().numpy(), rtol=1e-9, atol=1e-10)
