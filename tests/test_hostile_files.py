"""Hostile and broken scan files: refused with one line naming the file, in bounded memory.

The resource cases run in a subprocess whose address space is capped (``RLIMIT_AS``) at its
size after the imports plus :data:`HEADROOM`: a reader that allocates what such a file declares
fails there with ``MemoryError`` (or is killed) instead of refusing it by name.
"""

from __future__ import annotations

import gzip
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut, apply_windowing

from anomalib_mvfa.data import ScanReader
from anomalib_mvfa.data.dicom import file_window
from anomalib_mvfa.errors import MvfaInputError

# Most memory a refusal may take above the process's size after its imports
HEADROOM = int(1.5 * 2**30)
# A small budget for the cases a budget refuses (what a user of a small machine would set)
SMALL_BUDGET = 2**26

CHILD = """
import json, resource, sys, warnings
from anomalib_mvfa.data import ScanReader

def size_of(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

cases, headroom = json.loads(sys.argv[1]), int(sys.argv[2])
limit = size_of("VmSize:") + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
outcomes = {}
for case, (action, name, budget) in cases.items():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak (VmHWM) starts again from the present size
    baseline = size_of("VmRSS:")
    try:
        reader = ScanReader(max_decoded_bytes=budget) if budget else ScanReader()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning for large images
            result = getattr(reader, action)(name)
        outcome = {"result": len(result) if isinstance(result, list) else "read"}
    except Exception as error:
        outcome = {"error": type(error).__name__, "message": str(error)}
    outcome["grown"] = size_of("VmHWM:") - baseline
    outcomes[case] = outcome
print(json.dumps(outcomes))
"""


def run_capped(cases: dict[str, tuple[str, str, int | None]]) -> dict[str, dict]:
    """``ScanReader(max_decoded_bytes=budget).<action>(name)`` of each case, in one subprocess capped at its size
    after the imports plus :data:`HEADROOM`; each case's outcome and how much its peak memory grew."""
    env = {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases), str(HEADROOM)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, f"the capped reader died ({completed.returncode}): {completed.stderr[-2000:]}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- files


def lying_frames_dicom(path: Path, frames: int) -> Path:
    """CT_small (one 128 x 128 frame of 16 bits, 32768 bytes) declaring ``frames`` frames."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.NumberOfFrames = frames
    dataset.save_as(path)
    return path


def rle_bomb_dicom(path: Path) -> Path:
    """pydicom's MR_small_RLE (a few kilobytes of RLE data) declaring 60000 x 60000 pixels."""
    dataset = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    dataset.Rows = dataset.Columns = 60000
    dataset.save_as(path)
    return path


def deflated_bomb_dicom(path: Path, rows: int) -> Path:
    """CT_small in the deflated transfer syntax declaring ``rows x rows`` 16-bit pixels, all zeros (a few MB)."""
    from pydicom.filebase import DicomBytesIO  # noqa: PLC0415
    from pydicom.filewriter import write_dataset, write_file_meta_info  # noqa: PLC0415
    from pydicom.uid import DeflatedExplicitVRLittleEndian  # noqa: PLC0415

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.Rows = dataset.Columns = rows
    del dataset.PixelData
    meta, body = DicomBytesIO(), DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    body.is_little_endian, body.is_implicit_VR = True, False
    write_file_meta_info(meta, dataset.file_meta)
    write_dataset(body, dataset)
    pixels = 2 * rows * rows
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels)  # explicit VR: tag, VR, 0, length
    compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as file:
        file.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        file.write(compressor.compress(body.getvalue() + pixel_header))
        chunk = bytes(2**24)
        for _ in range(pixels // len(chunk)):
            file.write(compressor.compress(chunk))
        file.write(compressor.compress(bytes(pixels % len(chunk))) + compressor.flush())
    return path


def nifti_header_only(path: Path, header: nib.Nifti1Header, shape: tuple[int, ...], data: bytes) -> Path:
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    offset = len(header.binaryblock) + 4  # the header, then 4 bytes of extension flags
    header["vox_offset"] = offset
    path.write_bytes(header.binaryblock + b"\0" * 4 + data)
    return path


def zeros_nifti_gz(path: Path, shape: tuple[int, int, int]) -> Path:
    """A ``.nii.gz`` of uint8 zeros, written a slice at a time (it inflates about a thousandfold)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = len(header.binaryblock) + 4
    with gzip.open(path, "wb", compresslevel=6) as file:
        file.write(header.binaryblock + b"\0" * 4)
        plane = bytes(shape[0] * shape[1])
        for _ in range(shape[2]):
            file.write(plane)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_png(path: Path, width: int, height: int) -> Path:
    """An 8-bit RGB PNG of zeros, compressed a row at a time (``width x height`` pixels in kilobytes)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte and the pixels
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------- resource cases


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every resource case read in one capped subprocess (the imports take most of its time)."""
    folder = tmp_path_factory.mktemp("hostile")
    frames = lying_frames_dicom(folder / "frames.dcm", 2**31 - 1)
    rle = rle_bomb_dicom(folder / "rle.dcm")
    cube = nifti_header_only(folder / "cube.nii", nib.Nifti1Header(), (32767,) * 3, bytes(128))
    long = nifti_header_only(folder / "long.nii", nib.Nifti2Header(), (2, 2, 2**33), bytes(16))
    zeros = zeros_nifti_gz(folder / "zeros.nii.gz", (1000, 1000, 900))
    huge = zeros_png(folder / "huge.png", 12000, 12000)
    deflated = deflated_bomb_dicom(folder / "deflated.dcm", 30000)  # 1.7 GiB of pixels
    assert deflated.stat().st_size < 2**23
    assert rle.stat().st_size < 10_000
    assert cube.stat().st_size == 480
    assert zeros.stat().st_size < 2**21  # a thousandfold inflation
    assert huge.stat().st_size < 2**20
    return run_capped({
        "frames listed": ("samples", str(frames), None),
        "frames read": ("read_image", str(frames), None),
        "rle read": ("read_image", str(rle), None),
        "cube listed": ("samples", str(cube), None),
        "cube read": ("read_image", f"{cube}#axial=0", None),
        "long listed": ("samples", str(long), None),
        "zeros read": ("read_image", f"{zeros}#axial=0", SMALL_BUDGET),
        "zeros sagittal read": ("read_image", f"{zeros}#sagittal=999", SMALL_BUDGET),
        "zeros mask read": ("read_mask", f"{zeros}#coronal=500", SMALL_BUDGET),
        "huge read": ("read_image", str(huge), SMALL_BUDGET),
        "deflated listed": ("samples", str(deflated), SMALL_BUDGET),
        "deflated small budget read": ("read_image", str(deflated), SMALL_BUDGET),
        "deflated read": ("read_image", str(deflated), None),
        "huge mask read": ("read_mask", str(huge), SMALL_BUDGET),
        "huge read within a large budget": ("read_image", str(huge), 2**31),
    })  # fmt: skip


# case of the capped run: the message a user sees (a pattern)
REFUSALS = {
    "frames read": r"DICOM '.*frames\.dcm' declares 2147483647 frame\(s\) of 128 x 128 pixels x 1 sample\(s\) x 16 "
    r"bits = 70368744144896 bytes of pixel data but holds 32768: the file is truncated or its header is wrong\.",
    "rle read": r"DICOM '.*rle\.dcm' declares 1 frame\(s\) of 60000 x 60000 pixels x 1 sample\(s\) x 16 bits = "
    r"7200000000 bytes of pixel data, but its RLE data of \d+ bytes decodes to at most \d+: its header is wrong\.",
    "cube listed": r"NIfTI '.*cube\.nii' declares 32767 x 32767 x 32767 voxels of uint8 = 35181150961663 bytes of "
    r"pixel data but holds 128: the file is truncated or its header is wrong\.",
    "cube read": r"cube\.nii' declares 32767 x 32767 x 32767 voxels",
    "long listed": r"NIfTI '.*long\.nii' declares 2 x 2 x 8589934592 voxels of uint8 = 34359738368 bytes of pixel "
    r"data but holds 16",
    "huge read": r"Image '.*huge\.png' declares 12000 x 12000 pixels x 3 band\(s\) x 1 byte\(s\) \(PNG RGB\) = "
    r"412\.0 MiB of decoded pixel data, more than the reader's max_decoded_bytes=67108864",
    "huge mask read": r"huge\.png' declares 12000 x 12000 pixels",
    "huge read within a large budget": r"Reading '.*huge\.png' ran out of memory: its declared size was within the "
    r"reader's max_decoded_bytes=2147483648 \(2\.0 GiB\), and a read holds up to about 13 bytes per decoded byte\. "
    r"Lower --data\.reader\.max_decoded_bytes",
    "deflated small budget read": r"DICOM '.*deflated\.dcm' is deflated and inflates to more than 8\d\.\d MiB \(read "
    r"so far\): more than the reader's max_decoded_bytes=67108864 \(64\.0 MiB\) allows for its pixel data and "
    r"16\.0 MiB of other elements; raise it with ScanReader\(max_decoded_bytes=\.\.\.\) or "
    r"--data\.reader\.max_decoded_bytes if the file is genuine\.",
    "deflated read": r"DICOM '.*deflated\.dcm' is deflated and inflates to more than",
}


def test_a_deflated_dicom_within_the_budget_is_read_as_pydicom_reads_it() -> None:
    """pydicom's own deflated test file (``image_dfl.dcm``): listed and read as its pixel array says."""
    from pydicom.pixels import pixel_array  # noqa: PLC0415

    path = get_testdata_file("image_dfl.dcm")
    stored = pixel_array(pydicom.dcmread(path)).astype(np.float64)
    reader = ScanReader(intensity="percentile", max_decoded_bytes=2**22)
    assert reader.samples(path) == [str(path)]
    low, high = np.percentile(stored, (0.5, 99.5))
    expected = np.clip((stored - low) / (high - low), 0, 1)
    np.testing.assert_allclose(reader.read_image(path)[0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["frames listed", "deflated listed"])
def test_dicom_declaring_more_than_it_may_is_listed_as_one_sample(case: str, capped: dict[str, dict]) -> None:
    listed = capped[case]
    assert listed.get("result") == 1, listed  # one sample, which the check before a run names
    assert listed["grown"] < HEADROOM


@pytest.mark.parametrize("case", list(REFUSALS))
def test_hostile_file_is_refused_by_name_in_bounded_memory(case: str, capped: dict[str, dict]) -> None:
    outcome = capped[case]
    assert outcome.get("error") == "MvfaInputError", outcome
    assert "\n" not in outcome["message"]
    assert re.search(REFUSALS[case], outcome["message"]), outcome["message"]
    assert outcome["grown"] < HEADROOM, outcome


# ------------------------------------------------------------------------ DICOM VOI


def ct_with(path: Path, **elements: object) -> Path:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    dataset.save_as(path)
    return path


@pytest.mark.parametrize(
    ("function", "width", "needed"),
    [("SIGMOID", 0, "above 0"), ("LINEAR_EXACT", 0, "above 0"), ("LINEAR", 0.5, "of at least 1")],
)
def test_window_width_the_standard_forbids_is_refused(function: str, width: float, needed: str, tmp_path: Path) -> None:
    path = ct_with(tmp_path / "flat.dcm", WindowCenter=40, WindowWidth=width, VOILUTFunction=function)
    with pytest.raises(MvfaInputError) as caught:
        ScanReader().read_image(path)
    assert str(caught.value) == (
        f"DICOM '{path}' has window width {width:g} with VOI LUT function {function}: the DICOM standard "
        f"(PS3.3 C.11.2.1.2) needs a width {needed}. Choose another --data.reader.intensity ('bits', 'range', "
        "'percentile' or 'window') to ignore the file's window."
    )
    # another intensity setting does not use the file's window
    assert ScanReader(intensity="range").read_image(path).isfinite().all()


def test_linear_window_of_width_1_is_pydicoms_threshold(tmp_path: Path) -> None:
    path = ct_with(tmp_path / "threshold.dcm", WindowCenter=40, WindowWidth=1, VOILUTFunction="LINEAR")
    dataset = pydicom.dcmread(path)
    values = np.array([-100.0, 39.0, 39.5, 39.6, 40.0, 400.0])
    windowed = apply_windowing(values, dataset)
    expected = (windowed - windowed.min()) / np.ptp(windowed)
    np.testing.assert_array_equal(file_window(dataset, path)(values), expected)
    assert set(expected.tolist()) == {0.0, 1.0}


def voi_lut_ct(path: Path, descriptor: list[int], data: list[int]) -> Path:
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.add_new(0x00283006, "US", data)  # LUTData as 16-bit words
    dataset.VOILUTSequence = [item]
    dataset.save_as(path)
    return path


def test_voi_lut_of_0_bits_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = voi_lut_ct(tmp_path / "lut0.dcm", [256, 0, 0], list(range(256)))
    message = (
        r"lut0\.dcm' has a VOI LUT with LUT descriptor \[256, 0, 0\]: the DICOM standard \(PS3\.3 C\.11\.2\.1\.1\) "
        r"needs 3 descriptor values and 8 to 16 bits per entry"
    )
    with pytest.raises(MvfaInputError, match=message):
        ScanReader().read_image(path)


def test_voi_lut_that_pydicom_cannot_apply_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = voi_lut_ct(tmp_path / "lut8.dcm", [256, 0, 8], [256 * value for value in range(256)])  # 8 bits hold 255
    with pytest.raises(MvfaInputError, match=r"lut8\.dcm' cannot be read: applying its VOI LUT failed \(OverflowError"):
        ScanReader().read_image(path)


def test_voi_lut_of_8_bits_matches_pydicom(tmp_path: Path) -> None:
    path = voi_lut_ct(tmp_path / "lut8.dcm", [4096, 0, 8], [value // 16 for value in range(4096)])
    dataset = pydicom.dcmread(path)
    from pydicom.pixels import apply_modality_lut, pixel_array  # noqa: PLC0415

    modality = apply_modality_lut(pixel_array(dataset), dataset)
    expected = apply_voi_lut(modality, dataset, index=0, prefer_lut=True) / 255.0
    got = ScanReader().read_image(path)[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------ NIfTI data


def test_complex_nifti_is_refused_naming_the_file_and_type(tmp_path: Path) -> None:
    data = (np.arange(24).reshape(2, 3, 4) + 1j).astype(np.complex64)
    path = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    message = r"NIfTI '.*complex\.nii' stores complex values \(complex64\): expected real values"
    with pytest.raises(MvfaInputError, match=message):
        ScanReader().samples(path)
    with pytest.raises(MvfaInputError, match=message):
        ScanReader().read_image(f"{path}#axial=0")


def test_real_nifti_files_of_nibabel_pass_the_layout_check() -> None:
    """nibabel's own test volumes are read, and their slices are nibabel's data."""
    path = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    reader = ScanReader(intensity="range", slice_axis="axial")
    names = reader.samples(path)
    assert len(names) == nib.load(path).shape[2]
    assert reader.read_image(names[-1]).isfinite().all()


def test_a_nifti_over_the_budget_is_read_a_slice_at_a_time_in_bounded_memory(capped: dict[str, dict]) -> None:
    """0.9 GB of zeros in a 1 MB ``.nii.gz`` (3.4 GiB as float32) under a 64 MiB budget: slices, never the volume."""
    for case in ("zeros read", "zeros sagittal read", "zeros mask read"):
        assert capped[case].get("result") == "read", capped[case]
        assert capped[case]["grown"] < 2**28, capped[case]  # a quarter of a GiB; the whole volume is 3.4 GiB


OBLIQUE_AFFINE = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -3], [0, -1.0, 0, 4], [0, 0, 0, 1]])  # axes swapped, flipped


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_streamed_slices_are_nibabels_canonical_slices(suffix: str, tmp_path: Path) -> None:
    """Every slice along every axis, read a slice at a time, is the slice of nibabel's ``as_closest_canonical``."""
    from anomalib_mvfa.data import nifti  # noqa: PLC0415

    data = np.arange(1, 6 * 7 * 5 + 1, dtype=np.uint8).reshape(6, 7, 5)  # every voxel its own value
    path = tmp_path / f"oblique{suffix}"
    nib.save(nib.Nifti1Image(data, OBLIQUE_AFFINE), path)
    canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    budget = 7 * 6 * 4  # the largest slice as float32; the volume is 5 times that
    assert nifti.is_streamed(path, max_decoded_bytes=budget)
    reader = ScanReader(intensity="range", max_decoded_bytes=budget)
    for axis, dim in nifti.SLICE_AXES.items():
        for index in range(canonical.shape[dim]):
            expected = np.take(canonical, index, axis=dim).T[::-1] / 255.0  # the superior side up
            got = reader.read_image(f"{path}#{axis}={index}")[0].numpy()
            np.testing.assert_allclose(got, expected, atol=1e-7, err_msg=f"{axis} {index}")


def test_streamed_volume_is_scaled_by_the_percentiles_of_its_slices(tmp_path: Path) -> None:
    """Every stored slice holds the same values (shuffled): the sampled slices' percentiles are the volume's.

    The two smallest and the two largest values are equal, so that the 0.5th and 99.5th percentiles
    fall on them in any number of copies (no interpolation between neighbours).
    """
    rng = np.random.default_rng(0)
    values = np.sort(rng.normal(100, 30, size=8 * 9)).astype(np.float32)
    values[1], values[-2] = values[0], values[-1]
    data = np.stack([rng.permutation(values).reshape(8, 9) for _ in range(12)], axis=-1)
    path = tmp_path / "shuffled.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    low, high = np.percentile(data, (0.5, 99.5))  # of the whole volume
    streamed = ScanReader(intensity="percentile", max_decoded_bytes=data.nbytes // 2)
    for index in (0, 7, 11):
        expected = np.clip((data[:, :, index].T[::-1] - low) / (high - low), 0, 1)
        got = streamed.read_image(f"{path}#axial={index}")[0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_streamed_volumes_find_empty_and_marked_slices_as_nibabel_sees_them(axis: str, tmp_path: Path) -> None:
    from anomalib_mvfa.data import nifti  # noqa: PLC0415

    data = np.full((6, 7, 5), -3, dtype=np.int16)
    data[1:3, 2, 1] = 40  # background everywhere else
    data[4, 5, 3] = 7
    path = tmp_path / "sparse.nii.gz"
    nib.save(nib.Nifti1Image(data, OBLIQUE_AFFINE), path)
    canonical = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)
    others = tuple(dim for dim in range(3) if dim != nifti.SLICE_AXES[axis])
    budget = 7 * 6 * 4
    expected_empty = np.flatnonzero((canonical == -3).all(axis=others)).tolist()
    assert nifti.empty_slices(path, axis, max_decoded_bytes=budget) == expected_empty
    assert len(expected_empty) < canonical.shape[nifti.SLICE_AXES[axis]]
    names = ScanReader(slice_axis=axis, skip_empty_slices=True, max_decoded_bytes=budget).samples(path)
    assert len(names) == canonical.shape[nifti.SLICE_AXES[axis]] - len(expected_empty)
    expected_marked = (canonical != 0).any(axis=others)
    np.testing.assert_array_equal(nifti.marked_slices(path, axis, max_decoded_bytes=budget), expected_marked)


def test_pillows_own_pixel_limit_is_named_with_how_to_lift_it(tmp_path: Path, monkeypatch) -> None:
    """Pillow refuses an image over twice ``MAX_IMAGE_PIXELS`` before the budget is asked: the message says so."""
    from PIL import Image  # noqa: PLC0415

    path = zeros_png(tmp_path / "wide.png", 100, 50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 5000 pixels: over twice the limit
    message = (
        r"Image '.*wide\.png' cannot be decoded: Image size \(5000 pixels\) exceeds limit of 4000 pixels.* This limit "
        r"is Pillow's \(twice PIL\.Image\.MAX_IMAGE_PIXELS\), apart from the reader's max_decoded_bytes"
    )
    with pytest.raises(MvfaInputError, match=message):
        ScanReader().read_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert ScanReader().read_image(path).shape == (3, 50, 100)


def test_max_decoded_bytes_must_be_positive() -> None:
    with pytest.raises(MvfaInputError, match=r"max_decoded_bytes must be above 0 \(or None for the default\), got 0"):
        ScanReader(max_decoded_bytes=0)
    assert ScanReader(max_decoded_bytes=123).budget == 123


def test_encapsulated_dicom_with_fewer_fragments_than_frames_is_refused(tmp_path: Path) -> None:
    """Three CT_small frames, RLE-compressed by pydicom, read as pydicom decodes them; 4 declared are refused."""
    from pydicom.pixels import pixel_array  # noqa: PLC0415
    from pydicom.uid import RLELossless  # noqa: PLC0415

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    frames = np.stack([pixel_array(dataset) + shift for shift in (0, 100, 200)])
    dataset.NumberOfFrames = 3
    dataset.compress(RLELossless, frames)
    dataset.save_as(tmp_path / "three.dcm")
    reader = ScanReader(intensity="range")
    names = reader.samples(tmp_path / "three.dcm")
    assert len(names) == 3
    low, high = -(2**15), 2**15 - 1  # signed 16 bits, rescaled to Hounsfield units by slope 1
    intercept = float(dataset.RescaleIntercept)
    expected = (pixel_array(tmp_path / "three.dcm", index=2) + intercept - (low + intercept)) / (high - low)
    np.testing.assert_allclose(reader.read_image(names[-1])[0].numpy(), expected, atol=1e-6)
    dataset.NumberOfFrames = 4
    dataset.save_as(tmp_path / "more.dcm")
    with pytest.raises(
        MvfaInputError,
        match=r"more\.dcm' declares 4 frame\(s\) but its encapsulated \('RLE Lossless'\) pixel data holds 3 "
        r"fragment\(s\) and a basic offset table of \d+ frame\(s\): its header is wrong",
    ):
        reader.read_image(f"{tmp_path / 'more.dcm'}#frame=0")
