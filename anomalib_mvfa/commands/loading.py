"""Decoding speed of scans, and whether data loading keeps up with the model: ``anomalib-mvfa loading``.

Writes, into a temporary folder, 512 x 512 16-bit CT DICOM files, one 256 x 256 x 256 NIfTI
volume (gzip-compressed, int16 with a scale) and 512 x 512 16-bit PNG files, then prints:

- decoding time per image with :class:`~anomalib_mvfa.data.ScanReader` (the median over the
  files; for NIfTI, the first slice, which decodes the volume, and every slice after it);
- images per second of the model scoring a batch (``MvfaModel`` on the chosen backbone), of the
  data loader alone (DICOM files resized to the model's size, with ``--workers`` processes), and
  of the two together, all in one run: when the pipeline runs at the model's rate, loading is
  not the bottleneck.

Example:
    anomalib-mvfa loading --backbone ViT-B-16 --image-size 224 --workers 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Resize

from ..torch_model import MvfaModel
from .options import evenly_spaced_layers
from .options import loading as add_arguments  # noqa: F401  (the command's arguments, kept importable here)


def _write_dicom(path: Path, stored: np.ndarray) -> None:
    import pydicom  # noqa: PLC0415
    from pydicom.dataset import FileMetaDataset  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: PLC0415

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleIntercept, dataset.RescaleSlope = -1024, 1
    dataset.WindowCenter, dataset.WindowWidth = 40, 400
    dataset.PixelData = stored.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)


def write_files(
    folder: Path, count: int, seed: int, side: int = 512, volume_side: int = 256
) -> tuple[list[Path], Path, list[Path]]:
    """``count`` DICOM and PNG files (``side`` pixels square) and a cube NIfTI volume of smooth noise."""
    import nibabel  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 8 * np.pi, side)
    base = 1024 + 40 + 300 * np.sin(x)[None, :] * np.cos(x)[:, None]
    dicoms, pngs = [], []
    for index in range(count):
        stored = np.clip(base + rng.normal(0, 20, (side, side)), 0, 4095)
        dicoms.append(folder / f"IM{index:04d}.dcm")
        _write_dicom(dicoms[-1], stored)
        pngs.append(folder / f"IM{index:04d}.png")
        Image.fromarray((stored * 16).astype(np.uint16)).save(pngs[-1])
    z = np.linspace(0, 4 * np.pi, volume_side)
    volume = 300 * np.sin(z)[:, None, None] * np.cos(z)[None, :, None] * np.sin(z)[None, None, :]
    volume = (volume + rng.normal(0, 20, volume.shape)).astype(np.int16)
    image = nibabel.Nifti1Image(volume, np.diag([1.0, 1.0, 1.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    nifti_path = folder / "volume.nii.gz"
    nibabel.save(image, nifti_path)
    return dicoms, nifti_path, pngs


def _median_ms(function: object, items: list) -> float:
    times = []
    for item in items:
        started = time.perf_counter()
        function(item)  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


class _ResizedFiles(torch.utils.data.Dataset):
    """DICOM files read and resized to the model's input, as a datamodule with the model's transform gives them."""

    def __init__(self, files: list[Path], size: int) -> None:
        from ..data import ScanReader  # noqa: PLC0415

        self.files, self.reader, self.resize = files, ScanReader(), Resize((size, size), antialias=True)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.resize(self.reader.read_image(self.files[index]))


def run(args: argparse.Namespace) -> int:
    """Write the files, measure and print; return an exit code."""
    from ..data import ScanReader  # noqa: PLC0415

    reader = ScanReader()
    with tempfile.TemporaryDirectory(prefix="mvfa-loading-") as folder:
        dicoms, volume, pngs = write_files(Path(folder), args.files, args.seed, args.side, args.volume_side)
        print(
            f"{args.files} DICOM ({args.side} x {args.side}, 16-bit) and PNG files, "
            f"one {args.volume_side}^3 NIfTI volume (gzip)"
        )
        print(f"  DICOM: {_median_ms(reader.read_image, dicoms):.1f} ms per image")
        print(f"  16-bit PNG: {_median_ms(reader.read_image, pngs):.1f} ms per image")
        slices = reader.samples(volume)
        started = time.perf_counter()
        reader.read_image(slices[0])
        first = time.perf_counter() - started
        rest = _median_ms(reader.read_image, slices[1:])
        print(
            f"  NIfTI: first slice {1000 * first:.0f} ms (decodes and caches the volume), then {rest:.2f} ms a slice; "
            f"{1000 * first / len(slices) + rest:.2f} ms a slice over the volume"
        )

        layers = evenly_spaced_layers(args.backbone)  # four evenly spaced, as the paper's 6/12/18/24
        model = MvfaModel(args.backbone, None, args.image_size, layers).eval()
        model.setup("object")
        batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
        with torch.no_grad():
            model(batch)  # warm-up
            started = time.perf_counter()
            rounds = max(1, len(dicoms) // args.batch_size)
            for _ in range(rounds):
                model(batch)
            model_rate = rounds * args.batch_size / (time.perf_counter() - started)

            loader = DataLoader(
                _ResizedFiles(dicoms, args.image_size),
                batch_size=args.batch_size,
                num_workers=args.workers,
                persistent_workers=args.workers > 0,
            )
            for _ in loader:  # starts the workers
                break
            started = time.perf_counter()
            for _ in loader:
                pass
            loader_rate = len(dicoms) / (time.perf_counter() - started)
            started = time.perf_counter()
            for images in loader:
                model(images)
            pipeline_rate = len(dicoms) / (time.perf_counter() - started)
        print(
            f"{args.backbone} at {args.image_size}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
            f"{args.workers} loader worker(s), in images per second:"
        )
        print(f"  model alone {model_rate:.1f}; DICOM loader alone {loader_rate:.1f}; together {pipeline_rate:.1f}")
        verdict = "not the bottleneck" if loader_rate > model_rate else "the bottleneck"
        print(
            f"  loading is {verdict}: the loader alone runs at {loader_rate / model_rate:.1f}x the model's rate, "
            f"and together they run at {pipeline_rate / model_rate:.2f}x the model's rate"
        )
    return 0
