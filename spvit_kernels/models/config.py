"""The pruning configuration of an SPViT model and its validation (design sections 2 and 5)."""

import math
from dataclasses import dataclass
from numbers import Real

PRUNING_MODES = ("threshold", "topk")
PACKAGE_MODES = ("mean", "sum", "none")
PACKAGE_MERGES = ("concat", "add")

# The official DeiT SPViT setting: selectors before blocks 3, 6, 9 (0-based), cumulative keep ratios.
DEFAULT_KEEP_RATIOS = (0.617, 0.369, 0.137)
DEFAULT_SELECTOR_LAYERS = (3, 6, 9)

CONFIG_FIELDS = ("pruning", "keep_ratios", "selector_layers", "package", "threshold", "package_merge", "gumbel_tau",
                 "train_attn_eps")
# Training (design section 8): the Gumbel softmax temperature and the attention smoothing constant of the paper code.
DEFAULT_GUMBEL_TAU = 1.0
DEFAULT_TRAIN_ATTN_EPS = 1e-6


@dataclass(frozen=True)
class SPViTConfig:
    """How an SPViT model prunes. Immutable; build it with `make_config`, which validates it.

    Attributes:
        pruning: "topk" (keep round(keep_ratios[s] * P) patches at stage s) or "threshold"
            (keep a patch iff its keep_score > threshold; NaN never kept).
        keep_ratios: cumulative keep ratios, one per stage, strictly decreasing, each in (0, 1].
            Only used by "topk".
        selector_layers: 0-based index of the block each selector sits before, strictly increasing.
        package: "mean" | "sum" | "none": how the tokens dropped at a stage are pooled into that stage's
            package token ("none": no package token).
        threshold: the keep_score threshold of "threshold" pruning: one float for every stage, or a tuple
            of floats, one per stage (what `calibrate_thresholds` sets). `threshold_at(s)` reads it.
        package_merge: "concat" (the 3x mode: each stage appends its package token after the earlier ones)
            or "add" (the 1x mode: one package token in total; the first stage appends it, each later
            stage adds its pooled token to it element-wise). "add" needs package != "none".
        gumbel_tau: training only: the temperature of the Gumbel softmax keep decision (> 0; default 1).
        train_attn_eps: training only: the smoothing constant of policy attention (>= 0; default 1e-6, the
            paper code's training value; 0 gives the masked inference form).
    """

    pruning: str = "topk"
    keep_ratios: tuple = DEFAULT_KEEP_RATIOS
    selector_layers: tuple = DEFAULT_SELECTOR_LAYERS
    package: str = "mean"
    threshold: float = 0.0
    package_merge: str = "concat"
    gumbel_tau: float = DEFAULT_GUMBEL_TAU
    train_attn_eps: float = DEFAULT_TRAIN_ATTN_EPS

    def threshold_at(self, stage):
        """The keep_score threshold of `stage` (0-based) in "threshold" pruning."""
        return self.threshold[stage] if isinstance(self.threshold, tuple) else self.threshold

    @property
    def num_stages(self):
        return len(self.selector_layers)

    def num_keep(self, stage, num_patches):
        """Patches kept (top-k mode) after `stage` for an image of `num_patches` patches: round(r_s * P)."""
        return int(round(self.keep_ratios[stage] * num_patches))

    def num_packages_after(self, stage):
        """Package tokens every image carries after `stage` (0-based) has run."""
        if self.package == "none":
            return 0
        return 1 if self.package_merge == "add" else stage + 1


def split_config_kwargs(cfg, allowed_extra=()):
    """Split keyword arguments into (pruning config fields, the `allowed_extra` ones); any other key raises
    TypeError naming it."""
    unknown = sorted(set(cfg) - set(CONFIG_FIELDS) - set(allowed_extra))
    if unknown:
        raise TypeError(f"{unknown[0]} is not a config field; expected some of {CONFIG_FIELDS + tuple(allowed_extra)}")
    return ({k: v for k, v in cfg.items() if k in CONFIG_FIELDS},
            {k: v for k, v in cfg.items() if k in allowed_extra})


def _tuple_of(value, name, kind):
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {kind.__name__}s, got {type(value).__name__}") from None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise TypeError(f"{name} must contain {kind.__name__}s, got {v!r}")
    return items


def make_config(depth, *, pruning="topk", keep_ratios=DEFAULT_KEEP_RATIOS, selector_layers=DEFAULT_SELECTOR_LAYERS,
                package="mean", threshold=0.0, package_merge="concat", gumbel_tau=DEFAULT_GUMBEL_TAU,
                train_attn_eps=DEFAULT_TRAIN_ATTN_EPS):
    """Validate a pruning configuration for a ViT of `depth` blocks and return it as an SPViTConfig.

    Raises ValueError (bad value) or TypeError (bad type) whose message starts with the field's name.
    """
    if pruning not in PRUNING_MODES:
        raise ValueError(f"pruning must be one of {PRUNING_MODES}, got {pruning!r}")
    if package not in PACKAGE_MODES:
        raise ValueError(f"package must be one of {PACKAGE_MODES}, got {package!r}")
    if package_merge not in PACKAGE_MERGES:
        raise ValueError(f"package_merge must be one of {PACKAGE_MERGES}, got {package_merge!r}")
    if package_merge == "add" and package == "none":
        raise ValueError('package_merge="add" merges package tokens, so it needs package "mean" or "sum", '
                         'not "none"')
    ratios = tuple(float(r) for r in _tuple_of(keep_ratios, "keep_ratios", Real))
    layers = _tuple_of(selector_layers, "selector_layers", int)
    if not layers:
        raise ValueError("selector_layers must name at least one block (an SPViT model has >= 1 selector)")
    for layer in layers:
        if not 0 <= layer < depth:
            raise ValueError(f"selector_layers: block {layer} is outside [0, {depth}) for a ViT of depth {depth}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"selector_layers must be strictly increasing, got {layers}")
    if len(ratios) != len(layers):
        raise ValueError(f"keep_ratios must have one ratio per selector: {len(ratios)} ratios for "
                         f"{len(layers)} selector_layers")
    for r in ratios:
        if not 0.0 < r <= 1.0:  # also rejects NaN
            raise ValueError(f"keep_ratios must lie in (0, 1], got {r}")
    if any(b >= a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"keep_ratios must be strictly decreasing (they are cumulative), got {ratios}")
    threshold = _threshold(threshold, len(layers))
    gumbel_tau = _real(gumbel_tau, "gumbel_tau")
    if not gumbel_tau > 0 or math.isinf(gumbel_tau):
        raise ValueError(f"gumbel_tau must be a finite number > 0, got {gumbel_tau}")
    train_attn_eps = _real(train_attn_eps, "train_attn_eps")
    if not 0 <= train_attn_eps < math.inf:
        raise ValueError(f"train_attn_eps must be a finite number >= 0, got {train_attn_eps}")
    return SPViTConfig(pruning=pruning, keep_ratios=ratios, selector_layers=layers, package=package,
                       threshold=threshold, package_merge=package_merge, gumbel_tau=gumbel_tau,
                       train_attn_eps=train_attn_eps)


def _real(value, name):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _threshold(value, num_stages):
    """A real number -> float; a sequence of one real per stage -> tuple of floats. NaN is refused."""
    scalar = isinstance(value, Real) and not isinstance(value, bool)
    items = (value,) if scalar else _tuple_of(value, "threshold", Real)
    if not scalar and len(items) != num_stages:
        raise ValueError(f"threshold: a per-stage threshold needs one value per selector, got {len(items)} for "
                         f"{num_stages} selector_layers")
    if any(isinstance(t, bool) or math.isnan(t) for t in items):
        raise ValueError(f"threshold must be real numbers (not NaN), got {value!r}")
    return float(value) if scalar else tuple(float(t) for t in items)
