"""The arguments of every ``anomalib-mvfa`` command, and what ``--backbone tiny-random`` implies.

Light: neither torch, anomalib nor open_clip is imported here, so that ``anomalib-mvfa <command> --help``
answers at once; each command's module (imported only to run it) does the work.

Every option's help names its default. The image-encoder options of ``evaluate``, ``demo``, ``speed``,
``loading`` and ``scaling`` follow one rule (:func:`backbone_settings`): a value given on the command
line wins; otherwise a backbone with a preset (:data:`BACKBONE_PRESETS`: ``tiny-random`` runs offline on
random weights at 64 pixels) takes the preset's, and any other backbone the command's default. Feature
layers default to four evenly spaced blocks of the backbone (``ViT-L-14-336``: 6 12 18 24).

Example:
    >>> parser = argparse.ArgumentParser()
    >>> evaluate(parser)
    >>> args = parser.parse_args(["--root", "data", "--backbone", "tiny-random"])
    >>> backbone_settings(args, pretrained="openai", image_size=240)
    (None, 64, [1, 2, 3, 4])
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..pipeline import add_feature_pipeline_argument

__all__ = [
    "BACKBONE_PRESETS",
    "COMMAND_ARGUMENTS",
    "add_option",
    "add_study_arguments",
    "backbone_settings",
    "benchmark",
    "configs",
    "demo",
    "evaluate",
    "evenly_spaced_layers",
    "loading",
    "preset_init_args",
    "scaling",
    "speed",
]

# What a backbone implies unless the command line (or a config's init_args) says otherwise.
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-random": {"pretrained": None, "image_size": 64, "feature_layers": [1, 2, 3, 4]},
}
BACKBONE_HELP = "open_clip model name, model-config JSON, or tiny-random"


def add_option(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument`` with the default named at the end of the help (unless it is None or False).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_option(parser, "--k-shot", type=int, default=4, help="normal support images").help
        'normal support images (default: 4)'
    """
    default = kwargs.get("default")
    if default is not None and default is not False and default != argparse.SUPPRESS:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs["help"] = f"{kwargs.get('help', '')} (default: {shown})".lstrip()
    return parser.add_argument(*flags, **kwargs)


def _backbone_arguments(parser: argparse.ArgumentParser, backbone: str, pretrained: str, image_size: int) -> None:
    """``--backbone``, ``--pretrained``, ``--image-size`` and ``--feature-layers`` (see :func:`backbone_settings`)."""
    add_option(parser, "--backbone", default=backbone, help=BACKBONE_HELP)
    add_option(
        parser,
        "--pretrained",
        default=None,
        help=f"open_clip tag, weights file, or 'none' for random weights (default: {pretrained}; none for tiny-random)",
    )
    add_option(
        parser, "--image-size", type=int, default=None, help=f"input side (default: {image_size}; 64 for tiny-random)"
    )
    add_option(
        parser,
        "--feature-layers",
        type=int,
        nargs="+",
        default=None,
        help="blocks with adapters (default: 4 evenly spaced blocks of the backbone, e.g. 6 12 18 24 of ViT-L-14-336)",
    )


def evenly_spaced_layers(backbone: str) -> list[int]:
    """Four evenly spaced blocks of ``backbone``'s image tower, as the paper's 6 12 18 24 of ViT-L-14-336.

    Example:
        >>> evenly_spaced_layers("ViT-B-16")  # doctest: +SKIP
        [3, 6, 9, 12]
    """
    preset = BACKBONE_PRESETS.get(str(backbone), {})
    if "feature_layers" in preset:
        return list(preset["feature_layers"])
    from ..backbone import tower_depth  # noqa: PLC0415  (reads the model config; imports torch)

    depth = tower_depth(backbone)
    return [round(depth * (i + 1) / 4) for i in range(4)]


def backbone_settings(
    args: argparse.Namespace, pretrained: str | None, image_size: int
) -> tuple[str | None, int, list[int]]:
    """Pretrained tag (``None``: random weights), image size and feature layers of a command's run.

    A value on the command line wins; else the backbone's preset (:data:`BACKBONE_PRESETS`); else the
    command's ``pretrained`` and ``image_size`` and four evenly spaced blocks.
    """
    preset = BACKBONE_PRESETS.get(str(args.backbone), {})
    chosen = getattr(args, "pretrained", None)
    tag = chosen if chosen is not None else preset.get("pretrained", pretrained)
    tag = None if tag is None or str(tag).lower() == "none" else tag
    size = args.image_size if args.image_size is not None else preset.get("image_size", image_size)
    layers = getattr(args, "feature_layers", None) or evenly_spaced_layers(args.backbone)
    return tag, size, list(layers)


def backbone_arguments(args: argparse.Namespace, pretrained: str | None, image_size: int) -> dict[str, Any]:
    """``Mvfa``'s backbone, pretrained, image_size, feature_layers and feature_pipeline of a command's run.

    Example:
        >>> backbone_arguments(argparse.Namespace(backbone="tiny-random", pretrained=None, image_size=None,
        ...     feature_layers=None, feature_pipeline=None), "openai", 224)["image_size"]
        64
    """
    tag, size, layers = backbone_settings(args, pretrained, image_size)
    return {
        "backbone": args.backbone, "pretrained": tag, "image_size": size, "feature_layers": layers,
        "feature_pipeline": args.feature_pipeline,
    }  # fmt: skip


def preset_init_args(init_args: dict[str, Any]) -> dict[str, Any]:
    """A model entry's ``init_args`` completed with its backbone's preset; the values it sets win.

    Example:
        >>> preset_init_args({"backbone": "tiny-random", "image_size": 32})["image_size"]
        32
    """
    preset = BACKBONE_PRESETS.get(str(init_args.get("backbone")), {})
    return {**preset, **init_args}


def evaluate(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa evaluate``."""
    add_option(parser, "--root", required=True, help="folder holding the <Name>_AD folders")
    add_option(
        parser,
        "--categories",
        nargs="+",
        default=["all"],
        help="categories; 'all': the paper's six (Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, "
        "Histopathology), each of which must be under --root",
    )
    add_option(parser, "--setting", choices=("few-shot", "zero-shot"), default="few-shot")
    add_option(parser, "--k-shot", type=int, default=4)
    add_option(parser, "--seeds", type=int, nargs="+", default=[0], help="K-shot draws (seed-file lines)")
    add_option(parser, "--seed-files", default=None, help="seed-file path template with {category} and {k_shot}")
    add_option(parser, "--epochs", type=int, default=50, help="0 evaluates --adapter-checkpoint without training")
    add_option(parser, "--adapter-checkpoint", default=None, help="adapters file, or template with {category}")
    add_option(parser, "--ckpt-path", default=None, help="a Lightning checkpoint of Mvfa to evaluate as it is")
    _backbone_arguments(parser, "ViT-L-14-336", "openai", 240)
    add_feature_pipeline_argument(parser, "authors; with --ckpt-path, the checkpoint's")
    add_option(parser, "--batch-size", type=int, default=8, help="test images scored at once, per process")
    add_option(parser, "--train-batch-size", type=int, default=1, help="training images a step, per process")
    add_option(parser, "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    add_option(parser, "--devices", default="1", help="devices per node (a number, 'auto' or a list such as 0,1)")
    add_option(parser, "--strategy", default="auto", help="Lightning strategy; ddp for several devices")
    add_option(parser, "--num-nodes", type=int, default=1, help="nodes of a multi-node run")
    add_option(parser, "--output", default="results/evaluation", help=RUN_FOLDER_HELP)
    add_study_arguments(parser)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """``--study-score`` and ``--study-k`` (a volume's study score of its slice scores), ``--study-labels``."""
    add_option(
        parser,
        "--study-score",
        choices=("max", "top_k_mean", "mean"),
        default="max",
        help="study score of a volume (NIfTI file, DICOM series) from its slice scores",
    )
    add_option(parser, "--study-k", type=int, default=3, help="slices --study-score top_k_mean averages")
    add_option(
        parser,
        "--study-labels",
        default=None,
        help=f"{STUDY_LABELS_HELP} for the study AUROC, the study table and the study threshold fitted on the "
        "validation split; every volume of those splits needs a row",
    )


# --study-labels of evaluate and benchmark (see anomalib_mvfa.studies.read_study_labels)
STUDY_LABELS_HELP = (
    "CSV file of study labels: a header row with the columns study and label, then one row per volume: its DICOM "
    "SeriesInstanceUID or NIfTI file (path, or file name alone) and 0/1 (or normal/abnormal); these labels, not "
    "'abnormal when any slice is', are the volumes' ground truth"
)


# the run folders of evaluate and benchmark (see anomalib_mvfa.commands.run_folder)
RUN_FOLDER_HELP = (
    "results folder: every run writes into a new version folder of its own, OUTPUT/v0, v1, ..., "
    "and OUTPUT/latest points at the newest; no run replaces another's files"
)


def demo(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa demo``."""
    _backbone_arguments(parser, "ViT-B-16", "openai", 224)
    add_feature_pipeline_argument(parser)
    add_option(parser, "--k-shot", type=int, default=4)
    add_option(parser, "--epochs", type=int, default=5, help="the paper uses 50 (on a GPU)")
    add_option(parser, "--seed", type=int, default=0)
    add_option(parser, "--root", default="datasets/mvfa_demo", help="where the demo dataset is written")
    add_option(parser, "--results", default="results", help="anomalib's results folder")


def speed(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa speed``."""
    _backbone_arguments(parser, "ViT-B-16", "none", 224)
    add_option(parser, "--k-shot", type=int, default=4, help="training support: K normal + K abnormal, x11")
    add_option(parser, "--epochs", type=int, default=1, help="0 measures inference only")
    add_option(parser, "--batch-size", type=int, default=8, help="inference batch")
    add_option(parser, "--search-k-shot", type=int, default=16, help="memory bank size for the search share")
    add_option(parser, "--memory-bank-ratio", type=float, default=None, help="also time the search on a coreset")
    add_feature_pipeline_argument(parser)
    add_option(parser, "--repeats", type=int, default=3)
    add_option(parser, "--seed", type=int, default=0)
    add_option(parser, "--device", default="cpu", help="cpu, cuda or cuda:N")
    add_option(parser, "--amp", choices=("bfloat16", "float16"), default=None, help="autocast dtype on a GPU")
    add_option(
        parser,
        "--deploy",
        action="store_true",
        help="instead: every deployment path (torch float32, bf16 autocast, torch.compile, ONNX Runtime, OpenVINO "
        "f32/default/INT8) side by side, with its fidelity against torch float32",
    )
    add_option(parser, "--held-out", type=int, default=8, help="--deploy: normal and as many defective images")
    add_option(
        parser,
        "--paths",
        default=None,
        help="--deploy: comma-separated paths to measure, of: torch float32, torch bf16 autocast, torch.compile, "
        "onnxruntime, openvino f32, openvino default, openvino int8 (torch float32 always runs first); default all",
    )


def benchmark(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa benchmark``."""
    add_option(parser, "--config", required=True, help="YAML file with models, data, categories, seeds")
    add_option(parser, "--random-weights", action="store_true", help="offline, random weights for every model")
    add_option(
        parser,
        "--output",
        default=None,
        help=f"overrides the config's output folder (results/benchmark); {RUN_FOLDER_HELP}",
    )
    add_option(
        parser, "--workers", type=int, default=None, help="parallel worker processes; default: one per GPU when several"
    )
    add_feature_pipeline_argument(parser, "the config's feature_pipeline, else each model's own (Mvfa: authors)")
    add_option(
        parser,
        "--study-labels",
        default=None,
        help=f"{STUDY_LABELS_HELP} for the study_AUROC column; every test volume needs a row; overrides the "
        "config's study_labels",
    )
    add_option(
        parser,
        "--in-process",
        action="store_true",
        help="run the jobs one after another in this process instead of a new process each (faster to start; "
        "a job can then affect the next one's memory figures)",
    )


def loading(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa loading`` (random weights: they do not change the speed)."""
    add_option(parser, "--backbone", default="ViT-B-16", help=BACKBONE_HELP)
    add_option(parser, "--image-size", type=int, default=224, help="input side")
    add_option(parser, "--files", type=int, default=32, help="DICOM and PNG files written (and scored)")
    add_option(parser, "--batch-size", type=int, default=8)
    add_option(parser, "--workers", type=int, default=2, help="data-loading processes")
    add_option(parser, "--side", type=int, default=512, help="DICOM and PNG image side")
    add_option(parser, "--volume-side", type=int, default=256, help="NIfTI volume side")
    add_option(parser, "--seed", type=int, default=0)


def scaling(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa scaling`` (random weights: they do not change the speed)."""
    add_option(parser, "--backbone", default="ViT-B-16", help=BACKBONE_HELP)
    add_option(parser, "--image-size", type=int, default=224, help="input side")
    add_option(parser, "--k-shot", type=int, default=4, help="support: K normal + K abnormal, x11")
    add_option(parser, "--epochs", type=int, default=2)
    add_option(parser, "--batch-size", type=int, default=8, help="global batch, split over the processes")
    add_option(parser, "--processes", type=int, default=2)
    add_option(parser, "--accelerator", default="cpu", help="cpu or gpu")
    add_option(parser, "--threads", type=int, default=None, help="CPU: total threads; default: torch's count")
    add_option(parser, "--seed", type=int, default=0)


def configs(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa configs``."""
    add_option(parser, "--dest", default=None, help="copy the configs to DEST/configs/ (default: only list them)")
    add_option(parser, "--force", action="store_true", help="overwrite configs that already exist in DEST")


# command -> the function adding its arguments
COMMAND_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "demo": demo,
    "evaluate": evaluate,
    "speed": speed,
    "benchmark": benchmark,
    "scaling": scaling,
    "loading": loading,
    "configs": configs,
}
