"""Hostile and damaged image folders: each bad input is a DatasetError naming the file (and row or
column), raised while loading; legitimate but unusual inputs decode correctly."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from collafuse_flwr.config import RunConfig
from collafuse_flwr.data import DatasetError, load_table
from collafuse_flwr.data.awa2 import load_awa2
from collafuse_flwr.data.celeba import load_celeba
from collafuse_flwr.data.cifar10 import load_cifar10
from collafuse_flwr.data.table import MAX_PIXELS


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG whose IHDR says what it is told, with `raw` (filtered scanlines) as its only IDAT."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


GREY = encoded(Image.new("RGB", (8, 8), (90, 90, 90)))


def write_folder(root, csv: str, files: dict[str, bytes], index: str = "labels.csv"):
    """data-dir `root`: the index CSV `index` holding `csv` and the files {relative name: bytes}."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / index).write_text(csv)
    return root


def labelled(tmp_path, files: dict[str, bytes], size: int = 8) -> np.ndarray:
    """The images of a labels.csv folder holding `files` (all class 0), loaded as CIFAR-10."""
    csv = "filename,label\n" + "".join(f"{name},0\n" for name in files)
    return load_cifar10(write_folder(tmp_path / "d", csv, files), "", size, download=False).images


# --- legitimate inputs decode correctly ---

def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 40000], [65535, 129]], dtype=np.uint16)  # 129 / 257 rounds up, 128 down
    assert Image.fromarray(values).mode == "I;16"
    images = labelled(tmp_path, {"images/a.png": encoded(Image.fromarray(values))}, size=2)
    expected = np.round(values / 65535 * 255)
    assert expected[0, 1] == 156
    assert np.array_equal(images[0], np.broadcast_to(expected, (3, 2, 2)))


def test_16_bit_integer_tiff_is_scaled_like_a_png(tmp_path):
    values = np.array([[0, 40000], [65535, 1000]], dtype=np.int32)
    assert Image.fromarray(values).mode == "I"
    images = labelled(tmp_path, {"images/a.tif": encoded(Image.fromarray(values), "TIFF")}, size=2)
    assert images[0, 0].tolist() == [[0, 156], [255, 4]]


def test_16_bit_rgb_png_keeps_8_bits_of_each_channel(tmp_path):
    pixel = np.array([40000, 1000, 65535], dtype=">u2")
    png = crafted_png(1, 1, 16, 2, b"\0" + pixel.tobytes())
    images = labelled(tmp_path, {"images/a.png": png}, size=1)
    assert np.abs(images[0, :, 0, 0] - np.round(pixel / 257)).max() <= 1  # PIL keeps the high byte


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (1, 1), 1)
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.info["transparency"] = 1
    return img


@pytest.mark.parametrize("make,expected", [
    (lambda: Image.new("RGBA", (1, 1), (200, 100, 50, 128)), (100, 50, 25)),  # RGB x alpha / 255
    (lambda: Image.new("RGBA", (1, 1), (200, 100, 50, 0)), (0, 0, 0)),  # the hidden colour is dropped
    (lambda: Image.new("LA", (1, 1), (200, 255)), (200, 200, 200)),
    (palette_with_transparency, (0, 0, 0)),
    (lambda: Image.new("1", (1, 1), 1), (255, 255, 255)),
    (lambda: Image.new("L", (1, 1), 77), (77, 77, 77)),
], ids=["rgba-half", "rgba-clear", "la", "palette-transparent", "1-bit", "grey"])
def test_modes_decode_to_rgb_with_transparency_over_black(tmp_path, make, expected):
    images = labelled(tmp_path, {"images/a.png": encoded(make())}, size=1)
    assert images[0, :, 0, 0].tolist() == list(expected)


def test_mixed_sizes_are_cropped_to_the_centre_square(tmp_path):
    wide = Image.new("RGB", (48, 32))
    wide.paste((255, 255, 255), (8, 0, 40, 32))
    files = {"images/wide.png": encoded(wide), "images/small.png": encoded(Image.new("RGB", (4, 4), "white")),
             "images/big.jpg": encoded(Image.new("RGB", (64, 64), "white"), "JPEG")}
    images = labelled(tmp_path, files, size=32)
    assert images.shape == (3, 3, 32, 32) and images.min() > 240


def test_filenames_that_look_like_numbers_or_missing_values_are_names(tmp_path):
    images = labelled(tmp_path, {"7": GREY, "NA": GREY, "images/nan": GREY})
    assert images.shape == (3, 3, 8, 8) and (images == 90).all()


def test_utf8_csv_with_a_byte_order_mark(tmp_path):
    root = write_folder(tmp_path / "d", "\ufefffilename,label\nimages/é.png,3\n", {"images/é.png": GREY})
    assert load_cifar10(root, "", 8, download=False).labels.tolist() == [3]


# --- hostile or damaged images ---

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width,height", [(30000, 30000), (10000, 10000), (8000, 6000)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, width, height):
    limit = Image.MAX_IMAGE_PIXELS
    bomb = crafted_png(width, height, 1, 0, b"\0")  # only the header is big
    assert len(bomb) < 100 and width * height > MAX_PIXELS
    with pytest.raises(DatasetError, match=r"image file .*images/bomb\.png (is \d+x\d+ pixels, more|is too large)"):
        labelled(tmp_path, {"images/ok.png": GREY, "images/bomb.png": bomb})
    assert Image.MAX_IMAGE_PIXELS == limit


def damaged(kind: str) -> bytes:
    png = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)))
    idat = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[idat:idat + 4])[0]
    if kind == "header-only":
        return png[:idat]
    if kind == "truncated":
        return png[:idat + 8 + length // 2]
    data = bytearray(png[idat + 8:idat + 8 + length])
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # zeroed second half of the stream
    if kind == "bad-crc":
        return png[:idat + 8] + bytes(data) + png[idat + 8 + length:]
    return png[:idat] + chunk(b"IDAT", bytes(data)) + png[idat + 12 + length:]  # "bad-stream", valid CRC


@pytest.mark.parametrize("kind", ["header-only", "truncated", "bad-crc", "bad-stream"])
def test_damaged_png_names_the_file(tmp_path, kind):
    with pytest.raises(DatasetError, match=r"image file .*images/b\.png cannot be decoded"):
        labelled(tmp_path, {"images/a.png": GREY, "images/b.png": damaged(kind)})


@pytest.mark.parametrize("name,img,message", [
    ("f.tif", Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)), "floating-point pixels"),
    ("i.tif", Image.fromarray(np.full((2, 2), 70000, dtype=np.int32)), r"integer pixels in \[70000, 70000\]"),
])
def test_images_of_unknown_range_are_refused(tmp_path, name, img, message):
    with pytest.raises(DatasetError, match=rf"image file .*images/{name[0]}\.tif has {message}"):
        labelled(tmp_path, {f"images/{name}": encoded(img, "TIFF")}, size=2)


# --- hostile or damaged index CSVs ---

def load_labels_csv(tmp_path, csv: str, files: dict[str, bytes] | None = None):
    root = write_folder(tmp_path / "d", csv, {"images/a.png": GREY, "images/b.png": GREY} if files is None else files)
    return load_cifar10(root, "all", 8, download=False)


def test_empty_filename_names_the_row(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.csv: row 1 has an empty filename"):
        load_labels_csv(tmp_path, "filename,label\nimages/a.png,0\n,0\n")


@pytest.mark.parametrize("escape", [
    "../outside.png", "images/../../outside.png", "ABSOLUTE", "images/link.png", "linked/outside.png",
])
def test_files_outside_data_dir_are_refused(tmp_path, escape):
    (tmp_path / "outside.png").write_bytes(GREY)
    name = str(tmp_path / "outside.png") if escape == "ABSOLUTE" else escape
    files = {"images/a.png": GREY}
    root = write_folder(tmp_path / "d", f"filename,label\nimages/a.png,0\n{name},0\n", files)
    (root / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    (root / "linked").symlink_to(tmp_path)
    outside = rf"labels\.csv: row 1 names '{name}', which resolves to .*outside\.png, outside data-dir"
    with pytest.raises(DatasetError, match=outside):
        load_cifar10(root, "", 8, download=False)


def test_nul_byte_in_a_filename_names_the_row(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.csv: row 0 names 'images/a\\x00\.png', which holds a NUL byte"):
        load_labels_csv(tmp_path, "filename,label\nimages/a\0.png,0\n")


@pytest.mark.parametrize("second", ["images/a.png", "./images/a.png", "images/alias.png"])
def test_a_file_named_twice_names_both_rows(tmp_path, second):
    root = write_folder(tmp_path / "d", f"filename,label,split\nimages/a.png,0,train\nimages/b.png,0,train\n"
                        f"{second},0,test\n", {"images/a.png": GREY, "images/b.png": GREY})
    (root / "images" / "alias.png").symlink_to(root / "images" / "a.png")
    with pytest.raises(DatasetError, match=r"labels\.csv: rows 0 and 2 both name the image file .*images/a\.png"):
        load_cifar10(root, "train", 8, download=False)  # across splits too


def test_rows_are_counted_in_the_whole_file_after_a_split(tmp_path):
    csv = "filename,label,label_name,split\nimages/a.png,0,airplane,train\nimages/b.png,0,bird,test\n"
    with pytest.raises(DatasetError, match=r"labels\.csv: row 1 has label 0 named 'bird'"):
        load_cifar10(write_folder(tmp_path / "d", csv, {"images/a.png": GREY, "images/b.png": GREY}),
                     "test", 8, download=False)


def test_header_only_csv_has_no_rows(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.csv has no rows, only a header"):
        load_labels_csv(tmp_path, "filename,label,label_name\n")


@pytest.mark.parametrize("label,message", [
    ("1.5", "is '1.5', not an integer"), ("cat", "is 'cat', not an integer"), ("", "is '', not an integer"),
    ("nan", "is 'nan', not an integer"), ("-1", r"has label -1; labels must be integers in \[0, 10\)"),
    ("10", r"has label 10; labels must be integers in \[0, 10\)"), ("1e300", "is '1e300', not an integer"),
])
def test_bad_label_names_the_row(tmp_path, label, message):
    with pytest.raises(DatasetError, match=rf"labels\.csv: row 1(, column 'label')? {message}"):
        load_labels_csv(tmp_path, f"filename,label\nimages/a.png,0\nimages/b.png,{label}\n")


@pytest.mark.parametrize("csv,message", [
    ("filename,label_name\nimages/a.png,airplane\n", r"lacks the column\(s\) \['label'\]"),
    ("filename,label\nimages/a.png,0,\nimages/b.png,0,\n", "more fields than its header"),
    ("filename,label\nimages/a.png,0\nimages/b.png,0,1\n", "not a readable UTF-8 CSV"),
], ids=["missing-column", "trailing-commas", "ragged-row"])
def test_malformed_csv_names_the_file(tmp_path, csv, message):
    with pytest.raises(DatasetError, match=rf"index file .*labels\.csv.* {message}"):
        load_labels_csv(tmp_path, csv)


def test_csv_that_is_not_utf8_names_the_file(tmp_path):
    root = write_folder(tmp_path / "d", "", {"images/é.png": GREY})
    (root / "labels.csv").write_bytes("filename,label\nimages/é.png,0\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"index file .*labels\.csv is not a readable UTF-8 CSV"):
        load_cifar10(root, "", 8, download=False)


@pytest.mark.parametrize("rows,message", [
    ("images/a.png,1,-1\nimages/b.png,2,1\n", r"row 1, column 'Male' is 2; attribute values must be 1 and -1"),
    ("images/a.png,1,-1\nimages/b.png,,1\n", r"row 1, column 'Male' is '', not an integer"),
    ("images/a.png,1,yes\nimages/b.png,1,1\n", r"row 0, column 'Smiling' is 'yes', not an integer"),
    ("images/a.png,1,-1\nimages/b.png,0,1\n",
     r"attribute values mix -1 \(row 0, column 'Smiling'\) and 0 \(row 1, column 'Male'\)"),
])
def test_bad_attribute_names_the_row_and_column(tmp_path, rows, message):
    files = {"images/a.png": GREY, "images/b.png": GREY}
    root = write_folder(tmp_path / "d", "filename,Male,Smiling\n" + rows, files, "attributes.csv")
    with pytest.raises(DatasetError, match=rf"attributes\.csv: {message}"):
        load_celeba(root, "all", 8, download=False)


def test_attributes_csv_without_attributes(tmp_path):
    root = write_folder(tmp_path / "d", "filename,image_id\nimages/a.png,1\n", {"images/a.png": GREY}, "attributes.csv")
    with pytest.raises(DatasetError, match=r"attributes\.csv has no attribute columns"):
        load_celeba(root, "", 8, download=False)


def test_class_attributes_label_that_is_not_an_integer(tmp_path):
    root = write_folder(tmp_path / "d", "filename,label\nimages/a.png,0\n", {"images/a.png": GREY})
    (root / "class_attributes.csv").write_text("label,label_name,ocean\nzero,antelope,0\n")
    with pytest.raises(DatasetError, match=r"class_attributes\.csv: row 0, column 'label' is 'zero', not an integer"):
        load_awa2(root, "", 8, download=False)


def test_error_comes_before_any_output(tmp_path):
    write_folder(tmp_path / "d", "filename,label\n../outside.png,0\n", {})
    config = RunConfig(dataset="cifar10", data_dir=str(tmp_path / "d"), output_dir=str(tmp_path / "runs"))
    with pytest.raises(DatasetError, match="outside data-dir"):
        load_table(config)
    assert not (tmp_path / "runs").exists()
