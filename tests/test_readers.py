"""ScanReader against PIL, pydicom and nibabel: every expected value is computed here with their functions.

No expectation comes from ``anomalib_mvfa``'s own helpers: the reference values are PIL conversions,
pydicom's modality / VOI / colour LUTs, nibabel's canonical reorientation and numpy percentiles.
Tolerances are stated per test (float32 output against float64 references).
"""

from __future__ import annotations

import logging
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import PIL
import pydicom
import pytest
import tifffile
from nibabel.orientations import apply_orientation, io_orientation
from PIL import Image, ImageDraw, ImageOps
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array

from anomalib_mvfa.data import nifti
from anomalib_mvfa.data.readers import ScanReader, file_format
from anomalib_mvfa.errors import MvfaInputError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
PERCENTILES = (0.5, 99.5)
# float32 output against float64 references
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- independent references


def read_hwc(reader: ScanReader, name: str | Path) -> np.ndarray:
    """The reader's ``3 x H x W`` tensor as ``H x W x 3`` float64, after checking type and range."""
    tensor = reader.read_image(name)
    assert tensor.ndim == 3
    assert tensor.shape[0] == 3
    values = tensor.numpy().astype(np.float64).transpose(1, 2, 0)
    assert values.min() >= 0.0
    assert values.max() <= 1.0
    return values


def grey3(values: np.ndarray) -> np.ndarray:
    """A grey ``H x W`` array as ``H x W x 3``."""
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=-1)


def window_formula(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """``clip((v - (c - w / 2)) / w, 0, 1)``."""
    return np.clip((np.asarray(values, dtype=np.float64) - (centre - width / 2)) / width, 0.0, 1.0)


def percentile_stretch(values: np.ndarray, of: np.ndarray | None = None) -> np.ndarray:
    """0.5th to 99.5th percentile (of ``of``, default ``values``) to 0 and 1, clipped."""
    low, high = np.percentile(np.asarray(values if of is None else of, dtype=np.float64), PERCENTILES)
    return np.clip((np.asarray(values, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def pil_rgb(path: Path) -> np.ndarray:
    """PIL's own conversion of a file to RGB, in ``[0, 1]``."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def dicom_voi_expected(dataset: pydicom.Dataset, stored: np.ndarray | None = None) -> np.ndarray:
    """Pydicom's modality LUT then first VOI window, rescaled to [0, 1] by pydicom's own output range."""
    stored = pixel_array(dataset) if stored is None else stored
    modality = apply_modality_lut(stored, dataset)
    voi = apply_voi_lut(np.asarray(modality, dtype=np.float64), dataset, index=0)
    low, high = apply_voi_lut(np.array([-1e12, 1e12]), dataset, index=0)
    assert high > low
    return (np.asarray(voi, dtype=np.float64) - low) / (high - low)


def png_with_sbit(data: np.ndarray, path: Path, bits: int | None) -> Path:
    """A 16-bit grey PNG of ``data``, with an ``sBIT`` chunk of ``bits`` inserted right after IHDR."""
    buffer = path.with_suffix(".tmp.png")
    Image.fromarray(data).save(buffer)
    raw = buffer.read_bytes()
    buffer.unlink()
    if bits is not None:
        ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, length, type, data, CRC
        assert raw[12:16] == b"IHDR"
        body = b"sBIT" + bytes([bits])
        chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        raw = raw[:ihdr_end] + chunk + raw[ihdr_end:]
    path.write_bytes(raw)
    with Image.open(path) as image:  # still a valid PNG, 16-bit grey
        assert image.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(image), data)
    return path


def canonical_data(image: nib.Nifti1Image) -> np.ndarray:
    """nibabel's closest canonical (RAS+) data."""
    return nib.as_closest_canonical(image).get_fdata()


def display(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A canonical slice shown superior (axial: anterior) up: ``np.take(volume, k, axis).T[::-1]``."""
    return np.take(volume, index, axis=axis).T[::-1]


# ----------------------------------------------------------------------------- 1. every PIL mode


@pytest.fixture
def rgb_array() -> np.ndarray:
    """A smooth colour picture with structure (so that inverted or swapped colours show)."""
    rows, cols = np.mgrid[0:24, 0:32]
    red = (rows * 10) % 256
    green = (cols * 8) % 256
    blue = ((rows + cols) * 5) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _save_mode(mode: str, rgb: np.ndarray, folder: Path) -> Path:
    colour = Image.fromarray(rgb)
    if mode == "P":
        path = folder / "palette.png"
        colour.quantize(colors=32).save(path)
    elif mode == "PA":
        path = folder / "palette_alpha.tif"
        palette = colour.quantize(colors=32)
        with_alpha = palette.convert("PA")
        with_alpha.putalpha(Image.fromarray((rgb[..., 0] // 2 + 10).astype(np.uint8)))
        with_alpha.save(path)
    elif mode == "CMYK":
        path = folder / "cmyk.jpg"
        colour.convert("CMYK").save(path, quality=95)
    elif mode == "YCbCr":
        path = folder / "ycbcr.tif"
        colour.convert("YCbCr").save(path)
    elif mode == "LAB":
        path = folder / "lab.tif"
        colour.convert("LAB").save(path)
    elif mode == "LA":
        path = folder / "grey_alpha.png"
        grey_alpha = colour.convert("LA")
        grey_alpha.putalpha(Image.fromarray(rgb[..., 2]))
        grey_alpha.save(path)
    elif mode == "1":
        path = folder / "bilevel.png"
        colour.convert("L").point(lambda value: 255 if value > 100 else 0).convert("1").save(path)
    else:  # "L"
        path = folder / "grey.png"
        colour.convert("L").save(path)
    return path


def _pillow_major() -> int:
    return int(PIL.__version__.split(".")[0])


@pytest.mark.parametrize("mode", ["P", "PA", "CMYK", "YCbCr", "LAB", "LA", "1", "L"])
def test_pil_8bit_modes_match_pil_conversion(mode: str, rgb_array: np.ndarray, tmp_path: Path) -> None:
    """Colour modes become their colours (not indices or raw channels); tolerance 1e-6 (1/255 for CMYK)."""
    path = _save_mode(mode, rgb_array, tmp_path)
    if mode == "YCbCr" and _pillow_major() < 13:
        # Pillow before 13 cannot read the YCbCr TIFF it writes (it opens it as RGB, then finds it truncated):
        # the reader names the file instead of passing Pillow's error on
        with pytest.raises(MvfaInputError, match=rf"Image '{re.escape(str(path))}' cannot be decoded"):
            ScanReader(intensity="range").read_image(path)
        return
    with Image.open(path) as image:
        assert image.mode == mode  # the file really is of that mode
    expected = pil_rgb(path)
    got = read_hwc(ScanReader(intensity="range"), path)
    assert got.shape == expected.shape
    tolerance = 1 / 255 + 1e-6 if mode == "CMYK" else 1e-6
    np.testing.assert_allclose(got, expected, atol=tolerance)
    if mode in {"P", "PA", "CMYK", "YCbCr", "LAB"}:
        # colours, not palette indices nor inverted ink: each channel correlates with the original
        for channel in range(3):
            correlation = np.corrcoef(got[..., channel].ravel(), rgb_array[..., channel].ravel().astype(float))[0, 1]
            assert correlation > 0.9, (mode, channel, correlation)


@pytest.mark.parametrize(
    ("mode", "suffix", "byteorder"),
    [("I;16", ".png", None), ("I;16", ".tif", "<"), ("I;16B", ".tif", ">")],
)
def test_pil_16bit_grey_byte_orders(mode: str, suffix: str, byteorder: str | None, tmp_path: Path) -> None:
    """16-bit grey in either byte order: value / 65535 under "range" (tolerance 1e-6)."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65536, size=(20, 28), dtype=np.uint16)
    data[0, 0], data[0, 1] = 0, 65535
    path = tmp_path / f"grey16{suffix}"
    if suffix == ".png":
        Image.fromarray(data).save(path)
    else:
        tifffile.imwrite(path, data, byteorder=byteorder, photometric="minisblack")
    with Image.open(path) as image:
        assert image.mode == mode
        stored = np.asarray(image).astype(np.float64)
    np.testing.assert_array_equal(stored, data)
    got = read_hwc(ScanReader(intensity="range"), path)
    np.testing.assert_allclose(got, grey3(stored / 65535.0), atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "dtype", "low", "high", "window"),
    [("I", np.int32, -5000, 70000, (30000.0, 50000.0)), ("F", np.float32, -2.5, 3.5, (0.5, 4.0))],
)
def test_pil_int32_and_float_under_window(
    mode: str, dtype: type, low: float, high: float, window: tuple[float, float], tmp_path: Path
) -> None:
    """``I`` (int32) and ``F`` (float32) TIFFs under a window: clip((v - (c - w/2)) / w), tolerance 1e-5."""
    rng = np.random.default_rng(2)
    data = rng.uniform(low, high, size=(18, 22)).astype(dtype)
    path = tmp_path / f"{mode}.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    with Image.open(path) as image:
        assert image.mode == mode
        stored = np.asarray(image).astype(np.float64)
    expected = window_formula(stored, *window)
    assert 0.05 < (expected == 0).mean() + (expected == 1).mean() < 0.95  # the window clips some, not all
    got = read_hwc(ScanReader(intensity="window", window=window), path)
    np.testing.assert_allclose(got, grey3(expected), atol=TOLERANCE)


# ----------------------------------------------------------------------------- 2. EXIF orientation


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_keeps_image_and_mask_aligned(
    orientation: int, suffix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Image equals ``ImageOps.exif_transpose``; a red marker lands on the mask's marked pixels."""
    height, width = 48, 64
    picture = Image.new("RGB", (width, height), (60, 60, 60))
    draw = ImageDraw.Draw(picture)
    marker = (8, 16, 23, 31)  # x0, y0, x1, y1 (inclusive), off-centre and block-aligned
    draw.rectangle(marker, fill=(250, 10, 10))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(marker, fill=255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image_path, mask_path = tmp_path / f"photo{suffix}", tmp_path / f"photo_mask{suffix}"
    options = {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}
    picture.save(image_path, exif=exif, **options)
    mask.save(mask_path, exif=exif, **options)

    with Image.open(image_path) as opened:
        assert opened.getexif().get(0x0112) == orientation
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"), dtype=np.float64) / 255.0
    with Image.open(mask_path) as opened:
        expected_mask = np.asarray(ImageOps.exif_transpose(opened).convert("L")) >= 128

    reader = ScanReader()
    got = read_hwc(reader, image_path)
    rotated = (width, height) if orientation in {6, 8} else (height, width)
    assert got.shape[:2] == rotated
    assert reader.image_size(str(image_path)) == rotated
    np.testing.assert_allclose(got, expected, atol=1e-6)

    with caplog.at_level(logging.WARNING):
        got_mask = reader.read_mask(mask_path).numpy()
    assert got_mask.shape == rotated
    np.testing.assert_array_equal(got_mask.astype(bool), expected_mask)
    red_marker = (got[..., 0] - got[..., 1]) > 0.5
    assert red_marker.sum() == 16 * 16
    np.testing.assert_array_equal(red_marker, got_mask.astype(bool))
    # and the marker did move: it is not where it was before the rotation
    unrotated = np.zeros((height, width), dtype=bool)
    unrotated[16:32, 8:24] = True
    assert red_marker.shape != unrotated.shape or not np.array_equal(red_marker, unrotated)


# ----------------------------------------------------------------------------- 3. high bit depth


@pytest.fixture
def twelve_bit() -> np.ndarray:
    """12-bit values in a uint16 array, with a few outliers so that the percentile stretch clips."""
    rng = np.random.default_rng(3)
    data = rng.normal(1500, 400, size=(40, 50)).clip(0, 4095).astype(np.uint16)
    data[0, :5] = 4095
    data[1, :5] = 0
    return data


def test_png_sbit_declares_12_bits(twelve_bit: np.ndarray, tmp_path: Path) -> None:
    """sBIT 12: default reader gives value / 4095 (tolerance 1e-6)."""
    path = png_with_sbit(twelve_bit, tmp_path / "sbit12.png", bits=12)
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, grey3(twelve_bit / 4095.0), atol=1e-6)
    got_bits = read_hwc(ScanReader(intensity="bits"), path)
    np.testing.assert_allclose(got_bits, grey3(twelve_bit / 4095.0), atol=1e-6)


def test_png_16bit_without_sbit(twelve_bit: np.ndarray, tmp_path: Path) -> None:
    """No sBIT: "auto" is the 0.5/99.5 percentile stretch; "range" divides by 65535 (tolerance 1e-5)."""
    path = png_with_sbit(twelve_bit, tmp_path / "plain16.png", bits=None)
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, grey3(percentile_stretch(twelve_bit)), atol=TOLERANCE)
    got_range = read_hwc(ScanReader(intensity="range"), path)
    np.testing.assert_allclose(got_range, grey3(twelve_bit / 65535.0), atol=1e-6)


def test_tiff_max_sample_value_under_bits(twelve_bit: np.ndarray, tmp_path: Path) -> None:
    """TIFF MaxSampleValue (tag 281) = 4095 under "bits": value / 4095; "range" still / 65535."""
    path = tmp_path / "max_sample.tif"
    tifffile.imwrite(path, twelve_bit, photometric="minisblack", extratags=[(281, "H", 1, 4095, True)])
    with tifffile.TiffFile(path) as tiff:
        assert tiff.pages[0].tags[281].value == 4095
    got = read_hwc(ScanReader(intensity="bits"), path)
    np.testing.assert_allclose(got, grey3(twelve_bit / 4095.0), atol=1e-6)
    got_range = read_hwc(ScanReader(intensity="range"), path)
    np.testing.assert_allclose(got_range, grey3(twelve_bit / 65535.0), atol=1e-6)


def test_signed_16bit_tiff_under_range(tmp_path: Path) -> None:
    """int16 TIFF: -32768..32767 maps to 0..1 (PIL widens it to int32; the file says int16)."""
    rng = np.random.default_rng(4)
    data = rng.integers(-32768, 32768, size=(16, 20), dtype=np.int16)
    data[0, 0], data[0, 1], data[0, 2] = -32768, 32767, 0
    path = tmp_path / "signed.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    assert tifffile.imread(path).dtype == np.int16
    got = read_hwc(ScanReader(intensity="range"), path)
    expected = (data.astype(np.float64) + 32768.0) / 65535.0
    np.testing.assert_allclose(got, grey3(expected), atol=1e-6)
    assert got[0, 0, 0] == 0.0
    assert got[0, 1, 0] == 1.0


@pytest.fixture
def hounsfield_tiff(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A float32 TIFF in Hounsfield units (-1000..2000) and its stored values."""
    rng = np.random.default_rng(5)
    data = rng.uniform(-1000, 2000, size=(30, 30)).astype(np.float32)
    data[:10] = rng.uniform(0, 80, size=(10, 30))  # some tissue inside the window
    path = tmp_path / "hu.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    return path, tifffile.imread(path).astype(np.float64)


def test_float_tiff_hounsfield_window(hounsfield_tiff: tuple[Path, np.ndarray]) -> None:
    """Float32 HU under window (40, 80): clip((v - 0) / 80), tolerance 1e-5."""
    path, stored = hounsfield_tiff
    expected = window_formula(stored, 40, 80)
    assert 0 < ((expected > 0) & (expected < 1)).mean() < 1
    got = read_hwc(ScanReader(intensity="window", window=(40, 80)), path)
    np.testing.assert_allclose(got, grey3(expected), atol=TOLERANCE)


@pytest.mark.parametrize("intensity", ["auto", "percentile"])
def test_float_tiff_hounsfield_percentiles(intensity: str, hounsfield_tiff: tuple[Path, np.ndarray]) -> None:
    """Float32 HU under "auto" / "percentile": np.percentile(image, (0.5, 99.5)) stretch, tolerance 1e-5.

    The percentiles are those of the grey image's values, as for the same values in a DICOM file.
    """
    path, stored = hounsfield_tiff
    got = read_hwc(ScanReader(intensity=intensity), path)
    np.testing.assert_allclose(got, grey3(percentile_stretch(stored)), atol=TOLERANCE)


def test_multipage_tiff_pages_are_samples(tmp_path: Path) -> None:
    """3 pages: 3 samples ``...#frame=00k``, each reads its own page (value / 255 under "range")."""
    rng = np.random.default_rng(6)
    pages = rng.integers(0, 256, size=(3, 12, 14), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages, photometric="minisblack")
    with Image.open(path) as image:
        assert image.n_frames == 3
    reader = ScanReader(intensity="range")
    names = reader.samples(path)
    assert names == [f"{path}#frame={index:03d}" for index in range(3)]
    with tifffile.TiffFile(path) as tiff:
        expected_pages = [page.asarray() for page in tiff.pages]
    for name, page in zip(names, expected_pages, strict=True):
        np.testing.assert_allclose(read_hwc(reader, name), grey3(page / 255.0), atol=1e-6)


# ----------------------------------------------------------------------------- 4. DICOM


MR_SMALL = get_testdata_file("MR_small.dcm")
CT_SMALL = get_testdata_file("CT_small.dcm")


def test_dicom_mr_small_file_window() -> None:
    """MR_small under "auto": pydicom's modality then VOI (first window), over its output range; 1e-5."""
    dataset = pydicom.dcmread(MR_SMALL)
    assert "WindowCenter" in dataset
    expected = dicom_voi_expected(dataset)
    modality = np.asarray(apply_modality_lut(pixel_array(dataset), dataset), dtype=np.float64)
    assert np.ptp(expected) > 0.5
    assert np.abs(expected - percentile_stretch(modality)).max() > 0.01  # the file's window, not percentiles
    got = read_hwc(ScanReader(), MR_SMALL)
    np.testing.assert_array_equal(got[..., 0], got[..., 1])
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    np.testing.assert_allclose(got[..., 0], expected, atol=TOLERANCE)


def test_dicom_ct_small_window_and_percentile() -> None:
    """CT_small: window (40, 400) on pydicom's Hounsfield units; "auto" is the percentile stretch of HU."""
    dataset = pydicom.dcmread(CT_SMALL)
    assert "WindowCenter" not in dataset
    hounsfield = np.asarray(apply_modality_lut(pixel_array(dataset), dataset), dtype=np.float64)
    assert hounsfield.min() < 0  # the rescale intercept was applied: these are HU, not stored values
    got = read_hwc(ScanReader(intensity="window", window=(40, 400)), CT_SMALL)
    np.testing.assert_allclose(got, grey3(window_formula(hounsfield, 40, 400)), atol=TOLERANCE)
    got_auto = read_hwc(ScanReader(), CT_SMALL)
    np.testing.assert_allclose(got_auto, grey3(percentile_stretch(hounsfield)), atol=TOLERANCE)


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    """MR_small saved as MONOCHROME1 reads as 1 minus its MONOCHROME2 expectation."""
    dataset = pydicom.dcmread(MR_SMALL)
    expected = 1.0 - dicom_voi_expected(dataset)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    dataset.save_as(path)
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, grey3(expected), atol=TOLERANCE)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_dicom_lossless_compressed_equal_uncompressed(name: str) -> None:
    """RLE, JPEG 2000 lossless and JPEG-LS lossless MR_small read as MR_small's expectation."""
    expected = dicom_voi_expected(pydicom.dcmread(MR_SMALL))
    path = get_testdata_file(name)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, grey3(expected), atol=TOLERANCE)


def test_dicom_jpeg2000_lossy_same_pipeline() -> None:
    """JPEG2000.dcm (no window) under "auto": pydicom's decoded values, modality LUT, percentile stretch."""
    path = get_testdata_file("JPEG2000.dcm")
    dataset = pydicom.dcmread(path)
    assert "WindowCenter" not in dataset
    values = np.asarray(apply_modality_lut(pixel_array(dataset), dataset), dtype=np.float64)
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, grey3(percentile_stretch(values)), atol=TOLERANCE)


def test_dicom_rgb() -> None:
    """SC_rgb_rle.dcm: read * 255 equals pydicom's pixel_array (tolerance 1e-4)."""
    path = get_testdata_file("SC_rgb_rle.dcm")
    expected = pixel_array(path).astype(np.float64)
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got * 255.0, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"])
def test_dicom_ybr_is_converted_to_rgb(name: str) -> None:
    """YBR (uncompressed and JPEG): pydicom's RGB / 255, not the raw YBR (tolerance 1e-6)."""
    path = get_testdata_file(name)
    assert pydicom.dcmread(path).PhotometricInterpretation.startswith("YBR")
    rgb = pixel_array(path).astype(np.float64) / 255.0
    raw = pixel_array(path, as_rgb=False).astype(np.float64) / 255.0
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, rgb, atol=1e-6)
    assert np.abs(got - raw).max() > 0.1


def test_dicom_palette_under_range() -> None:
    """examples_palette.dcm under "range": pydicom's apply_color_lut (uint16) / 65535 (tolerance 1e-6)."""
    path = get_testdata_file("examples_palette.dcm")
    dataset = pydicom.dcmread(path)
    colours = apply_color_lut(pixel_array(dataset), dataset)
    assert colours.dtype == np.uint16
    expected = colours.astype(np.float64) / np.iinfo(colours.dtype).max
    got = read_hwc(ScanReader(intensity="range"), path)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_dicom_palette_under_default() -> None:
    """examples_palette.dcm under the default: the LUT's colours over the LUT's own bit depth.

    The palette LUT descriptor says its entries have 16 bits, so the colours are entry / 65535 (as under
    "range"), not entry / (2**BitsStored - 1) (BitsStored = 8 is the depth of the indices), which
    saturates most of the picture to white.
    """
    path = get_testdata_file("examples_palette.dcm")
    dataset = pydicom.dcmread(path)
    colours = apply_color_lut(pixel_array(dataset), dataset)
    lut_bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
    expected = colours.astype(np.float64) / (2**lut_bits - 1)
    got = read_hwc(ScanReader(), path)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_dicom_multiframe_rgb() -> None:
    """SC_rgb_rle_2frame.dcm: 2 samples ``#frame=000``/``#frame=001``, each its own frame / 255."""
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    reader = ScanReader()
    names = reader.samples(path)
    assert names == [f"{path}#frame=000", f"{path}#frame=001"]
    frames = pixel_array(path).astype(np.float64) / 255.0
    assert np.abs(frames[0] - frames[1]).max() > 0.1  # the frames differ
    for index, name in enumerate(names):
        np.testing.assert_allclose(read_hwc(reader, name), frames[index], atol=1e-6)


def test_dicom_multiframe_ybr_30_frames() -> None:
    """examples_ybr_color.dcm: 30 samples; the last frame reads as pydicom's RGB frame 29 / 255."""
    path = get_testdata_file("examples_ybr_color.dcm")
    names = ScanReader().samples(path)
    assert len(names) == int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == 30
    assert names[-1] == f"{path}#frame=029"
    expected = pixel_array(path, index=29).astype(np.float64) / 255.0
    np.testing.assert_allclose(read_hwc(ScanReader(), names[-1]), expected, atol=1e-6)


def test_dicom_without_suffix(tmp_path: Path) -> None:
    """CT_small copied to ``IM0001`` is found by its content and read like the original."""
    path = tmp_path / "IM0001"
    shutil.copyfile(CT_SMALL, path)
    assert file_format(path) == "dicom"
    assert file_format(tmp_path / "notes") is None  # a missing file without suffix is not DICOM
    reader = ScanReader(intensity="window", window=(40, 400))
    assert reader.samples(path) == [str(path)]
    dataset = pydicom.dcmread(CT_SMALL)
    hounsfield = apply_modality_lut(pixel_array(dataset), dataset)
    np.testing.assert_allclose(read_hwc(reader, path), grey3(window_formula(hounsfield, 40, 400)), atol=TOLERANCE)


def test_dicom_without_pixel_data(caplog: pytest.LogCaptureFixture) -> None:
    """reportsi.dcm: skipped with a warning naming it; under non_image_files="error" a ValueError naming it."""
    path = get_testdata_file("reportsi.dcm")
    assert "PixelData" not in pydicom.dcmread(path)
    with caplog.at_level(logging.WARNING):
        assert ScanReader().samples(path) == []
    assert any(record.levelno == logging.WARNING and path in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match=re.escape(path)):
        ScanReader(non_image_files="error").samples(path)


def test_dicom_truncated() -> None:
    """MR_truncated.dcm: a ValueError naming the file."""
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(ValueError, match=re.escape(path)):
        ScanReader().read_image(path)


def test_dicom_transfer_syntax_without_decoder(tmp_path: Path) -> None:
    """MPEG2 pixel data: a ValueError naming the file and the transfer syntax."""
    uid = pydicom.uid.UID("1.2.840.10008.1.2.4.100")
    with pytest.raises(NotImplementedError):
        get_decoder(uid)  # pydicom has no decoder at all for it
    dataset = pydicom.dcmread(CT_SMALL)
    dataset.file_meta.TransferSyntaxUID = uid
    dataset.PixelData = encapsulate([dataset.PixelData])
    dataset["PixelData"].VR = "OB"
    path = tmp_path / "mpeg2.dcm"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError, match=re.escape(str(path))) as caught:
        ScanReader().read_image(path)
    assert uid.name in str(caught.value)
    assert "MPEG2" in uid.name


def test_dicom_jpeg_extended_12bit() -> None:
    """JPGExtended.dcm: an error naming the file, 'JPEG Extended' and the missing decoder, or pydicom's values."""
    path = get_testdata_file("JPGExtended.dcm")
    dataset = pydicom.dcmread(path)
    uid = dataset.file_meta.TransferSyntaxUID
    missing = list(get_decoder(uid).missing_dependencies)
    try:
        stored = pixel_array(dataset)
    except Exception:  # pydicom cannot decode it here: the reader must say why
        stored = None
    if stored is None:
        assert missing  # nothing decodes it, so something is missing
        with pytest.raises(ValueError, match=re.escape(path)) as caught:
            ScanReader().read_image(path)
        message = str(caught.value)
        assert "JPEG Extended" in message
        for dependency in missing:
            assert dependency.split()[0] in message
    else:
        values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
        expected = dicom_voi_expected(dataset, stored) if "WindowCenter" in dataset else percentile_stretch(values)
        np.testing.assert_allclose(read_hwc(ScanReader(), path), grey3(expected), atol=TOLERANCE)


# ----------------------------------------------------------------------------- 5. NIfTI


ANATOMICAL = NIBABEL_DATA / "anatomical.nii"
EXAMPLE_4D = NIBABEL_DATA / "example4d.nii.gz"


@pytest.mark.parametrize(("axis_name", "axis"), [("axial", 2), ("coronal", 1), ("sagittal", 0)])
def test_nifti_slices_match_nibabel_canonical(axis_name: str, axis: int) -> None:
    """anatomical.nii (LAS on disk): a middle slice is nibabel's canonical slice, shown ``.T[::-1]``.

    Percentiles are those of the whole volume; tolerance 1e-4. The sample count is the canonical axis length.
    """
    image = nib.load(ANATOMICAL)
    assert nib.aff2axcodes(image.affine) != ("R", "A", "S")
    volume = canonical_data(image)
    count = volume.shape[axis]
    reader = ScanReader(intensity="percentile", slice_axis=axis_name)
    names = reader.samples(ANATOMICAL)
    assert names == [f"{ANATOMICAL}#{axis_name}={index:03d}" for index in range(count)]
    low, high = np.percentile(volume, PERCENTILES)
    for index in (count // 2, count // 3):
        expected = np.clip((display(volume, axis, index) - low) / (high - low), 0.0, 1.0)
        got = read_hwc(reader, names[index])
        assert got.shape[:2] == expected.shape
        assert reader.image_size(names[index]) == expected.shape
        np.testing.assert_allclose(got, grey3(expected), atol=1e-4)


def test_nifti_4d_time_point() -> None:
    """example4d.nii.gz, time_point=1: the canonical slices of ``get_fdata()[..., 1]`` (window, 1e-5)."""
    image = nib.load(EXAMPLE_4D)
    data = image.get_fdata()
    orientation = io_orientation(image.affine)
    first = apply_orientation(data[..., 0], orientation)
    second = apply_orientation(data[..., 1], orientation)
    # the same through a 3D image of that time point
    np.testing.assert_array_equal(second, canonical_data(nib.Nifti1Image(data[..., 1], image.affine)))
    window = (float(data.min() + data.max()) / 2, float(data.max() - data.min()))
    index = second.shape[2] // 2
    name = f"{EXAMPLE_4D}#axial={index:03d}"
    got = read_hwc(ScanReader(intensity="window", window=window, time_point=1), name)
    expected = window_formula(display(second, 2, index), *window)
    np.testing.assert_allclose(got, grey3(expected), atol=TOLERANCE)
    assert np.abs(expected - window_formula(display(first, 2, index), *window)).max() > 1e-3
    assert len(ScanReader(time_point=1).samples(EXAMPLE_4D)) == second.shape[2]

    beyond = image.shape[3]
    with pytest.raises(ValueError, match=re.escape(str(EXAMPLE_4D))):
        ScanReader(time_point=beyond).samples(EXAMPLE_4D)
    with pytest.raises(ValueError, match=re.escape(str(EXAMPLE_4D))):
        ScanReader(time_point=beyond).read_image(name)


def test_nifti_skip_empty_slices(tmp_path: Path) -> None:
    """skip_empty_slices drops exactly the slices that hold only the volume's minimum (canonical order)."""
    rng = np.random.default_rng(7)
    data = rng.uniform(1, 100, size=(10, 12, 9)).astype(np.float32)
    data[:, :, [0, 1, 4, 8]] = 0.0  # zero padding, and an empty slice in the middle
    data[3, 5, 7] = 0.0  # a slice with some background is not empty
    data[:, :, 6] = 0.0
    data[2, 2, 6] = 50.0  # a single voxel of tissue keeps slice 6
    affine = np.diag([-1.5, 1.0, -2.0, 1.0])  # L, A, I: the axial order reverses in canonical space
    path = tmp_path / "padded.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    canonical = canonical_data(nib.load(path))
    non_empty = [k for k in range(canonical.shape[2]) if not (canonical[:, :, k] == canonical.min()).all()]
    assert len(non_empty) == 5
    assert non_empty != [k for k in range(9) if k not in {0, 1, 4, 8}]  # the order did change
    names = ScanReader(skip_empty_slices=True).samples(path)
    assert names == [f"{path}#axial={k:03d}" for k in non_empty]
    assert len(ScanReader().samples(path)) == canonical.shape[2]


def test_nifti_range_is_the_stored_type_through_the_scaling(tmp_path: Path) -> None:
    """int16 stored with an intercept of -1024 (CT in NIfTI): "range" maps the scaled type range to [0, 1]."""
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 3000, size=(8, 9, 3)).astype(np.int16)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(image, path)
    hounsfield = canonical_data(nib.load(path))[:, :, 1].T[::-1]  # nibabel applies the intercept
    info = np.iinfo(np.int16)
    expected = (hounsfield - (info.min - 1024.0)) / (info.max - info.min)
    np.testing.assert_allclose(
        read_hwc(ScanReader(intensity="range"), f"{path}#axial=001"), grey3(expected), atol=TOLERANCE
    )


def test_an_8_bit_dicom_with_a_window_is_shown_through_it(tmp_path: Path) -> None:
    """Under "auto" the file's window wins over the 8-bit rule (liver_1frame.dcm with a window added)."""
    dataset = pydicom.dcmread(get_testdata_file("liver_1frame.dcm"))
    dataset.WindowCenter, dataset.WindowWidth = 100, 80
    path = tmp_path / "windowed.dcm"
    dataset.save_as(path)
    dataset = pydicom.dcmread(path)
    expected = dicom_voi_expected(dataset, dataset.pixel_array)
    np.testing.assert_allclose(read_hwc(ScanReader(), path), grey3(expected), atol=TOLERANCE)


def test_nifti_check_label_volume(tmp_path: Path) -> None:
    """A label volume with another affine or shape: ValueError naming both files."""
    data = np.zeros((6, 7, 5), dtype=np.int16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    image_path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), image_path)
    same = tmp_path / "same_label.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), same)
    nifti.check_label_volume(image_path, same)  # no error
    shifted = affine.copy()
    shifted[0, 3] = 5.0
    other_affine = tmp_path / "shifted_label.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.uint8), shifted), other_affine)
    other_shape = tmp_path / "small_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 4), dtype=np.uint8), affine), other_shape)
    for label in (other_affine, other_shape):
        with pytest.raises(ValueError, match=re.escape(str(label))) as caught:
            nifti.check_label_volume(image_path, label)
        assert str(image_path) in str(caught.value)


@pytest.mark.parametrize("source", ["synthetic", "example4d"])
def test_nifti_cal_window_under_auto(source: str, tmp_path: Path) -> None:
    """cal_min/cal_max set: "auto" is clip((v - cal_min) / (cal_max - cal_min)), not the percentile stretch."""
    if source == "synthetic":
        rng = np.random.default_rng(8)
        data = rng.normal(50, 30, size=(12, 10, 6)).astype(np.int16)
        image = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 1.0, 1.0]))
        image.header["cal_min"], image.header["cal_max"] = 20.0, 80.0
        path = tmp_path / "calibrated.nii"
        nib.save(image, path)
    else:
        path = EXAMPLE_4D
    loaded = nib.load(path)
    low, high = float(loaded.header["cal_min"]), float(loaded.header["cal_max"])
    assert high > low
    volume = canonical_data(
        nib.Nifti1Image(loaded.get_fdata()[..., 0] if loaded.ndim == 4 else loaded.get_fdata(), loaded.affine)
    )
    index = volume.shape[2] // 2
    plane = display(volume, 2, index)
    expected = np.clip((plane - low) / (high - low), 0.0, 1.0)
    assert np.abs(expected - percentile_stretch(plane, of=volume)).max() > 0.01
    got = read_hwc(ScanReader(), f"{path}#axial={index:03d}")
    np.testing.assert_allclose(got, grey3(expected), atol=TOLERANCE)


# ----------------------------------------------------------------------------- 6. write_volume


@pytest.mark.parametrize(("dtype", "suffix"), [(np.float32, ".nii.gz"), (np.uint8, ".nii")])
def test_write_volume_round_trip(dtype: type, suffix: str, tmp_path: Path) -> None:
    """Display-oriented axial slices written back land on the source's grid, affine and values."""
    rng = np.random.default_rng(9)
    shape = (6, 7, 5)
    if dtype == np.uint8:
        data = rng.integers(0, 256, size=shape).astype(np.float32)
    else:
        data = rng.normal(0, 100, size=shape).astype(np.float32)
    # i -> posterior, j -> superior, k -> left: permuted and flipped against RAS
    affine = np.array([[0.0, 0.0, -2.0, 10.0], [-1.5, 0.0, 0.0, 5.0], [0.0, 1.2, 0.0, -3.0], [0.0, 0.0, 0.0, 1.0]])
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    folder = tmp_path / "out"
    folder.mkdir()
    source = folder / "source.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)
    source_image = nib.load(source)
    canonical = canonical_data(source_image)
    slices = {k: display(canonical, 2, k) for k in range(canonical.shape[2])}

    # the reader shows those very slices (a window spanning the data, tolerance 1e-5)
    window = (float(data.min() + data.max()) / 2, float(data.max() - data.min()))
    reader = ScanReader(intensity="window", window=window)
    names = reader.samples(source)
    assert len(names) == canonical.shape[2]
    for k in (0, canonical.shape[2] - 1):
        np.testing.assert_allclose(read_hwc(reader, names[k]), grey3(window_formula(slices[k], *window)), atol=1e-5)

    destination = folder / f"maps{suffix}"
    written = nifti.write_volume(slices, source, destination, "axial", dtype=dtype)
    assert Path(written) == destination
    result = nib.load(destination)
    np.testing.assert_allclose(result.affine, source_image.affine, atol=1e-6)
    assert result.shape == source_image.shape
    assert result.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(result.get_fdata(), source_image.get_fdata(), rtol=1e-6, atol=1e-4)
    assert sorted(path.name for path in folder.iterdir()) == sorted([source.name, destination.name])


@pytest.mark.parametrize("suffix", [".pgm", ".ppm", ".gif", ".jp2"])
def test_the_image_formats_anomalib_lists_are_read_as_pil_reads_them(suffix: str, tmp_path: Path) -> None:
    """Files anomalib's own prediction dataset lists (PGM, PPM), and GIF and JPEG 2000, read through PIL."""
    rng = np.random.default_rng(11)
    data = (rng.random((9, 7, 3)) * 255).astype(np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(data[..., 0] if suffix == ".pgm" else data).save(path)
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    assert file_format(path) == "image"
    np.testing.assert_allclose(read_hwc(ScanReader(), path), expected, atol=TOLERANCE)


@pytest.mark.parametrize(
    ("module", "name", "purpose"),
    [("nibabel", "scan.nii.gz#axial=0", "Reading NIfTI files"), ("pydicom", "scan.dcm", "Reading DICOM files")],
)
def test_a_missing_medical_extra_is_named_with_how_to_install_it(module, name, purpose, tmp_path, monkeypatch) -> None:
    (tmp_path / name.split("#")[0]).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # "import <module>" now fails as when it is not installed
    with pytest.raises(ImportError, match=rf"^{purpose} needs {module}: pip install 'anomalib-mvfa\[medical\]'\.$"):
        ScanReader().read_image(tmp_path / name)
