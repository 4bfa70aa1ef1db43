"""Output: .npz round trip, plots (PNG files, NaN gaps, one colour scale), the report and its writer; bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnn.landscape import (
    Surface,
    landscape_report,
    load_surface,
    load_surfaces,
    plot_contour,
    plot_contours_side_by_side,
    plot_line,
    plot_surface_3d,
    save_surface,
    save_surfaces,
    shared_color_limits,
    write_landscape_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plane(offset=0.0, nan_block=False):
    alphas, betas = np.linspace(-1, 1, 9), np.linspace(-2, 2, 7)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
    loss = 1.0 + offset + grid_a**2 + 0.5 * grid_b**2
    nonfinite = 0
    if nan_block:
        loss[1:3, 2:4] = np.nan
        nonfinite = 4
    return Surface(kind="plane", alphas=alphas, betas=betas,
                   metrics={"loss": loss, "accuracy": 1.0 / (1.0 + grid_a**2)},
                   nonfinite_counts={"loss": nonfinite, "accuracy": 0},
                   directions=({"kind": "filter_normalized", "seed": [0, 1], "options": {"ignore": "biasbn"}},
                               {"kind": "filter_normalized", "seed": [0, 2], "options": {"ignore": "biasbn"}}),
                   num_examples=100, num_batches=2, timing={"run_seconds": 0.5})


def _line(kind="line"):
    alphas = np.linspace(-0.5, 1.5, 11)
    loss = (alphas - 0.3) ** 2 + 0.2
    loss[4] = np.nan
    return Surface(kind=kind, alphas=alphas, betas=None, metrics={"loss": loss}, nonfinite_counts={"loss": 1})


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def test_npz_round_trip_keeps_grid_metrics_nan_directions_and_trajectory(tmp_path):
    plane, line = _plane(nan_block=True), _line()
    path = save_surfaces(tmp_path / "out.npz", {"plane": plane, "line": line},
                         trajectory=([0.0, 0.5], [0.0, -0.25]), metadata={"dirs": "filter"})
    surfaces, extra = load_surfaces(path)
    assert set(surfaces) == {"plane", "line"}
    for name, original in (("plane", plane), ("line", line)):
        loaded = surfaces[name]
        assert loaded.kind == original.kind
        np.testing.assert_array_equal(loaded.alphas, original.alphas)
        for metric in original.metrics:
            np.testing.assert_array_equal(loaded.metrics[metric], original.metrics[metric])  # NaN == NaN here
        assert loaded.nonfinite_counts == original.nonfinite_counts
        assert loaded.directions == original.directions
    np.testing.assert_array_equal(surfaces["plane"].betas, plane.betas)
    np.testing.assert_array_equal(extra["trajectory"][1], [0.0, -0.25])
    assert extra["metadata"] == {"dirs": "filter"}
    # a plain numpy reader sees the documented layout
    with np.load(path) as archive:
        assert str(archive["format"]) == "jaxnn.landscape/1"
        assert archive["plane.metric.loss"].shape == (9, 7)
    single = save_surface(tmp_path / "single.npz", line)
    assert load_surface(single).kind == "line"


def test_npz_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no surface file at"):
        load_surfaces(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(ValueError, match="corrupt.npz' is not a readable .npz surface file"):
        load_surfaces(corrupt)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(ValueError, match="expected format 'jaxnn.landscape/1', got no 'format' entry"):
        load_surfaces(foreign)
    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, **{"format": np.asarray("jaxnn.landscape/1"), "s.kind": np.asarray("line")})
    with pytest.raises(ValueError, match="surface 's' is incomplete or corrupt"):
        load_surfaces(truncated)
    with pytest.raises(ValueError, match="path: expected a file name ending in .npz"):
        save_surface(tmp_path / "out.txt", _line())
    with pytest.raises(ValueError, match="expected one surface, got"):
        load_surface(save_surfaces(tmp_path / "two.npz", {"a": _line(), "b": _line()}))


def test_plots_write_pngs_with_nan_gaps_and_log_scale(tmp_path):
    plane = _plane(nan_block=True)
    plot_line([_line(), _line("interpolation")], tmp_path / "line.png", labels=["a", "b"], log_scale=True)
    plot_contour(plane, tmp_path / "contour.png", trajectory=([0.0, 0.3, 0.5], [0.0, -0.2, 0.1]), log_scale=True)
    plot_surface_3d(plane, tmp_path / "surface.png", log_scale=True)
    plot_contour(plane, tmp_path / "accuracy.png", metric="accuracy")
    for name in ("line.png", "contour.png", "surface.png", "accuracy.png"):
        assert _is_png(tmp_path / name)


def test_side_by_side_uses_one_colour_scale(tmp_path):
    low, high = _plane(), _plane(offset=10.0, nan_block=True)
    vmin, vmax = shared_color_limits([low, high])
    assert vmin == np.nanmin(low.losses) and vmax == np.nanmax(high.losses)
    figure = plot_contours_side_by_side([low, high], tmp_path / "side.png", titles=["A", "B"])
    assert _is_png(tmp_path / "side.png")
    norms = {(c.norm.vmin, c.norm.vmax) for axis in figure.axes[:2] for c in axis.collections[:1]}
    assert norms == {(vmin, vmax)}
    # separate plots with explicit limits get the same scale too
    first = plot_contour(low, vmin=vmin, vmax=vmax)
    assert (first.axes[0].collections[0].norm.vmin, first.axes[0].collections[0].norm.vmax) == (vmin, vmax)


def test_plot_bad_input(tmp_path):
    plane, line = _plane(), _line()
    negative = Surface(kind="line", alphas=np.arange(3.0), betas=None, metrics={"loss": np.array([1.0, -1.0, 2.0])},
                       nonfinite_counts={"loss": 0})
    with pytest.raises(ValueError, match="log_scale: metric 'loss' needs positive values, got minimum -1"):
        plot_line(negative, log_scale=True)
    with pytest.raises(ValueError, match="surface: expected a 2-D \\(plane\\) surface, got a 1-D 'line' surface"):
        plot_contour(line)
    with pytest.raises(ValueError, match="metric: expected one of \\['accuracy', 'loss'\\]"):
        plot_surface_3d(plane, metric="error")
    with pytest.raises(ValueError, match="vmin/vmax: expected vmin < vmax, got 5.0 and 1.0"):
        plot_contour(plane, vmin=5.0, vmax=1.0)
    with pytest.raises(ValueError, match="titles: expected 2 entries"):
        plot_contours_side_by_side([plane, plane], titles=["only one"])
    with pytest.raises(ValueError, match="trajectory: expected \\(alphas, betas\\) of equal 1-D shape"):
        plot_contour(plane, trajectory=([0.0, 1.0], [0.0]))
    all_nan = Surface(kind="plane", alphas=np.arange(2.0), betas=np.arange(2.0), metrics={"loss": np.full((2, 2), np.nan)},
                      nonfinite_counts={"loss": 4})
    with pytest.raises(ValueError, match="metric 'loss' has no finite value"):
        plot_contour(all_nan)


def _tiny_problem():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"dense1": {"kernel": jax.random.normal(k[0], (4, 6)) / 2, "bias": jnp.zeros(6)},
              "dense2": {"kernel": jax.random.normal(k[1], (6, 3)) / 2, "bias": jnp.zeros(3)}}

    def logits(p, x):
        return jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"]) @ p["dense2"]["kernel"] + p["dense2"]["bias"]

    def loss(p, batch):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(p, batch[0])), batch[1][:, None], axis=1))

    def accuracy(p, batch):
        out = logits(p, batch[0])
        return jnp.mean((jnp.argmax(out, -1) == batch[1]).astype(out.dtype))

    batches = [(jax.random.normal(k[2 + i], (8, 4)), jax.random.randint(k[4 + i], (8,), 0, 3)) for i in range(2)]
    trajectory = [jax.tree.map(lambda v, s=s: v * (1 + s) + 0.05 * s, params) for s in np.linspace(0.5, 0, 6)]
    return params, loss, accuracy, batches, trajectory


def test_report_and_writer_end_to_end(tmp_path, x64):
    params, loss, accuracy, batches, trajectory = _tiny_problem()
    other = jax.tree.map(lambda v: v + 0.2, params)
    report = landscape_report(loss, params, batches, key=jax.random.key(4), grid=5, span=0.5,
                              other_params=other, trajectory=trajectory, accuracy_fn=accuracy, progress=False)
    x, y = (jnp.concatenate(parts) for parts in zip(*batches))
    full_loss = float(loss(params, (x, y)))
    assert report["plane"].losses.shape == (5, 5) and report["line"].losses.shape == (5,)
    np.testing.assert_allclose(report["plane"].losses[2, 2], full_loss, rtol=1e-12)
    np.testing.assert_allclose(report["line"].losses[2], full_loss, rtol=1e-12)
    np.testing.assert_allclose(report["interpolation"].value_at("loss", 0.0), full_loss, rtol=1e-12)
    np.testing.assert_allclose(report["interpolation"].value_at("loss", 1.0), float(loss(other, (x, y))), rtol=1e-12)
    assert report["trajectory"]["alphas"][-1] == pytest.approx(0.0, abs=1e-12)  # the last checkpoint is θ
    assert [d["kind"] for d in report["directions"]] == ["filter_normalized"] * 2
    paths = write_landscape_report(report, tmp_path / "run")
    expected = {"landscape.npz", "landscape.json", "landscape_1d.png", "landscape_2d.png", "landscape_3d.png",
                "interpolation.png"}
    assert set(os.listdir(tmp_path / "run")) == expected and set(paths) == expected
    for name in expected - {"landscape.npz", "landscape.json"}:
        assert _is_png(paths[name])

    def no_nan(token):
        raise AssertionError(f"non-JSON constant {token} in landscape.json")

    with open(paths["landscape.json"]) as handle:
        summary = json.load(handle, parse_constant=no_nan)
    assert summary["config"]["dirs"] == "filter" and summary["config"]["grid"] == 5
    assert summary["plane"]["metrics"]["loss"]["at_origin"] == pytest.approx(full_loss, rel=1e-12)
    assert summary["trajectory"]["num_checkpoints"] == 6
    assert sorted(summary["files"]) == sorted(expected)
    surfaces, extra = load_surfaces(paths["landscape.npz"])
    assert set(surfaces) == {"line", "plane", "interpolation"}
    np.testing.assert_array_equal(surfaces["plane"].losses, report["plane"].losses)
    np.testing.assert_array_equal(extra["trajectory"][0], report["trajectory"]["alphas"])


def test_report_with_pca_and_eigen_directions(x64):
    params, loss, _, batches, trajectory = _tiny_problem()
    pca = landscape_report(loss, params, batches, key=0, dirs="pca", grid=3, span=None, trajectory=trajectory,
                           progress=False)
    assert len(pca["config"]["explained_variance_ratio"]) == 2
    largest = np.max(np.abs(np.concatenate([pca["trajectory"]["alphas"], pca["trajectory"]["betas"]])))
    np.testing.assert_allclose(pca["config"]["span"], 1.2 * largest, rtol=1e-12)
    eigen = landscape_report(loss, params, batches[0], key=0, dirs="eigen", grid=3, progress=False)
    eigenvalues = eigen["config"]["eigenvalues"]
    assert eigenvalues[0] >= eigenvalues[1]
    assert eigen["directions"][0]["options"]["eigenvalue"] == eigenvalues[0]


def test_report_bad_input(tmp_path):
    params, loss, _, batches, trajectory = _tiny_problem()
    with pytest.raises(ValueError, match="dirs: expected one of"):
        landscape_report(loss, params, batches, key=0, dirs="hessian", progress=False)
    with pytest.raises(ValueError, match="span: expected a finite number > 0, got -1.0"):
        landscape_report(loss, params, batches, key=0, span=-1.0, progress=False)
    with pytest.raises(ValueError, match="grid: expected an integer >= 2, got 1"):
        landscape_report(loss, params, batches, key=0, grid=1, progress=False)
    with pytest.raises(ValueError, match="trajectory: dirs='pca' needs the training trajectory"):
        landscape_report(loss, params, batches, key=0, dirs="pca", grid=3, progress=False)
    with pytest.raises(ValueError, match="span: None .* needs a trajectory"):
        landscape_report(loss, params, batches, key=0, span=None, progress=False)
    with pytest.raises(ValueError, match="interpolation_range: expected finite"):
        landscape_report(loss, params, batches, key=0, interpolation_range=(1.0, 0.0), progress=False)
    with pytest.raises(ValueError, match="dirs: 'eigen' differentiates loss_fn"):
        landscape_report(loss, params, batches, key=0, dirs="eigen", recompute_state_fn=lambda p, b: {}, progress=False)
    with pytest.raises(ValueError, match="report: expected the dict returned by landscape_report"):
        write_landscape_report({"line": None}, tmp_path)


def test_surface_plot_names_its_directions(tmp_path):
    """Surface.plot: a contour for a plane, a line for a 1-D surface, saved where asked; the axes say what d₁ and d₂
    are (from the surface's direction descriptions), and a surface without descriptions keeps the bare symbols."""
    plane = _plane()
    figure = plane.plot(tmp_path / "plane.png")
    assert (tmp_path / "plane.png").read_bytes()[:8] == PNG_MAGIC
    axis = figure.axes[0]
    assert axis.get_xlabel() == "α along d₁ (random, filter-normalised)"
    eigen = Surface(kind="plane", alphas=plane.alphas, betas=plane.betas, metrics=plane.metrics,
                    nonfinite_counts=plane.nonfinite_counts,
                    directions=tuple({"kind": "hessian_eigenvector", "seed": None,
                                      "options": {"index": i, "eigenvalue": value}} for i, value in enumerate((6.99, 5.73))))
    labels = eigen.plot().axes[0]
    assert labels.get_xlabel() == "α along d₁ (Hessian eigenvector 1, λ = 6.99)"
    assert labels.get_ylabel() == "β along d₂ (Hessian eigenvector 2, λ = 5.73)"
    line = Surface(kind="line", alphas=plane.alphas, betas=None, metrics={"loss": plane.losses[:, 0]},
                   nonfinite_counts={"loss": 0})
    assert line.plot(tmp_path / "line.png").axes[0].get_xlabel() == "α (d₁)"
    assert (tmp_path / "line.png").exists()
