"""Frozen open_clip backbones for MVFA.

This module builds the CLIP model that MVFA adapts. The architecture comes from an
open_clip model name (``"ViT-L-14-336"``) or from an open_clip model-config JSON file
(keys ``embed_dim``, ``vision_cfg`` and ``text_cfg``). The weights come from an
open_clip pretrained tag (``"openai"``), a local weights file, or nowhere
(``None``: random weights, announced with a warning because every score is then
meaningless).

Example:
    >>> from anomalib_mvfa.backbone import load_clip
    >>> clip, tokenizer = load_clip("ViT-B-16", pretrained="openai", image_size=224)  # doctest: +SKIP
    >>> clip.visual.grid_size  # doctest: +SKIP
    (14, 14)
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import math
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
import open_clip
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.transformer import QuickGELU
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors

from .errors import MvfaInputError
from .pipeline import FeaturePipeline, resolve_feature_pipeline, uses_quick_gelu
from .tensor_files import UnsafeTensorFileError, load_tensors_safely, read_torchscript_tensors
from .towers import match_timm_grid, resize_timm_tower, vision_tower

logger = logging.getLogger(__name__)

# Keys that TorchScript archives (OpenAI's among them) carry next to the weights: constants and masks.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# Bytes per element of safetensors dtypes (others count 8).
_SAFETENSORS_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}
# Seconds a weight download may wait for the network before it is treated as offline.
DOWNLOAD_TIMEOUT_S = 30.0
_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}
# Architectures shipped with the package: "tiny-random" is a 4-block CLIP for tests and
# offline demos, meaningful with random weights only (no weights exist for it).
SHIPPED_CONFIGS = {"tiny-random": Path(__file__).parent / "backbones" / "tiny-random.json"}
# open_clip models on the Hugging Face Hub: "hf-hub:<organisation>/<repository>", its config and weights files
HF_HUB_PREFIX = "hf-hub:"
HF_HUB_CONFIG = "open_clip_config.json"
HF_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class PretrainedWeightsError(MvfaInputError, RuntimeError):
    """Raised when the requested CLIP weights cannot be obtained or do not fit."""


def resolve_model_config(backbone: str | Path, cache_dir: str | None = None) -> tuple[str, dict[str, Any]]:
    """Return the name and the open_clip model config of ``backbone``.

    Args:
        backbone: An open_clip model name, the path of an open_clip model-config JSON
            file (or of a hub repository's ``open_clip_config.json``), an ``hf-hub:<org>/<repo>``
            name, or ``"tiny-random"`` (a tiny architecture shipped with the package).
        cache_dir: Download folder of ``hf-hub:`` files (Hugging Face's default otherwise).

    Returns:
        The model name (the file stem for a JSON file) and a copy of its config.

    Raises:
        ValueError: If the name is unknown or the file is not a CLIP model config.

    Example:
        >>> name, config = resolve_model_config("ViT-B-16")
        >>> name, config["vision_cfg"]["patch_size"]
        ('ViT-B-16', 16)
    """
    if str(backbone).startswith(HF_HUB_PREFIX):
        repository = str(backbone)[len(HF_HUB_PREFIX) :]
        path = _hub_file(str(backbone), repository, HF_HUB_CONFIG, "the open_clip config", cache_dir)
        return repository.rsplit("/", 1)[-1], _read_config_file(str(backbone), path)
    path = SHIPPED_CONFIGS.get(str(backbone), Path(backbone))
    if path.suffix.lower() == ".json" or path.is_file():
        if not path.is_file():
            msg = f"Backbone config file '{backbone}' does not exist."
            raise MvfaInputError(msg)
        return path.stem, _read_config_file(str(backbone), path)

    name = str(backbone).replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        msg = (
            f"Unknown backbone '{backbone}': expected an open_clip model name "
            f"(see open_clip.list_models()) or the path of an open_clip model-config JSON file.{hint}"
        )
        raise MvfaInputError(msg)
    return name, config


def _read_config_file(backbone: str, path: Path) -> dict[str, Any]:
    """An open_clip model config from a JSON file: the config itself, or a hub file's ``model_cfg``."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        msg = f"Backbone config file '{backbone}' is not valid JSON: {error}"
        raise MvfaInputError(msg) from error
    if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):
        # open_clip_config.json of the Hugging Face Hub: the model, and the images' mean and std apart
        preprocess = config.get("preprocess_cfg") or {}
        config = config["model_cfg"]
        for key in ("mean", "std"):
            if key in preprocess and isinstance(config.get("vision_cfg"), dict):
                config["vision_cfg"].setdefault(f"image_{key}", preprocess[key])
    keys = ("embed_dim", "vision_cfg", "text_cfg")
    missing = [key for key in keys if not isinstance(config, dict) or key not in config]
    if missing:
        msg = (
            f"Backbone config file '{backbone}' is not an open_clip model config: "
            f"expected the keys 'embed_dim', 'vision_cfg' and 'text_cfg', missing {missing}."
        )
        raise MvfaInputError(msg)
    return config


def _hub_file(backbone: str, repository: str, filename: str, what: str, cache_dir: str | None = None) -> Path:
    """A file of a Hugging Face Hub repository: from the cache, else downloaded; offline, a clear error at once."""
    with contextlib.suppress(Exception):  # not cached: any error of the look-up means "download it"
        return Path(huggingface_hub.hf_hub_download(repository, filename, cache_dir=cache_dir, local_files_only=True))
    try:
        _check_reachable(huggingface_hub.constants.ENDPOINT)  # the hub retries for half a minute otherwise
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            return Path(huggingface_hub.hf_hub_download(repository, filename, cache_dir=cache_dir))
    except Exception as error:
        msg = (
            f"Could not obtain {what} ('{filename}') of backbone '{backbone}' from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). Without network access, download the repository "
            f"https://huggingface.co/{repository} elsewhere ({HF_HUB_CONFIG} and the weights, "
            f"{' or '.join(HF_HUB_WEIGHTS)}; for a Hugging Face text tower also the text model's folder, named in "
            "text_cfg.hf_model_name), then pass the config file as the backbone and the weights file as "
            "pretrained (--model.backbone /path/open_clip_config.json --model.pretrained "
            "/path/open_clip_pytorch_model.bin), with hf_model_name and hf_tokenizer_name pointing at the local "
            "text model folder."
        )
        raise PretrainedWeightsError(msg) from error


def tower_depth(backbone: str | Path) -> int:
    """Number of blocks of ``backbone``'s image tower (a timm tower is built on the meta device to count them).

    Example:
        >>> tower_depth("ViT-B-16")
        12
    """
    vision_cfg = resolve_model_config(backbone)[1]["vision_cfg"]
    if "timm_model_name" not in vision_cfg:
        return int(vision_cfg["layers"])
    import timm  # noqa: PLC0415 (only for timm towers)

    with torch.device("meta"):
        trunk = timm.create_model(vision_cfg["timm_model_name"], pretrained=False)
    blocks = getattr(trunk, "blocks", None)
    if blocks is None:
        msg = f"Backbone '{backbone}' has a timm image tower without transformer blocks ({type(trunk).__name__})."
        raise MvfaInputError(msg)
    return len(blocks)


def image_statistics(backbone: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std images were normalised with when ``backbone`` was trained.

    The config's ``vision_cfg.image_mean``/``image_std`` (a hub config's ``preprocess_cfg``), else
    OpenAI's. Used by the ``"clip"`` feature pipeline only (the authors' feeds [0, 1] images).

    Example:
        >>> image_statistics("ViT-B-16")[0]
        (0.48145466, 0.4578275, 0.40821073)
    """
    vision_cfg = resolve_model_config(backbone)[1].get("vision_cfg", {})
    mean = vision_cfg.get("image_mean") or open_clip.OPENAI_DATASET_MEAN
    std = vision_cfg.get("image_std") or open_clip.OPENAI_DATASET_STD
    return tuple(float(value) for value in mean), tuple(float(value) for value in std)


def _check_hf_text_model(backbone: str, text_cfg: dict[str, Any], cache_dir: str | None = None) -> None:
    """Fail fast, naming the files, when a Hugging Face text tower's folder is neither local nor obtainable."""
    for key in ("hf_model_name", "hf_tokenizer_name"):
        name = text_cfg.get(key)
        if name and not Path(name).is_dir():
            _hub_file(backbone, name, "config.json", f"the text tower's {key.removeprefix('hf_')}", cache_dir)


def _check_vision_transformer(name: str, config: dict[str, Any], image_size: int) -> None:
    vision_cfg = config["vision_cfg"]
    if isinstance(vision_cfg.get("layers"), list | tuple):
        msg = (
            f"Backbone '{name}' cannot carry MVFA's adapters: its image tower is a ResNet (vision_cfg.layers is a "
            "list). MVFA needs a ViT image tower (open_clip's own, or a timm VisionTransformer)."
        )
        raise MvfaInputError(msg)
    patch_size = vision_cfg.get("patch_size", 16)
    if image_size < patch_size:
        msg = f"image_size={image_size} is smaller than one patch of backbone '{name}' ({patch_size} pixels)."
        raise MvfaInputError(msg)


def _build_model(name: str, config: dict[str, Any], image_size: int, quick_gelu: bool) -> torch.nn.Module:
    config = json.loads(json.dumps(config))  # deep copy, config may come from the caller
    for key in ("image_mean", "image_std"):  # pre-processing settings (image_statistics), not the network's
        config["vision_cfg"].pop(key, None)
    timm_tower = "timm_model_name" in config["vision_cfg"]
    if timm_tower:
        config["vision_cfg"]["timm_model_pretrained"] = False  # weights come from load_clip, never from timm
    else:
        config["vision_cfg"]["image_size"] = image_size  # timm towers are resized after their weights load
    config["quick_gelu"] = quick_gelu
    custom_text = config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
    if "hf_model_name" in config.get("text_cfg", {}):
        config["text_cfg"]["hf_model_pretrained"] = False
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        model = model_class(**config)
    except TypeError as error:
        msg = f"Backbone config '{name}' does not describe an open_clip CLIP model: {error}"
        raise MvfaInputError(msg) from error
    vision_tower(model.visual, name)  # refuses towers the adapters cannot sit on, naming what is missing
    return model


def read_weights_file(path: str | Path, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from a local file, running none of its code.

    Accepted: a ``state_dict`` saved with ``torch.save`` (optionally under the key
    ``"state_dict"``), a ``.safetensors`` file, and OpenAI's TorchScript archives
    (``ViT-L-14-336px.pt``). Pickled files are read with ``weights_only=True``; TorchScript
    archives by :func:`anomalib_mvfa.tensor_files.read_torchscript_tensors`, which never executes
    the archive's code. See :mod:`anomalib_mvfa.tensor_files` for the checks made first.

    Args:
        path: The weights file.
        max_bytes: Most bytes its tensors may declare; a file declaring more is refused before
            anything is allocated (:func:`load_clip` passes twice the backbone's float32 size).

    Returns:
        The state dict, without a ``module.`` prefix and without OpenAI's extra keys.

    Raises:
        PretrainedWeightsError: If the file is missing or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Weights file '{path}' does not exist."
        raise PretrainedWeightsError(msg)
    try:
        if path.suffix == ".safetensors":
            state_dict = _read_safetensors(path, max_bytes)
        elif is_torchscript_archive(path):  # OpenAI's release format; its code is never run
            state_dict = read_torchscript_tensors(path, "Weights file", max_bytes)
        else:
            state_dict = load_tensors_safely(path, "Weights file", max_bytes)
    except ValueError as error:
        raise PretrainedWeightsError(str(error)) from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        msg = f"Weights file '{path}' does not hold a state dict of tensors."
        raise PretrainedWeightsError(msg)
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    for key in _OPENAI_EXTRA_KEYS:
        state_dict.pop(key, None)
    return state_dict


def _read_safetensors(path: Path, max_bytes: int | None) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file, refused before loading when its header declares more than ``max_bytes``."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            declared = sum(
                math.prod(handle.get_slice(key).get_shape())
                * _SAFETENSORS_ITEMSIZE.get(handle.get_slice(key).get_dtype(), 8)
                for key in handle.keys()  # noqa: SIM118  # safe_open has no __iter__
            )
        if max_bytes is not None and declared > max_bytes:
            msg = (
                f"Weights file '{path}' was refused before loading: its tensors declare {declared / 2**20:.1f} MiB, "
                f"more than the {max_bytes / 2**20:.1f} MiB the chosen model can use."
            )
            raise UnsafeTensorFileError(msg)
        return load_safetensors(str(path))
    except (OSError, RuntimeError, SafetensorError) as error:
        msg = f"Weights file '{path}' is not a readable .safetensors file ({error})."
        raise MvfaInputError(msg) from error


def is_torchscript_archive(path: str | Path) -> bool:
    """Return whether ``path`` is a TorchScript archive, the format of OpenAI's CLIP releases."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("constants.pkl") for entry in archive.namelist())


def _looks_like_path(pretrained: str | Path) -> bool:
    text = str(pretrained)
    return Path(text).exists() or "/" in text or "\\" in text or Path(text).suffix.lower() in _WEIGHT_SUFFIXES


@contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _cached_hf_file(hf_hub: str, cache_dir: str | None) -> Path | None:
    """Return the cached file of an open_clip ``hf_hub`` entry (``org/model/[file]``), if any."""
    model_id, filename = hf_hub.rsplit("/", 1)  # a trailing slash means open_clip's default file name
    try:
        path = huggingface_hub.hf_hub_download(
            model_id, filename or "open_clip_pytorch_model.bin", cache_dir=cache_dir, local_files_only=True
        )
    except Exception:  # not cached: any error of the look-up means "download it"
        return None
    return Path(path)


def _check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Raise ``OSError`` if the host of ``url`` cannot be connected to within ``timeout_s``."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout_s):
        pass


def fetch_pretrained(name: str, tag: str, cache_dir: str | None = None) -> Path:
    """Return the local path of open_clip's pretrained weights ``tag`` for ``name``.

    Downloads them into open_clip's cache when they are not there yet; fails fast,
    naming the tag and the offline alternative, when that is impossible.

    Args:
        name: open_clip model name.
        tag: open_clip pretrained tag, for example ``"openai"``.
        cache_dir: Optional download folder (open_clip's default otherwise).

    Raises:
        PretrainedWeightsError: If the tag is unknown for the model or cannot be fetched.
    """
    config = open_clip.get_pretrained_cfg(name, tag)
    if not config:
        available = open_clip.list_pretrained_tags_by_model(name)
        msg = (
            f"Unknown pretrained tag '{tag}' for backbone '{name}'. Tags open_clip knows for it: "
            f"{available or 'none'}; or pass the path of a local weights file as `pretrained`."
        )
        raise PretrainedWeightsError(msg)
    source = config.get("url") or config.get("hf_hub")
    try:
        if not config.get("url"):
            cached = _cached_hf_file(config["hf_hub"], cache_dir)
            if cached is not None:
                return cached
            # huggingface_hub retries unreachable hosts for half a minute: check once, quickly.
            _check_reachable(huggingface_hub.constants.ENDPOINT)
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            target = open_clip.download_pretrained(config, cache_dir=cache_dir)
    except Exception as error:
        msg = (
            f"Could not obtain the pretrained weights '{tag}' of backbone '{name}' from {source} "
            f"({type(error).__name__}: {error}). Without network access, download the file elsewhere "
            f"and pass its path instead of the tag, for example pretrained='/path/to/{name}-{tag}.pt' "
            f"(a torch state_dict, a .safetensors file or OpenAI's .pt archive)."
        )
        raise PretrainedWeightsError(msg) from error
    if not target:
        msg = f"open_clip returned no file for the pretrained weights '{tag}' of backbone '{name}'."
        raise PretrainedWeightsError(msg)
    return Path(target)


def load_clip(
    backbone: str | Path,
    pretrained: str | Path | None,
    image_size: int,
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
    feature_pipeline: FeaturePipeline | str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Build a frozen open_clip CLIP model at ``image_size`` and its tokenizer.

    The position embedding is resized (open_clip's bicubic interpolation) when
    ``image_size`` differs from the size the weights were made for.

    Args:
        backbone: open_clip model name or path of an open_clip model-config JSON file.
        pretrained: open_clip pretrained tag, path of a weights file, or ``None`` for
            random weights (a warning says the scores are then meaningless).
        image_size: Side of the square input images.
        cache_dir: Optional download folder for pretrained tags.
        quick_gelu: Force QuickGELU (``True``) or exact GELU (``False``) in both towers.
            ``None`` decides as ``feature_pipeline`` says (see
            :func:`anomalib_mvfa.pipeline.uses_quick_gelu`); OpenAI's weights are the tag
            ``"openai"`` and OpenAI's TorchScript archives.
        feature_pipeline: ``"authors"`` (default) or ``"clip"``.

    Returns:
        The CLIP model in eval mode with ``requires_grad=False`` everywhere, and the
        tokenizer that belongs to it.

    Example:
        >>> clip, tokenizer = load_clip("ViT-L-14-336", "openai", image_size=240)  # doctest: +SKIP
        >>> clip.visual.grid_size  # doctest: +SKIP
        (17, 17)
    """
    name, config = resolve_model_config(backbone, cache_dir)
    _check_vision_transformer(name, config, image_size)
    _check_hf_text_model(str(backbone), config.get("text_cfg", {}), cache_dir)
    weights_path = None
    if pretrained is not None:
        is_tag = not _looks_like_path(pretrained)
        if is_tag and str(backbone).startswith(HF_HUB_PREFIX):  # the repository's own weights
            weights_path = _hub_weights(str(backbone), cache_dir)
        elif is_tag:
            weights_path = fetch_pretrained(name, str(pretrained), cache_dir)
        else:
            weights_path = Path(pretrained)
    if quick_gelu is None:
        openai_weights = _are_openai_weights(pretrained, weights_path)
        quick_gelu = uses_quick_gelu(resolve_feature_pipeline(feature_pipeline), config, openai_weights, image_size)
    model = _build_model(name, config, image_size, quick_gelu=bool(quick_gelu))

    if weights_path is None:
        logger.warning(
            "MVFA backbone '%s' has RANDOM weights (pretrained=None): its anomaly scores are meaningless. "
            "Pass an open_clip pretrained tag or a local weights file for real use.",
            name,
        )
    else:
        state_dict = read_weights_file(weights_path, max_bytes=weights_budget(model))
        if hasattr(model.visual, "trunk"):  # a timm tower takes the file's grid, then the one asked for
            match_timm_grid(model.visual, state_dict.get("visual.trunk.pos_embed"))
        resize_pos_embed(state_dict, model)
        resize_text_pos_embed(state_dict, model)
        _check_fit(state_dict, model, f"Weights '{pretrained}' do not fit backbone '{name}'")
        model.load_state_dict(state_dict, strict=True)
        logger.info("Loaded CLIP weights '%s' into backbone '%s'.", pretrained, name)
    if hasattr(model.visual, "trunk"):
        resize_timm_tower(model.visual, image_size)

    model.requires_grad_(False)
    model.eval()
    tokenizer = _make_tokenizer(config)
    return model, tokenizer


def _hub_weights(backbone: str, cache_dir: str | None) -> Path:
    """The weights file of an ``hf-hub:`` backbone's repository (safetensors first)."""
    repository = backbone[len(HF_HUB_PREFIX) :]
    errors = []
    for filename in HF_HUB_WEIGHTS:
        try:
            return _hub_file(backbone, repository, filename, "the weights", cache_dir)
        except PretrainedWeightsError as error:
            errors.append(error)
    raise errors[-1]


def _make_tokenizer(config: dict[str, Any]) -> Any:
    text_cfg = config.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return open_clip.SimpleTokenizer(context_length=context_length, **kwargs)


def _check_fit(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
    """Raise ``PretrainedWeightsError`` with a short account unless ``state_dict`` has ``model``'s keys and shapes."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [
        f"{key}: file {tuple(state_dict[key].shape)}, model {shape}"
        for key, shape in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != shape
    ]
    problems = [
        f"{len(items)} {label} (for example {', '.join(items[:3])})"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("other shapes", shapes))
        if items
    ]
    if problems:
        msg = f"{what}: {'; '.join(problems)}."
        raise PretrainedWeightsError(msg)


def weights_budget(model: torch.nn.Module) -> int:
    """Most bytes a weights file for ``model`` may declare: twice its float32 size, plus 16 MiB.

    Room for float64 files and for position embeddings made for another image size; a file that
    declares more cannot hold this model's weights and is refused before it is loaded.
    """
    numel = sum(tensor.numel() for tensor in model.state_dict().values())
    return 2 * 4 * numel + 16 * 2**20


def _are_openai_weights(pretrained: str | Path | None, weights_path: Path | None) -> bool:
    """Whether the weights are OpenAI's: the tag ``"openai"`` or a file in OpenAI's archive format."""
    if pretrained is None:
        return False
    if not _looks_like_path(pretrained):
        return str(pretrained).lower() == "openai"
    return weights_path is not None and weights_path.is_file() and is_torchscript_archive(weights_path)


def pipeline_quick_gelu(
    backbone: str | Path, pretrained: str | Path | None, image_size: int, feature_pipeline: FeaturePipeline | str
) -> bool:
    """Whether :func:`load_clip` builds QuickGELU for these arguments (nothing is downloaded).

    Example:
        >>> pipeline_quick_gelu("ViT-L-14-336", "openai", 240, "authors")
        False
    """
    _, config = resolve_model_config(backbone)
    path = Path(pretrained) if pretrained is not None and _looks_like_path(pretrained) else None
    openai_weights = _are_openai_weights(pretrained, path)
    return uses_quick_gelu(resolve_feature_pipeline(feature_pipeline), config, openai_weights, image_size)


def weights_fingerprint(state_dict: dict[str, torch.Tensor], samples: int = 1024) -> str:
    """A short fingerprint of CLIP weights: SHA-256 over each tensor's name, shape and sampled values.

    Values are taken as float32, so the same weights in another file format (float16 archive,
    float32 state dict, safetensors) give the same fingerprint; other weights give another.

    Example:
        >>> weights_fingerprint({"w": torch.ones(3)}) == weights_fingerprint({"w": torch.ones(3).half()})
        True
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        values = state_dict[key].detach().flatten().float().cpu()
        picked = values[torch.linspace(0, values.numel() - 1, min(values.numel(), samples)).long()]
        digest.update(f"{key}{tuple(state_dict[key].shape)}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


def set_quick_gelu(clip: torch.nn.Module, quick_gelu: bool) -> None:
    """Switch every transformer block of ``clip`` (both towers) to QuickGELU or exact GELU, in place.

    Example:
        >>> clip, _ = load_clip("tiny-random", None, 64)  # doctest: +SKIP
        >>> set_quick_gelu(clip, True)  # doctest: +SKIP
    """
    for module in clip.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Sequential) and hasattr(mlp, "gelu"):
            mlp.gelu = QuickGELU() if quick_gelu else torch.nn.GELU()


def runs_quick_gelu(clip: torch.nn.Module) -> bool:
    """Whether the blocks of ``clip`` run QuickGELU (``False``: exact GELU)."""
    return any(isinstance(module, QuickGELU) for module in clip.modules())
