"""Loading trained weights into SPViT models, from our state_dict, the paper code's format or a plain backbone.

Three layouts are recognised (after unwrapping a {"model": ...} / {"state_dict": ...} dict and a "module."
prefix left by DistributedDataParallel):
    ours       model.state_dict(): "<backbone prefix>..." (DeiT: "vit.") and "selectors.<s>.<param>"
    paper      the paper code's model: backbone keys without our prefix (DeiT: timm names patch_embed.*,
               cls_token, pos_embed, blocks.<i>.*, norm.*, head.*) and selectors
               score_predictor.<s>.senet.{0,2}.*          SE branch: Linear H->H//2, Linear H//2->H
               score_predictor.<s>.in_conv.<h>.{0,1}.*     LayerNorm d, Linear d->d
               score_predictor.<s>.out_conv.<h>.{0,2,4}.*  Linear d->d/2, d/2->d/4, d/4->2
               with one copy per head h of the one MLP the heads share (the copies must be identical).
    backbone   the backbone alone (timm / DeiT names): the selectors keep their current (fresh) weights
               and a warning says so.

A model family describes its backbone through a class attribute `checkpoint_format` (a CheckpointFormat):
the prefix of its backbone in our state_dict and the renames between the published backbone names and
ours. The DeiT family (SPViT on timm) needs no renames.
"""

import argparse
import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .config import _threshold

__all__ = ["CheckpointError", "CheckpointFormat", "LoadResult", "load_checkpoint", "to_paper_state_dict"]

# Our TokenSelector parameter -> its name inside the paper's score_predictor.<s> (".{h}" = one copy per head).
SHARED_SELECTOR_PARAMS = {"se1": "senet.0", "se2": "senet.2"}
PER_HEAD_SELECTOR_PARAMS = {"norm": "in_conv.{h}.0", "proj_in": "in_conv.{h}.1", "mlp1": "out_conv.{h}.0",
                            "mlp2": "out_conv.{h}.2", "mlp3": "out_conv.{h}.4"}
PAPER_SELECTOR_PREFIX = "score_predictor."
SELECTOR_PREFIX = "selectors."
WRAPPER_KEYS = ("model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every offending key."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How a model family's backbone is named.

    Attributes:
        backbone_prefix: the prefix of the backbone's keys in our state_dict ("vit." for the DeiT family).
        renames: pairs (published name prefix, our name prefix, both without backbone_prefix), applied to
            the first matching prefix of each backbone key when importing (and reversed when exporting).
    """

    backbone_prefix: str = "vit."
    renames: tuple = ()

    def to_ours(self, key):
        for theirs, ours in self.renames:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        return self.backbone_prefix + key

    def to_published(self, key):
        key = key[len(self.backbone_prefix):]
        for theirs, ours in self.renames:
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key


DEFAULT_FORMAT = CheckpointFormat()


class LoadResult(NamedTuple):
    """What load_checkpoint did: the layout it recognised, keys it left out under strict=False, and the
    thresholds the checkpoint carried (None when it had none)."""

    layout: str
    missing_keys: list
    unexpected_keys: list
    threshold: object


def _format_of(model):
    return getattr(model, "checkpoint_format", DEFAULT_FORMAT)


def _read(path_or_state_dict):
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    if not isinstance(path_or_state_dict, (str, Path)):
        raise TypeError(f"path_or_state_dict must be a file path or a state dict, got "
                        f"{type(path_or_state_dict).__name__}")
    path = Path(path_or_state_dict)
    if not path.is_file():
        raise FileNotFoundError(f"path_or_state_dict: no checkpoint file at {str(path)!r}")
    try:
        # weights_only: no arbitrary code from the file. The paper code (DeiT's training script) saves its
        # argparse.Namespace beside the model, so that one class is allowed too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a truncated or foreign file, or a refused class
        raise CheckpointError(f"path_or_state_dict: cannot read {str(path)!r} as a torch checkpoint ({e}); a "
                              "checkpoint you trust that holds other objects can be loaded with torch.load("
                              "weights_only=False) and passed as a dict") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"path_or_state_dict: {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _unwrap(obj):
    """-> (state dict of tensors, threshold stored beside it or None)."""
    threshold = obj.get("threshold") if isinstance(obj.get("threshold"), (float, int, list, tuple)) else None
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError("path_or_state_dict: the checkpoint holds no tensors (expected a state dict, "
                              f"or a dict with one under {WRAPPER_KEYS})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, threshold


def _from_paper(sd, model, fmt):
    """Paper layout -> (our keys -> tensor, unexpected keys, key errors). Head copies must be identical."""
    out, unexpected, errors = {}, [], []
    for key, value in sd.items():
        if not key.startswith(PAPER_SELECTOR_PREFIX):
            out[fmt.to_ours(key)] = value
    used = set()
    for s, selector in enumerate(model.selectors):
        base = f"{PAPER_SELECTOR_PREFIX}{s}."
        for ours, theirs in SHARED_SELECTOR_PARAMS.items():
            for p in ("weight", "bias"):
                key = f"{base}{theirs}.{p}"
                if key in sd:
                    out[f"{SELECTOR_PREFIX}{s}.{ours}.{p}"] = sd[key]
                    used.add(key)
        for ours, theirs in PER_HEAD_SELECTOR_PARAMS.items():
            for p in ("weight", "bias"):
                keys = [f"{base}{theirs.format(h=h)}.{p}" for h in range(selector.num_heads)]
                present = [k for k in keys if k in sd]
                used.update(present)
                if not present:
                    continue  # reported as missing under our name
                if len(present) < len(keys):
                    errors.append(f"missing head copies: {[k for k in keys if k not in sd]}")
                    continue
                first = sd[present[0]]
                for k in present[1:]:
                    if sd[k].shape != first.shape or not torch.equal(sd[k], first):
                        errors.append(f"head copies differ: {k} is not identical to {present[0]} (the heads of a "
                                      "selector share one MLP)")
                out[f"{SELECTOR_PREFIX}{s}.{ours}.{p}"] = first
    unexpected = [k for k in sd if k.startswith(PAPER_SELECTOR_PREFIX) and k not in used]
    return out, unexpected, errors


def _layout(sd, fmt):
    if any(k.startswith(PAPER_SELECTOR_PREFIX) for k in sd):
        return "paper"
    if any(k.startswith(SELECTOR_PREFIX) for k in sd):
        return "ours"
    return "backbone"


def load_checkpoint(model, path_or_state_dict, strict=True):
    """Load trained weights into an SPViT `model` in place (all or nothing) and return a LoadResult.

    Args:
        model: an SPViT model (reference or accelerated) of the family and size the checkpoint was trained as.
        path_or_state_dict: a file written by torch.save, or the loaded object: our state_dict, the paper
            code's checkpoint ({"model": state_dict, "optimizer": ...}), or a plain backbone state_dict.
            A dict may carry "threshold" (a float or one float per stage) beside "model": it then becomes
            model.config.threshold.
        strict: True: every parameter of the model must be in the checkpoint and every checkpoint key must
            be used (a backbone checkpoint needs the backbone's keys only). False: missing and unexpected
            keys are returned instead. Wrongly shaped tensors and differing head copies always raise.
    Raises:
        CheckpointError (a ValueError) listing every missing, unexpected or wrongly shaped key at once;
        the model is not modified then.
    """
    sd, threshold = _unwrap(_read(path_or_state_dict))
    fmt = _format_of(model)
    layout = _layout(sd, fmt)
    errors, unexpected = [], []
    if layout == "paper":
        mapped, unexpected, errors = _from_paper(sd, model, fmt)
    elif layout == "ours":
        mapped = dict(sd)
    else:
        mapped = {k if k.startswith(fmt.backbone_prefix) else fmt.to_ours(k): v for k, v in sd.items()}
    own = model.state_dict()
    expected = [k for k in own if layout != "backbone" or not k.startswith(SELECTOR_PREFIX)]
    missing = [k for k in expected if k not in mapped]
    unexpected += [k for k in mapped if k not in own]
    for k, v in mapped.items():
        if k in own and v.shape != own[k].shape:
            errors.append(f"wrong shape: {k} is {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
    if threshold is not None:
        try:
            config = dataclasses.replace(model.config, threshold=_threshold(
                tuple(threshold) if isinstance(threshold, (list, tuple)) else threshold, model.config.num_stages))
        except (TypeError, ValueError) as e:
            errors.append(f"checkpoint {e}")
    if strict:
        errors += [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
    if errors:
        raise CheckpointError(f"path_or_state_dict does not match the {type(model).__name__} model "
                              f"({layout} layout), {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for k, v in mapped.items():
            if k in own:
                own[k].copy_(v)
    if threshold is not None:
        model.config = config
    if layout == "backbone":
        warnings.warn(f"path_or_state_dict holds the backbone only: the {len(model.selectors)} token selectors keep "
                      "their freshly initialised weights", stacklevel=2)
    return LoadResult(layout, missing, [k for k in unexpected], threshold)


def to_paper_state_dict(model):
    """The model's weights in the paper code's layout (backbone names as published, one selector copy per head).

    Returns a dict of CPU-independent clones (each head copy its own tensor), loadable by load_checkpoint."""
    fmt = _format_of(model)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(fmt.backbone_prefix):
            out[fmt.to_published(k)] = v.detach().clone()
    for s, selector in enumerate(model.selectors):
        base = f"{PAPER_SELECTOR_PREFIX}{s}."
        for ours, theirs in SHARED_SELECTOR_PARAMS.items():
            for p in ("weight", "bias"):
                out[f"{base}{theirs}.{p}"] = getattr(getattr(selector, ours), p).detach().clone()
        for ours, theirs in PER_HEAD_SELECTOR_PARAMS.items():
            for p in ("weight", "bias"):
                value = getattr(getattr(selector, ours), p).detach()
                for h in range(selector.num_heads):
                    out[f"{base}{theirs.format(h=h)}.{p}"] = value.clone()
    return out
