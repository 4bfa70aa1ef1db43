"""CIFAR-10 pickle loader on tiny batches written here: layout (HWC), official test, errors, safe unpickling."""

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

import jaxnn.data as data
from jaxnn.data import cifar, download

BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def write_batches(folder: Path, *, per_batch=4, n_test=3, seed=0, byte_keys=True, protocol=2):
    """Tiny CIFAR batches in the official format: rows of 1024 R, 1024 G, 1024 B values, row-major 32x32."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for index, name in enumerate([*BATCHES, "test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n) + index) % 10]
        key = (lambda k: k.encode()) if byte_keys else (lambda k: k)
        with open(folder / name, "wb") as handle:
            pickle.dump({key("batch_label"): key(f"batch {index}"), key("data"): rows, key("labels"): labels,
                         key("filenames"): [key(f"img{i}.png") for i in range(n)]}, handle, protocol=protocol)
        written[name] = (rows, labels)
    with open(folder / "batches.meta", "wb") as handle:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, handle, protocol=protocol)
    return written


def hwc_oracle(rows):
    """Image (n, 32, 32, 3) by the documented formula image[h, w, c] = row[c*1024 + h*32 + w], element by element."""
    out = np.empty((rows.shape[0], 32, 32, 3), np.uint8)
    for c in range(3):
        for h in range(32):
            for w in range(32):
                out[:, h, w, c] = rows[:, c * 1024 + h * 32 + w]
    return out


@pytest.mark.parametrize("byte_keys, protocol", [(True, 2), (False, pickle.HIGHEST_PROTOCOL)])
def test_cifar_layout_and_official_test(tmp_path, byte_keys, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_batches(folder, byte_keys=byte_keys, protocol=protocol)
    ds = data.load_dataset("cifar10", data_dir=folder, download=False, standardize=False, val_fraction=0.25)
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 3)
    test_rows, test_labels = written["test_batch"]
    np.testing.assert_array_equal(ds.test.x, hwc_oracle(test_rows) / np.float32(255))
    np.testing.assert_array_equal(ds.test.y, test_labels)
    train_rows = np.concatenate([written[name][0] for name in BATCHES])
    train_labels = np.concatenate([written[name][1] for name in BATCHES])
    got = sorted(np.round(x.astype(np.float64) * 255).astype(np.uint8).tobytes() + bytes([int(y)])
                 for x, y in zip(np.concatenate([ds.train.x, ds.val.x]), np.concatenate([ds.train.y, ds.val.y])))
    expected = sorted(img.tobytes() + bytes([int(y)]) for img, y in zip(hwc_oracle(train_rows), train_labels))
    assert got == expected
    assert ds.info["label_names"][1] == "automobile" and ds.info["split"]["official_test"] is True
    assert ds.info["files"]["test_batch"]["md5"] == hashlib.md5((folder / "test_batch").read_bytes()).hexdigest()


def test_cifar_channel_order(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    rows = np.concatenate([np.full((2, 1024), 10), np.full((2, 1024), 20), np.full((2, 1024), 30)], axis=1)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": rows.astype(np.uint8), "labels": [0, 1]}, handle)
    images, labels = data.read_cifar_batch(folder / "test_batch")
    assert images.shape == (2, 32, 32, 3) and labels.dtype == np.int32
    assert (images[..., 0] == 10).all() and (images[..., 1] == 20).all() and (images[..., 2] == 30).all()


def test_parent_directory_is_accepted(tmp_path):
    write_batches(tmp_path / "cifar-10-batches-py")
    a = data.load_dataset("cifar10", data_dir=tmp_path, download=False)
    b = data.load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py", download=False)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_allclose(a.train.x.mean(axis=0), 0.0, atol=1e-5)  # standardised on train


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("cifar10", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "does not exist" in message
    assert all(name in message for name in [*BATCHES, "test_batch"])
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing batch files \['data_batch_3'\]"):
        data.load_dataset("cifar10", data_dir=folder, download=False)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a pickle at all", "not a readable CIFAR pickle batch"),
        (pickle.dumps([1, 2, 3]), "expected a pickled dict, got list"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}), r"lacks the keys \['labels'\]"),
        (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}), r"shape \(n, 3072\); got uint8 array of shape \(2, 100\)"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), "must be a uint8 array"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "'labels' must be 2 integers"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), r"labels must lie in \[0, 10\); got \[0, 10\]"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})[:-20], "not a readable CIFAR pickle batch"),
    ],
    ids=["garbage", "list", "no_labels", "bad_shape", "bad_dtype", "label_count", "label_range", "truncated"],
)
def test_corrupt_batch(tmp_path, content, match):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder)
    (folder / "data_batch_2").write_bytes(content)
    with pytest.raises(data.CorruptFileError, match=match) as info:
        data.load_dataset("cifar10", data_dir=folder, download=False)
    assert "data_batch_2" in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Exploit(), "labels": []}))
    with pytest.raises(data.CorruptFileError, match=r"global (posix|os|nt)\.system is not allowed"):
        data.read_cifar_batch(path)


def test_download_and_extract_with_fake_fetch(tmp_path, monkeypatch):
    staging = tmp_path / "staging" / "cifar-10-batches-py"
    written = write_batches(staging)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-py")
    archive = buffer.getvalue()
    monkeypatch.setitem(cifar.CIFAR10_ARCHIVE, "md5", hashlib.md5(archive).hexdigest())
    requested = []

    def fake_fetch(url, destination, *, timeout, progress=True):
        requested.append(url)
        Path(destination).write_bytes(archive)

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    target = tmp_path / "cifar_root"
    ds = data.load_dataset("cifar10", data_dir=target, download=True, standardize=False, progress=False)
    assert requested == list(cifar.CIFAR10_ARCHIVE["urls"])
    assert ds.info["downloaded"] == ["cifar-10-python.tar.gz"]
    np.testing.assert_array_equal(ds.test.y, written["test_batch"][1])
    monkeypatch.setitem(cifar.CIFAR10_ARCHIVE, "md5", "f" * 32)
    with pytest.raises(FileNotFoundError, match="download failed.*MD5 mismatch"):
        data.load_dataset("cifar10", data_dir=tmp_path / "other", download=True, progress=False)
