"""timm models as teacher or student (the optional extra: ``pip install 'distill-runner[timm]'``).

Built with ``timm.create_model`` for the data set's classes and channels, offline unless pretrained
weights are asked for. Feature recipes name timm's own module paths (``layer3`` for ResNets,
``stages.2`` for ConvNeXt, ``blocks.4`` for EfficientNets): ``dict(model.named_modules())`` lists
them, ``model.feature_info`` names the usual feature stages.

Docs: docs/guide/models.md
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from distill_runner.errors import ConfigError
from distill_runner.models.factories import dry_run

INSTALL_HINT = "install the timm extra: pip install 'distill-runner[timm]' (or pip install timm)"


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("_target_", "timm_model", f"timm is not installed; {INSTALL_HINT}") from None
    return timm


def timm_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 224,
    pretrained: bool = False,
    weights: str | None = None,
    pretrained_cfg_overlay: Mapping | None = None,
    **kwargs,
) -> nn.Module:
    """``timm.create_model(name, num_classes=..., in_chans=...)``, checked to run at ``image_size``.

    ``pretrained: true`` loads timm's weights for ``name`` (its tag picks them: ``resnet18.a1_in1k``);
    ``weights`` (the teacher node's key) is a tag too: ``weights=a1_in1k`` is ``resnet18.a1_in1k``
    with ``pretrained: true``. timm downloads them from the Hugging Face hub; offline, a file given by
    ``pretrained_cfg_overlay: {file: PATH}`` is loaded instead. Other keys go to ``timm.create_model``
    (``drop_rate``, ``img_size``, ...). A ViT-like model (a patch embedding for one image size) is built
    for ``image_size``.
    """
    timm = _timm()
    if weights is not None:
        name, pretrained = f"{name.split('.')[0]}.{weights}", True
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        fix = f"not a timm model; {hint}list them with python -c \"import timm; print(timm.list_models('resnet*'))\""
        raise ConfigError("name", name, fix)
    arch, _, tag = name.partition(".")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = ", ".join(t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")) or "none"
        key, value = ("weights", weights) if weights is not None else ("name", name)
        raise ConfigError(key, value, f"timm has no weights {tag!r} for {arch}; its tags: {tags}")
    if pretrained_cfg_overlay is not None:
        kwargs["pretrained_cfg_overlay"] = dict(pretrained_cfg_overlay)
    asked = ("weights", weights) if weights is not None else ("pretrained", pretrained)  # what an offline error names
    shape = {"num_classes": num_classes, "in_chans": in_channels}
    build = lambda **extra: _create(timm, name, pretrained, asked, **shape, **extra)
    model = build(**kwargs)
    problem = dry_run(model, in_channels, image_size)
    if problem is not None and hasattr(model, "patch_embed") and "img_size" not in kwargs:
        model = build(**kwargs, img_size=image_size)  # position embeddings for this size (resampled if pretrained)
        problem = dry_run(model, in_channels, image_size)
    if problem is not None:
        fix = f"does not run on {image_size} px images ({problem}); use a larger dataset.image_size or another model"
        raise ConfigError("name", name, fix)
    model.architecture = f"timm:{name}"  # reported as such: not torchvision's model of the same name
    return model


OVERLAY = "pretrained_cfg_overlay.file"  # the model node's key naming a local file of timm's pretrained weights


def _create(timm, name: str, pretrained: bool, asked: tuple[str, object], **kwargs) -> nn.Module:
    """``timm.create_model``; a failed download is one line that says where the file must go."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:  # a key the model's constructor does not take
        raise ConfigError("name", name, f"timm.create_model refused the model's keys ({exc})") from None
    except Exception as exc:  # offline: huggingface_hub's LocalEntryNotFoundError, urllib's URLError, ...
        if not pretrained:
            raise
        undo = "set weights=null" if asked[0] == "weights" else "set pretrained=false"
        raise ConfigError(*asked, _offline_fix(name, exc, undo), also=(OVERLAY,)) from None


def _offline_fix(name: str, exc: Exception, undo: str) -> str:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        folder = Path(HF_HUB_CACHE) / ("models--" + cfg.hf_hub_id.replace("/", "--"))
        where = f"the Hugging Face hub cache {folder} (HF_HUB_CACHE; fill it online: hf download {cfg.hf_hub_id})"
    elif cfg is not None and cfg.url:
        where = f"{Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(cfg.url)} (TORCH_HOME)"
    else:
        where = "the Hugging Face hub cache (HF_HUB_CACHE)"
    reason = " ".join(str(exc).split()).split(". ")[0][:200]  # the first sentence: the line stays readable
    return (
        f"timm could not get the pretrained weights of {name} ({type(exc).__name__}: {reason}); put them in {where}, "
        f"or give the file: +{OVERLAY}=PATH, or {undo}"
    )
