"""The datasets load with the right shapes, labels and attributes; bad files are named."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import DatasetError, client_data, load_table
from collafuse_flwr.data.cifar10 import CLASSES, load_cifar10
from collafuse_flwr.data.download import fetch
from collafuse_flwr.data.loaders import data_root


def config_for(shared_data, tmp_path, dataset, **overrides) -> RunConfig:
    folder = {"cifar10": "cifar10-mini", "celeba": "celeba-mini", "awa2": "awa2-mini"}[dataset]
    values = dict(dataset=dataset, num_clients=5, data_dir=str(shared_data / folder), output_dir=str(tmp_path / "runs"))
    config = RunConfig(**dict(values, **overrides))
    config.validate()
    return config


def test_digits_are_real_images_in_range():
    table = load_table(RunConfig())
    assert table.images.shape == (1797, 1, 16, 16) and table.images.dtype == np.float32
    assert table.images.min() >= -1 and table.images.max() <= 1
    assert sorted(np.unique(table.labels).tolist()) == list(range(10))


@pytest.mark.parametrize("split,count", [("", 2000), ("train", 2000), ("test", 500), ("all", 2500)])
def test_cifar10_folder_splits_and_label_order(shared_data, tmp_path, split, count):
    table = load_table(config_for(shared_data, tmp_path, "cifar10", dataset_split=split))
    assert table.images.shape == (count, 3, 32, 32) and table.images.dtype == np.uint8
    assert table.class_names[:3] == ("airplane", "automobile", "bird")
    assert table.class_names[9] == "truck" and table.attributes is None
    assert np.bincount(table.labels).tolist() == [count // 10] * 10


def test_cifar10_pixels_are_the_files(shared_data, tmp_path):
    """At the native 32x32 nothing is resampled: the first image is the PNG's pixels (RGB, CHW)."""
    table = load_table(config_for(shared_data, tmp_path, "cifar10", dataset_split="test"))
    png = np.asarray(Image.open(shared_data / "cifar10-mini/images/test_airplane_0000.png").convert("RGB"))
    assert np.array_equal(table.images[0], png.transpose(2, 0, 1)) and table.labels[0] == 0


def test_celeba_folder_attributes(shared_data, tmp_path):
    table = load_table(config_for(shared_data, tmp_path, "celeba"))
    assert table.images.shape == (1000, 3, 64, 64) and table.labels is None
    assert table.attributes.shape == (1000, 40) and len(table.attribute_names) == 40
    first = dict(zip(table.attribute_names, table.attributes[0]))  # 000001.jpg
    named = ("Male", "Smiling", "Brown_Hair", "Eyeglasses", "Young")
    assert tuple(first[name] for name in named) == (0, 1, 1, 0, 1)
    assert table.targets().shape == (1000, 40)  # the feature network learns the attributes


def test_celeba_32_option_keeps_the_whole_face(shared_data, tmp_path):
    small = load_table(config_for(shared_data, tmp_path, "celeba", image_size=32))
    assert small.images.shape == (1000, 3, 32, 32)


def test_awa2_folder_classes_and_predicates(shared_data, tmp_path):
    table = load_table(config_for(shared_data, tmp_path, "awa2"))
    assert table.images.shape == (50, 3, 64, 64) and table.attributes.shape == (50, 85)
    assert len(table.class_names) == 50 and table.class_names[0] == "antelope"
    attribute = dict(zip(table.attribute_names, range(85)))
    whale = table.class_names.index("killer+whale")
    row = int(np.flatnonzero(table.labels == whale)[0])
    assert table.attributes[row, attribute["ocean"]] == 1 and table.attributes[row, attribute["hooves"]] == 0
    antelope = int(np.flatnonzero(table.labels == 0)[0])
    assert table.attributes[antelope, attribute["hooves"]] == 1 and table.attributes[antelope, attribute["ocean"]] == 0


def test_rgb_client_data_in_model_range(shared_data, tmp_path):
    data = client_data(config_for(shared_data, tmp_path, "cifar10"), 2)
    assert data.train.shape[1:] == (3, 32, 32) and data.train.dtype.is_floating_point
    assert data.train.min() >= -1 and data.train.max() <= 1 and data.train.min() < -0.9


def test_decoded_tables_are_cached_on_disk(shared_data, tmp_path, monkeypatch):
    """In this machine's own cache, never below a path of the run config (output-dir)."""
    monkeypatch.setenv("COLLAFUSE_DATA_CACHE", str(tmp_path / "cache"))
    config = config_for(shared_data, tmp_path, "cifar10", image_size=12)
    table = load_table(config)
    cached = list((tmp_path / "cache").glob("cifar10-default-12-*/images.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), table.images)
    assert not (tmp_path / "runs").exists()


def write_folder(root, names_and_bytes):
    """An image folder whose labels.csv names the given files (written with the given bytes)."""
    (root / "images").mkdir(parents=True)
    rows = ["filename,label,label_name"]
    for name, data in names_and_bytes:
        if data is not None:
            (root / "images" / name).write_bytes(data)
        rows.append(f"images/{name},0,airplane")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def png_bytes(tmp_path) -> bytes:
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


def test_missing_image_names_the_file(tmp_path):
    write_folder(tmp_path / "d", [("a.png", png_bytes(tmp_path)), ("gone.png", None)])
    with pytest.raises(DatasetError, match=r"image file .*images/gone\.png is missing"):
        load_cifar10(tmp_path / "d", "", 32, download=False)


def test_corrupt_image_names_the_file(tmp_path):
    write_folder(tmp_path / "d", [("a.png", png_bytes(tmp_path)), ("bad.png", b"not a png at all")])
    with pytest.raises(DatasetError, match=r"image file .*images/bad\.png cannot be decoded"):
        load_cifar10(tmp_path / "d", "", 32, download=False)


def test_wrong_label_name_is_reported(tmp_path):
    write_folder(tmp_path / "d", [("a.png", png_bytes(tmp_path))])
    (tmp_path / "d" / "labels.csv").write_text("filename,label,label_name\nimages/a.png,1,airplane\n")
    with pytest.raises(DatasetError, match="row 0 has label 1 named 'airplane'.*'automobile'"):
        load_cifar10(tmp_path / "d", "", 32, download=False)


@pytest.mark.parametrize("dataset,files", [
    ("cifar10", "cifar-10-batches-py"), ("celeba", "list_attr_celeba.txt"), ("awa2", "AwA2-data.zip"),
])
def test_absent_dataset_without_download_says_what_to_put_where(tmp_path, dataset, files):
    config = RunConfig(dataset=dataset, data_dir=str(tmp_path / "empty"), download=False,
                       output_dir=str(tmp_path / "runs"))
    with pytest.raises(DatasetError, match=f"not in .*empty and download=false.*{files}"):
        load_table(config)


def test_failed_download_becomes_a_clear_error(tmp_path):
    def offline():
        raise OSError("Network is unreachable")

    message = r"could not download CIFAR-10 into .*\(OSError: Network is unreachable\)\. Put"
    with pytest.raises(DatasetError, match=message):
        fetch("CIFAR-10", tmp_path, offline, "Put the files there.")


def test_default_data_dir_is_per_dataset():
    assert data_root(RunConfig(dataset="celeba")).parts[-2:] == ("datasets", "celeba")


# --- official layouts, written in miniature (torchvision's checksums are for the real files) ---

def bordered(width: int, height: int, side: int) -> Image.Image:
    """Black image with a white centred square of `side`: a centre crop to it is all white."""
    img = Image.new("RGB", (width, height))
    left, top = (width - side) // 2, (height - side) // 2
    img.paste((255, 255, 255), (left, top, left + side, top + side))
    return img


def test_cifar10_official_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES)}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    train = load_cifar10(tmp_path, "", 32, download=False)
    assert train.images.shape == (20, 3, 32, 32) and train.labels.tolist() == [0, 1, 2, 3] * 5
    first = pickle.loads((base / "data_batch_1").read_bytes())["data"][0].reshape(3, 32, 32)
    assert np.array_equal(train.images[0], first)
    assert len(load_cifar10(tmp_path, "all", 16, download=False)) == 23


def test_celeba_official_layout_crops_the_face_square_and_reads_splits(tmp_path):
    from collafuse_flwr.data.celeba import load_celeba

    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    files = [f"{i:06d}.jpg" for i in range(1, 5)]
    for f in files:
        bordered(178, 218, 140).save(base / "img_align_celeba" / f, quality=95)
    names = [f"Attr_{j}" for j in range(40)]
    rows = [f"{f} " + " ".join("1" if (i + j) % 3 == 0 else "-1" for j in range(40)) for i, f in enumerate(files)]
    (base / "list_attr_celeba.txt").write_text(f"{len(files)}\n" + " ".join(names) + "\n" + "\n".join(rows) + "\n")
    (base / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    train = load_celeba(tmp_path, "", 32, download=False)
    assert train.images.shape == (2, 3, 32, 32) and train.attribute_names == tuple(names)
    assert train.images.min() > 200  # the 140x140 face square only: no black border, no squashing
    assert train.attributes[1, :3].tolist() == [0, 0, 1]  # row 000002: (1 + j) % 3 == 0 at j = 2
    assert len(load_celeba(tmp_path, "test", 32, download=False)) == 1
    assert len(load_celeba(tmp_path, "all", 32, download=False)) == 4


def test_awa2_official_layout(tmp_path):
    from collafuse_flwr.data.awa2 import load_awa2

    base = tmp_path / "Animals_with_Attributes2"
    classes, predicates = ["antelope", "killer+whale"], ["black", "ocean", "hooves"]
    (base / "classes.txt").parent.mkdir(parents=True)
    (base / "classes.txt").write_text("".join(f"{i + 1}\t{c}\n" for i, c in enumerate(classes)))
    (base / "predicates.txt").write_text("".join(f"{i + 1}\t{p}\n" for i, p in enumerate(predicates)))
    (base / "predicate-matrix-binary.txt").write_text("0 0 1\n1 1 0\n")
    for c, count in zip(classes, (2, 3)):
        (base / "JPEGImages" / c).mkdir(parents=True)
        for i in range(count):
            bordered(120, 80, 80).save(base / "JPEGImages" / c / f"{c}_{10001 + i}.jpg", quality=95)
    table = load_awa2(tmp_path, "", 16, download=False)
    assert table.images.shape == (5, 3, 16, 16) and table.labels.tolist() == [0, 0, 1, 1, 1]
    assert table.images.min() > 200  # centre square, aspect ratio kept
    assert table.attributes.tolist() == [[0, 0, 1]] * 2 + [[1, 1, 0]] * 3
