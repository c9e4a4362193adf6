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
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .config import _threshold

__all__ = ["CheckpointError", "CheckpointFormat", "LoadResult", "checkpoint_num_classes", "load_checkpoint",
           "read_checkpoint", "to_paper_state_dict"]

# Our TokenSelector parameter -> its name inside the paper's score_predictor.<s> (".{h}" = one copy per head).
SHARED_SELECTOR_PARAMS = {"se1": "senet.0", "se2": "senet.2"}
PER_HEAD_SELECTOR_PARAMS = {"norm": "in_conv.{h}.0", "proj_in": "in_conv.{h}.1", "mlp1": "out_conv.{h}.0",
                            "mlp2": "out_conv.{h}.2", "mlp3": "out_conv.{h}.4"}
PAPER_SELECTOR_PREFIX = "score_predictor."
SELECTOR_PREFIX = "selectors."
WRAPPER_KEYS = ("model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. `problems` lists every offending key (the
    message shows the first few, and which model the checkpoint looks like when it is of another size)."""

    def __init__(self, message, problems=()):
        super().__init__(message)
        self.problems = list(problems)


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
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r} (path_or_state_dict)")
    if zipfile.is_zipfile(path):
        _verify_archive(path)
    try:
        # weights_only: no arbitrary code from the file. The paper code (DeiT's training script) saves its
        # argparse.Namespace beside the model, so that one class is allowed too.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a truncated or foreign file, or a refused class
        if not zipfile.is_zipfile(path) and "Unsupported global" not in str(e):  # not a refused class: no pickle
            raise CheckpointError(f"cannot read {str(path)!r} as a torch checkpoint: it is neither a complete zip "
                                  "archive as torch.save writes nor a legacy pickle (truncated, or another kind of "
                                  f"file?); torch.load says {type(e).__name__}: "
                                  f"{str(e).strip().splitlines()[-1][:200]}") from e
        raise CheckpointError(f"cannot read {str(path)!r} as a torch checkpoint ({e}); a checkpoint you trust "
                              "that holds other objects can be loaded with torch.load(weights_only=False) and "
                              "passed as a dict") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"path_or_state_dict: {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj


def _verify_archive(path):
    """Check every entry of a torch.save zip archive against its stored CRC-32 before anything is loaded: torch's
    own reader does not, so flipped bytes would otherwise load as silently wrong weights. Entries written without a
    checksum (torch.serialization.config.save.compute_crc32 = False stores 0) cannot be checked and are skipped."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size > 0:
                    continue
                with archive.open(info) as entry:  # reading to the end compares the CRC-32
                    while entry.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        where = f"entry {info.filename!r}" if "info" in locals() else "its directory"
        raise CheckpointError(f"{str(path)!r} is damaged: {where} does not match its checksum or cannot be "
                              f"read ({e}); nothing was loaded") from e


def _describe(sd):
    """What model a state dict looks like: 'C channels, depth D, K classes' (as far as its keys tell)."""
    parts = []
    for key, v in sd.items():
        if key.endswith("cls_token") or key.endswith("pos_embed"):
            parts.append(f"{v.shape[-1]} channels")
            break
    depths = [int(k.split("blocks.", 1)[1].split(".")[0]) for k in sd
              if "blocks." in k and k.split("blocks.", 1)[1].split(".")[0].isdigit()]
    if depths:
        parts.append(f"depth {max(depths) + 1}")
    heads = [v for k, v in sd.items() if k.endswith("head.weight") and "aux" not in k and v.dim() == 2]
    if heads:
        parts.append(f"{heads[0].shape[0]} classes")
    return ", ".join(parts) or "no recognisable backbone keys"


def _tensor_problems(k, v, want):
    """Why checkpoint tensor `v` cannot be copied into the model's `want` (None when it can)."""
    if v.is_meta:
        return f"no data: {k} is a meta tensor in the checkpoint"
    if v.shape != want.shape:
        return f"wrong shape: {k} is {tuple(v.shape)} in the checkpoint, {tuple(want.shape)} in the model"
    kind = lambda t: "complex" if t.is_complex() else "floating" if t.is_floating_point() else (  # noqa: E731
        "bool" if t.dtype == torch.bool else "integer")
    if kind(v) != kind(want):
        return f"wrong dtype: {k} is {str(v.dtype).replace('torch.', '')} in the checkpoint, " \
               f"{str(want.dtype).replace('torch.', '')} in the model"
    return None


def _unwrap(obj):
    """-> (state dict of tensors, threshold stored beside it or None)."""
    threshold = obj.get("threshold") if isinstance(obj.get("threshold"), (float, int, list, tuple)) else None
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError("the checkpoint (path_or_state_dict) holds no tensors (expected a state dict, "
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
    shape_errors = 0
    for k, v in mapped.items():
        problem = _tensor_problems(k, v, own[k]) if k in own else None
        if problem is not None:
            errors.append(problem)
            shape_errors += problem.startswith("wrong shape")
    if threshold is not None:
        try:
            config = dataclasses.replace(model.config, threshold=_threshold(
                tuple(threshold) if isinstance(threshold, (list, tuple)) else threshold, model.config.num_stages))
        except (TypeError, ValueError) as e:
            errors.append(f"checkpoint {e}")
    if strict:
        errors += [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
    if errors:
        head = f"the checkpoint does not match the {type(model).__name__} model ({layout} layout)"
        if shape_errors > 3:  # another model size: say which, rather than every tensor
            head += (f": the checkpoint looks like a model with {_describe(sd)}; the model has "
                     f"{_describe(model.state_dict() if layout == 'ours' else _published(model, fmt))}")
        shown = errors[:8] + ([f"... and {len(errors) - 8} more"] if len(errors) > 8 else [])
        raise CheckpointError(f"{head}; {len(errors)} problem(s):\n  " + "\n  ".join(shown), errors)
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


def read_checkpoint(path):
    """The object a checkpoint file holds (torch.load with weights_only, after its checksums were verified), to
    pass to load_checkpoint and checkpoint_num_classes without reading the file twice. Raises FileNotFoundError /
    CheckpointError naming the file."""
    return _read(path)


def checkpoint_num_classes(path_or_state_dict):
    """The class count of the checkpoint's classification head ("head.weight" rows), or None without one."""
    sd, _ = _unwrap(_read(path_or_state_dict))
    heads = [v for k, v in sd.items() if k.split(".")[-2:] == ["head", "weight"] and v.dim() == 2]
    return int(heads[0].shape[0]) if heads else None


def _published(model, fmt):
    """The model's backbone state dict under published names (for _describe)."""
    return {fmt.to_published(k): v for k, v in model.state_dict().items() if k.startswith(fmt.backbone_prefix)}


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
