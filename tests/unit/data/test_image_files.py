"""Image files in the modes PIL opens, written by PIL into a real folder: 16-bit and float
grayscale keep their range, EXIF orientation is applied, animations give their first frame,
alpha and transparent palettes load, and files in sub-folders of a class are named in a warning.
Each is checked in the decoded-image store and in the on-the-fly PIL path."""

import logging

import numpy as np
import pytest
from PIL import Image

from distill_runner.data.imagefolder import imagefolder
from distill_runner.data.images import load_rgb, to_8bit

SIZE = 16


def make_folder(root, special: dict) -> str:
    """``root/{train,val,test}/{a,b}``: plain gray PNGs, plus ``special`` (name -> PIL image or a
    function writing the file) in test/a, where it is the first file, so test image 0."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(
                    root / split / cls / f"z{i}.png"
                )
    for name, image in special.items():
        path = root / "test" / "a" / name
        image.save(path) if isinstance(image, Image.Image) else image(path)
    return str(root)


def first_test_image(root: str, decode_cache: bool) -> np.ndarray:
    """Test image 0 as the model's batch holds it, un-normalized: float [3, S, S] in 0..255."""
    data = imagefolder(
        root=root, image_size=SIZE, val_from_train=None, num_workers=0, decode_cache=decode_cache, progress=False,
        mean=[0.0] * 3, std=[1 / 255] * 3, hflip=False,
    )  # fmt: skip
    image = next(iter(data.test))["image"][0]
    return image.expand(3, -1, -1).numpy()


@pytest.mark.parametrize("decode_cache", [True, False])
def test_16bit_png_keeps_its_range(tmp_path, decode_cache):
    rng = np.random.default_rng(1)
    values = np.clip(rng.normal(69 * 257, 2000, (30, 30)), 0, 65535).astype(np.uint16)  # mean ~69/255 of full range
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    root = make_folder(tmp_path / "data", {"a0.png": image})
    with Image.open(tmp_path / "data" / "test" / "a" / "a0.png") as reopened:
        assert reopened.mode == "I;16"  # what PIL opens a 16-bit grayscale PNG as
    pixels = first_test_image(root, decode_cache)
    assert abs(pixels.mean() - 69) < 1.5, pixels.mean()  # PIL's convert("L") gives ~252 (clipped)


@pytest.mark.parametrize("decode_cache", [True, False])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, decode_cache):
    stored = np.zeros((32, 32), np.uint8)
    stored[:16] = 255  # stored: top half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise (a phone held upright)
    root = make_folder(tmp_path / "data", {"a0.jpeg": lambda p: Image.fromarray(stored, "L").save(p, exif=exif)})
    pixels = first_test_image(root, decode_cache)[0]
    left, right = pixels[:, : SIZE // 2 - 1].mean(), pixels[:, SIZE // 2 + 1 :].mean()
    assert left < 30 and right > 225, (left, right)  # upright: the white half is on the right


@pytest.mark.parametrize("decode_cache", [True, False])
def test_animated_gif_gives_its_first_frame(tmp_path, decode_cache):
    frames = [Image.new("L", (20, 20), 40), Image.new("L", (20, 20), 220)]
    root = make_folder(
        tmp_path / "data",
        {"a0.gif": lambda p: frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)},
    )
    with Image.open(tmp_path / "data" / "test" / "a" / "a0.gif") as gif:
        assert gif.n_frames == 2
    pixels = first_test_image(root, decode_cache)
    assert abs(pixels.mean() - 40) < 2, pixels.mean()


@pytest.mark.parametrize("decode_cache", [True, False])
def test_la_and_transparent_palette_pngs_load(tmp_path, decode_cache):
    la = Image.fromarray(np.stack([np.full((20, 20), 90, np.uint8), np.full((20, 20), 0, np.uint8)], -1), "LA")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0  # palette entry 0 transparent (unused here): converts via RGBA
    root = make_folder(tmp_path / "data", {"a0.png": la, "a1.png": lambda p: palette.save(p, transparency=0)})
    with Image.open(tmp_path / "data" / "test" / "a" / "a1.png") as im:
        assert im.mode == "P" and "transparency" in im.info
    data = imagefolder(
        root=root, image_size=SIZE, val_from_train=None, num_workers=0, decode_cache=decode_cache, progress=False,
        mean=[0.0] * 3, std=[1 / 255] * 3, hflip=False,
    )  # fmt: skip
    images = next(iter(data.test))["image"]
    assert images[0].mean().item() == pytest.approx(90, abs=0.5)  # the gray value; the alpha (0) is dropped
    assert images[1].mean(dim=(1, 2)).tolist() == pytest.approx([200, 100, 50], abs=0.5)


def test_files_in_sub_folders_of_a_class_are_named_in_a_warning(tmp_path, caplog):
    nested = Image.new("L", (12, 12), 9)
    root = make_folder(tmp_path / "data", {})
    (tmp_path / "data" / "train" / "a" / "rejected" / "old").mkdir(parents=True)
    nested.save(tmp_path / "data" / "train" / "a" / "rejected" / "x.png")
    nested.save(tmp_path / "data" / "train" / "a" / "rejected" / "old" / "y.png")
    with caplog.at_level(logging.WARNING):
        data = imagefolder(root=root, image_size=SIZE, val_from_train=None, num_workers=0, decode_cache=False)
    assert data.class_counts["train"] == [3, 3]  # not used
    warning = next(r.getMessage() for r in caplog.records if "sub-folders" in r.getMessage())
    assert "2 image file(s) in sub-folders of class folders are not used" in warning
    assert "train/a/rejected/old/y.png" in warning and "train/a/rejected/x.png" in warning
    assert "move them up into their class folder" in warning


@pytest.mark.parametrize(
    "mode,values,expected",
    [
        ("I;16B", np.full((4, 4), 69 * 257, np.uint16), 69),  # big-endian 16-bit (TIFF, PGM)
        ("I", np.full((4, 4), 69 * 257, np.int32), 69),  # 16-bit data opened as 32-bit int
        ("I", np.array([[-1000, 3000]] * 2, np.int32), [0, 255]),  # out of 0..65535: min..max
        ("F", np.full((4, 4), 69 / 255, np.float32), 69),  # 0..1 intensities
        ("F", np.array([[-2.0, 6.0]] * 2, np.float32), [0, 255]),  # other floats: min..max
    ],
)
def test_wide_gray_modes_scale_by_their_range(tmp_path, mode, values, expected):
    path = tmp_path / "wide.tiff"
    if mode == "I;16B":
        Image.frombytes(mode, values.shape[::-1], values.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == mode
        out = np.asarray(to_8bit(im))
    assert out.dtype == np.uint8 and np.array_equal(out, np.broadcast_to(np.asarray(expected), out.shape)), out


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "1", "RGBA", "PA"])
def test_other_modes_become_8bit_rgb_or_gray(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "YCbCr") else "x.png")
    if mode in ("YCbCr", "PA"):  # PIL opens a JPEG as RGB and cannot write PA: converted in memory
        image = rgb.convert(mode)
    else:
        image = rgb.convert(mode)
        image.save(path)
        image = Image.open(path)
    assert to_8bit(image).mode == ("L" if mode == "1" else "RGB")
    if mode not in ("YCbCr", "PA"):
        assert load_rgb(str(path)).mode == "RGB"
