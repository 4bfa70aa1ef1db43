"""MNIST / Fashion-MNIST IDX loader: the real t10k files, tiny hand-written IDX files, corruption, download."""

import gzip
import hashlib
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest

import jaxnn.data as data
from jaxnn.data import download, idx

SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
T10K_IMAGES_MD5 = "9fb629c4189551a2d022fa330f9573f3"
T10K_LABELS_MD5 = "ec29112dd5afa0611ce80d1b7f02629c"
T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason=f"real MNIST t10k files not in {SHARED_MNIST}")


def idx_bytes(array: np.ndarray) -> bytes:
    """Independent IDX writer: magic 0x0000 08 ndim, big-endian uint32 dims, uint8 payload."""
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def tiny_mnist(directory: Path, *, n_train=40, n_test=12, shape=(6, 5), gz_train=True, gz_test=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write(directory / name, idx_bytes(array), gz=gz_train if name.startswith("train") else gz_test)
    return arrays


def _row_keys(x, y):
    return sorted(np.asarray(row).round(6).tobytes() + bytes([int(label)]) for row, label in zip(x, y))


# ----- the real MNIST test set -----------------------------------------------------------------------------------


@needs_shared_mnist
def test_real_t10k_checksums_and_contents():
    images_gz, labels_gz = SHARED_MNIST / "t10k-images-idx3-ubyte.gz", SHARED_MNIST / "t10k-labels-idx1-ubyte.gz"
    assert hashlib.md5(images_gz.read_bytes()).hexdigest() == T10K_IMAGES_MD5
    assert hashlib.md5(labels_gz.read_bytes()).hexdigest() == T10K_LABELS_MD5
    images = data.read_idx(images_gz)
    labels = data.read_idx(labels_gz)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert np.bincount(labels, minlength=10).tolist() == T10K_LABEL_COUNTS
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test digits
    # Independent oracle: skip the 16-byte header by hand.
    oracle = np.frombuffer(gzip.decompress(images_gz.read_bytes()), np.uint8, offset=16).reshape(10000, 28, 28)
    assert np.array_equal(images, oracle)
    assert int(images.sum(dtype=np.int64)) == int(oracle.sum(dtype=np.int64))
    assert abs(images.mean() / 255 - 0.13251) < 1e-5 and abs((images / 255).std() - 0.31048) < 1e-5


@needs_shared_mnist
def test_real_t10k_only_layout_is_split_and_recorded():
    ds = data.load_dataset("mnist", data_dir=SHARED_MNIST, download=False, standardize=False)
    assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7000, 1000, 2000)
    assert "t10k pair only" in ds.info["layout"] and ds.info["split"]["official_test"] is False
    assert ds.info["files"]["t10k-images-idx3-ubyte.gz"]["md5"] == T10K_IMAGES_MD5
    assert ds.info["files"]["t10k-labels-idx1-ubyte.gz"]["md5"] == T10K_LABELS_MD5
    y_all = np.concatenate([ds.train.y, ds.val.y, ds.test.y])
    assert np.bincount(y_all, minlength=10).tolist() == T10K_LABEL_COUNTS
    assert ds.train.x.min() == 0.0 and ds.train.x.max() == 1.0
    raw = data.read_idx(SHARED_MNIST / "t10k-images-idx3-ubyte.gz")
    pixel_sum = sum(float(np.round(s.x.astype(np.float64) * 255).sum()) for s in (ds.train, ds.val, ds.test))
    assert pixel_sum == float(raw.sum(dtype=np.int64))
    # the parent folder works too (it holds mnist/), and the split is the same
    parent = data.load_dataset("mnist", data_dir=SHARED_MNIST.parent, download=False, standardize=False)
    assert np.array_equal(parent.val.x, ds.val.x)


# ----- tiny IDX files written here ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz_train, gz_test", [(True, False), (False, True), (True, True), (False, False)])
def test_four_file_layout_uses_official_test(tmp_path, gz_train, gz_test):
    arrays = tiny_mnist(tmp_path, gz_train=gz_train, gz_test=gz_test)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False, standardize=False, val_fraction=0.25)
    assert ds.input_shape == (6, 5, 1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 10, 12)
    np.testing.assert_array_equal(ds.test.x[..., 0], arrays["t10k-images-idx3-ubyte"] / np.float32(255))
    np.testing.assert_array_equal(ds.test.y, arrays["t10k-labels-idx1-ubyte"])
    assert ds.info["split"]["official_test"] is True and ds.info["layout"].startswith("train+t10k")
    train_pool = _row_keys(arrays["train-images-idx3-ubyte"].astype(np.float64), arrays["train-labels-idx1-ubyte"])
    got = _row_keys(np.round(np.concatenate([ds.train.x, ds.val.x])[..., 0].astype(np.float64) * 255),
                    np.concatenate([ds.train.y, ds.val.y]))
    assert got == train_pool


def test_standardized_official_test_uses_train_statistics(tmp_path):
    tiny_mnist(tmp_path)
    raw = data.load_dataset("mnist", data_dir=tmp_path, download=False, standardize=False, dtype="float64")
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False, dtype="float64")
    std = raw.train.x.std(axis=0)
    expected = (raw.test.x - raw.train.x.mean(axis=0)) / np.where(std > 1e-6, std, 1.0)
    np.testing.assert_allclose(ds.test.x, expected, atol=1e-12)


def test_fashion_mnist_same_layout(tmp_path):
    tiny_mnist(tmp_path / "fashion_mnist")
    ds = data.load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    assert ds.info["label_names"][9] == "Ankle boot" and len(ds.test) == 12


def test_limit_applies_to_each_source_partition(tmp_path):
    tiny_mnist(tmp_path)
    ds = data.load_dataset("mnist", data_dir=tmp_path, download=False, limit=8, val_fraction=0.25)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 8)


# ----- corrupt and missing files ---------------------------------------------------------------------------------


def _corrupt_cases():
    images = np.zeros((4, 3, 3), np.uint8)
    good = idx_bytes(images)
    return [
        ("bad_magic", b"\x01\x02" + good[2:], r"bad IDX magic number 0x01020803"),
        ("bad_type", bytes([0, 0, 0x07, 3]) + good[4:], r"bad IDX magic number 0x00000703"),
        ("wrong_ndim", idx_bytes(np.zeros((4, 9), np.uint8)), r"bad IDX magic number 0x00000802: expected 0x00000803"),
        ("truncated_data", good[:-5], r"truncated IDX file: header declares shape \(4, 3, 3\).*36 data bytes\), found 31"),
        ("oversized", good + b"\x00", r"oversized IDX file"),
        ("truncated_header", good[:9], r"truncated IDX header: 3 dimensions need 16 header bytes, file has 9"),
        ("tiny", b"\x00\x00", r"shorter than the 4-byte magic number"),
    ]


@pytest.mark.parametrize("case, payload, match", _corrupt_cases(), ids=[c[0] for c in _corrupt_cases()])
@pytest.mark.parametrize("gz", [False, True])
def test_corrupt_idx_raises_naming_the_file(tmp_path, case, payload, match, gz):
    path = write(tmp_path / "t10k-images-idx3-ubyte", payload, gz=gz)
    with pytest.raises(data.CorruptFileError, match=match) as info:
        data.read_idx(path, expected_magic=idx.IMAGES_MAGIC)
    assert str(path) in str(info.value)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((4, 3, 3), np.uint8)))
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(data.CorruptFileError, match="truncated.gz: corrupt or truncated gzip data"):
        data.read_idx(truncated)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(idx_bytes(np.zeros((2,), np.uint8)))
    with pytest.raises(data.CorruptFileError, match="named .gz but is not a gzip file"):
        data.read_idx(not_gzip)


def test_corrupt_file_inside_load_dataset(tmp_path):
    tiny_mnist(tmp_path, gz_test=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(data.CorruptFileError, match="t10k-images-idx3-ubyte: truncated IDX file"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)


def test_mismatched_counts_and_bad_labels(tmp_path):
    tiny_mnist(tmp_path, gz_test=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(11, np.uint8)), gz=False)
    with pytest.raises(data.CorruptFileError, match="has 12 images but .*t10k-labels-idx1-ubyte has 11 labels"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.full(12, 10, np.uint8)), gz=False)
    with pytest.raises(data.CorruptFileError, match=r"labels must lie in \[0, 10\); found 10"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)


def test_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message and all(name in message for name in NAMES)
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data directory {missing_dir} does not exist"):
        data.load_dataset("mnist", data_dir=missing_dir, download=False)


def test_incomplete_pair_is_named(tmp_path):
    tiny_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="found t10k-images-idx3-ubyte but not t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)


# ----- download (network replaced by a local fetch) ---------------------------------------------------------------


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """Serve tiny gz IDX files from a local folder through a monkeypatched fetch; record the URLs asked for."""
    served = tmp_path / "server"
    arrays = tiny_mnist(served, gz_train=True, gz_test=True)
    md5s = {f"{name}.gz": hashlib.md5((served / f"{name}.gz").read_bytes()).hexdigest() for name in NAMES}
    monkeypatch.setitem(idx.IDX_RESOURCES["mnist"], "md5", md5s)
    requested = []

    def fake_fetch(url, destination, *, timeout, progress=True):
        requested.append(url)
        assert timeout <= 30  # a short timeout
        Path(destination).write_bytes((served / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(download, "fetch_url", fake_fetch)
    return arrays, md5s, requested


def test_download_when_missing(tmp_path, fake_server):
    arrays, md5s, requested = fake_server
    target = tmp_path / "fresh" / "mnist_files"
    ds = data.load_dataset("mnist", data_dir=target, download=True, standardize=False, progress=False)
    assert sorted(url.rsplit("/", 1)[1] for url in requested) == sorted(md5s)
    assert all(url.startswith(idx.IDX_RESOURCES["mnist"]["mirrors"][0]) for url in requested)
    assert sorted(ds.info["downloaded"]) == sorted(md5s)
    assert sorted(p.name for p in target.iterdir()) == sorted(md5s)
    np.testing.assert_array_equal(ds.test.y, arrays["t10k-labels-idx1-ubyte"])
    requested.clear()
    data.load_dataset("mnist", data_dir=target, download=True)  # files now present: no second download
    assert requested == []


def test_download_md5_mismatch_tries_mirrors_then_fails(tmp_path, fake_server, monkeypatch):
    _, md5s, requested = fake_server
    monkeypatch.setitem(idx.IDX_RESOURCES["mnist"], "md5", {**md5s, "t10k-images-idx3-ubyte.gz": "0" * 32})
    target = tmp_path / "fresh"
    with pytest.raises(FileNotFoundError, match=r"MD5 mismatch \(expected 0{32}") as info:
        data.load_dataset("mnist", data_dir=target, download=True, progress=False)
    assert "t10k-images-idx3-ubyte" in str(info.value) and str(target) in str(info.value)
    assert not (target / "t10k-images-idx3-ubyte.gz").exists()  # the bad file is removed
    tried = [url for url in requested if url.endswith("t10k-images-idx3-ubyte.gz")]
    assert len(tried) == len(idx.IDX_RESOURCES["mnist"]["mirrors"])


def test_download_without_network(tmp_path, monkeypatch):
    attempts = []

    def offline(url, destination, *, timeout, progress=True):
        attempts.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(download, "fetch_url", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*name resolution") as info:
        data.load_dataset("mnist", data_dir=tmp_path, download=True, progress=False)
    assert all(name in str(info.value) for name in NAMES) and str(tmp_path) in str(info.value)
    # every mirror of the first file is tried once, then it gives up (no time-out per remaining file)
    assert len(attempts) == len(idx.IDX_RESOURCES["mnist"]["mirrors"])


def test_fetch_url_reads_a_file_url(tmp_path):
    """The real fetch (urllib) on a file:// URL: no network needed; writes atomically."""
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc" * 1000)
    destination = tmp_path / "out" / "copy.bin"
    destination.parent.mkdir()
    download.fetch_url(source.as_uri(), destination, timeout=5, progress=False)
    assert destination.read_bytes() == source.read_bytes()
    assert data.file_md5(destination) == hashlib.md5(b"abc" * 1000).hexdigest()
    with pytest.raises(urllib.error.URLError):
        download.fetch_url((tmp_path / "absent").as_uri(), tmp_path / "out" / "absent", timeout=5, progress=False)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["copy.bin"]  # no partial files left
