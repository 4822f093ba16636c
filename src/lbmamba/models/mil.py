"""Multiple-instance learning on whole-slide images: MambaMIL with the LB scan, and an ABMIL baseline.

A bag is the set of patch features of one slide, (n_instances, feat_dim) or (1, n_instances, feat_dim);
the models return bag logits (1, n_classes) and, on request, one attention score per instance.

MambaMIL (Yang et al., MICCAI 2024), as in its public code:

    fc:     Linear(feat_dim, embed_dim) -> GELU -> Dropout
    depth x [ LayerNorm -> mixer ] with a residual connection around each
    LayerNorm -> attention pooling (Linear(embed_dim, 128) -> Tanh -> Linear(128, 1), softmax over instances)
    classifier: Linear(embed_dim, n_classes)

The mixer (`mixer=`):

    "mamba"       one forward Mamba-1 scan (window 1)
    "bimamba"     Vim "v2": a second, independent branch over the flipped sequence; outputs summed
    "srmamba"     a forward scan plus an independent branch over the sequence re-ordered with stride
                  `rate` (pad to a multiple of rate, view as (k, rate), transpose, scan, undo); outputs summed
    "lb"          one LB scan (the forward scan with the local backward scan inside, `window`)
    "lb-srmamba"  SRMamba with LB scans in both of its scans

With window=1 the LB scan is the plain scan, so "lb" equals "mamba" and "lb-srmamba" equals "srmamba"
for the same weights (parameter names are shared, so state dicts move between them).

ABMIL (Ilse et al., 2018; CLAM's gated attention): fc -> ReLU -> Dropout, gated attention
(tanh branch * sigmoid branch -> Linear(., 1)), softmax pooling, classifier; no Mamba layers.

Models are registered with timm (`timm.create_model("mambamil_lb", in_dim=1024, num_classes=2)`), and
`create_mil_model(name, **config)` / `model.config` rebuild a model from a checkpoint's stored config.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ..nn import Mamba

__all__ = [
    "MIXERS",
    "MODEL_NAMES",
    "MambaMIL",
    "ABMIL",
    "SRMamba",
    "sr_reorder",
    "sr_restore",
    "sr_permutation",
    "create_mil_model",
]

#: the MambaMIL mixers
MIXERS = ("lb", "mamba", "bimamba", "srmamba", "lb-srmamba")
#: every model name `create_mil_model` accepts
MODEL_NAMES = MIXERS + ("abmil",)


# ---------------------------------------------------------------------- SRMamba's sequence re-ordering
def sr_reorder(x: torch.Tensor, rate: int) -> torch.Tensor:
    """Re-order the last axis with stride `rate` (SRMamba): (..., L) -> (..., k * rate), k = ceil(L / rate).

    The sequence is zero-padded at the end to k * rate, viewed as (k, rate), transposed to (rate, k)
    and flattened: the result lists positions 0, rate, 2 rate, ..., then 1, rate + 1, ..., and so on.
    """
    if rate < 1:
        raise ValueError(f"rate must be a positive int, got {rate!r}")
    length = x.shape[-1]
    k = -(-length // rate)
    if k * rate != length:
        x = F.pad(x, (0, k * rate - length))
    return x.unflatten(-1, (k, rate)).transpose(-1, -2).flatten(-2)


def sr_restore(x: torch.Tensor, rate: int, length: int) -> torch.Tensor:
    """Undo `sr_reorder` on the last axis and drop the padding: (..., k * rate) -> (..., length)."""
    k = x.shape[-1] // rate
    if k * rate != x.shape[-1] or length > x.shape[-1]:
        raise ValueError(f"cannot restore a sequence of {x.shape[-1]} positions with rate {rate} to length {length}")
    return x.unflatten(-1, (rate, k)).transpose(-1, -2).flatten(-2)[..., :length]


def sr_permutation(length: int, rate: int) -> torch.Tensor:
    """The positions `sr_reorder` visits, in order, with -1 for the padding (a LongTensor of k * rate)."""
    idx = torch.arange(length, dtype=torch.float64)
    out = sr_reorder(idx + 1, rate) - 1  # padding (0) becomes -1
    return out.long()


class SRMamba(Mamba):
    """SRMamba mixer: a forward scan plus an independent scan over the stride-`rate` re-ordered sequence.

    Shares in_proj / out_proj; the second branch has its own conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b
    (MambaMIL's parameter names). The two branch outputs are summed before out_proj (no division).

    Args:
        d_model, d_state, d_conv, expand and the rest: as `lbmamba.nn.Mamba`.
        rate: the stride of the re-ordering (MambaMIL: 10).
        scan: "forward" (plain scans, SRMamba) or "lb" (LB scans in both branches, LB-SRMamba).
        window: the LB window of both scans (scan="lb").
    """

    def __init__(self, d_model: int, rate: int = 10, scan: str = "forward", window="auto", **kwargs):
        if scan not in ("forward", "lb"):
            raise ValueError(f"SRMamba scan must be 'forward' or 'lb', got {scan!r}")
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
            raise ValueError(f"rate must be a positive int, got {rate!r}")
        super().__init__(d_model, scan=scan, window=window, **kwargs)
        self.rate = rate
        factory = {"device": self.in_proj.weight.device, "dtype": self.in_proj.weight.dtype}
        defaults = dict(dt_min=0.001, dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4)
        dt_args = {k: kwargs.get(k, v) for k, v in defaults.items()}
        self.conv1d_b, self.x_proj_b, self.dt_proj_b, A_b_log, D_b = self._branch_modules(
            self.conv1d.bias is not None, dt_args["dt_min"], dt_args["dt_max"], dt_args["dt_init"],
            dt_args["dt_scale"], dt_args["dt_init_floor"], factory,
        )
        self.A_b_log = nn.Parameter(A_b_log)
        self.A_b_log._no_weight_decay = True
        self.D_b = nn.Parameter(D_b)
        self.D_b._no_weight_decay = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"SRMamba expects hidden_states of shape (batch, L, {self.d_model}), got {tuple(hidden_states.shape)}"
            )
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 d_inner, L)
        y = self.ssm_branch(xz, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, self.window)
        y_r = self.ssm_branch(
            sr_reorder(xz, self.rate), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, self.window
        )
        y = y + sr_restore(y_r, self.rate, length)
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rate={self.rate}"


def _make_mixer(mixer: str, d_model: int, d_state: int, d_conv: int, expand: int, rate: int, window, ssm_cfg) -> nn.Module:
    ssm_cfg = dict(ssm_cfg or {})
    common = dict(d_state=d_state, d_conv=d_conv, expand=expand, **ssm_cfg)
    if mixer == "mamba":
        return Mamba(d_model, scan="forward", **common)
    if mixer == "lb":
        return Mamba(d_model, scan="lb", window=window, **common)
    if mixer == "bimamba":
        # MambaMIL's BiMamba sums the two directions (no "/2")
        return Mamba(d_model, scan="bi", if_divide_out=False, **common)
    if mixer == "srmamba":
        return SRMamba(d_model, rate=rate, scan="forward", **common)
    if mixer == "lb-srmamba":
        return SRMamba(d_model, rate=rate, scan="lb", window=window, **common)
    raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")


# ---------------------------------------------------------------------- shared helpers
def _as_bag(x: torch.Tensor, in_dim: int, name: str) -> torch.Tensor:
    """(n, d) or (B, n, d) -> float (B, n, d), with clear errors."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor bag, got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} expects a bag of shape (n_instances, {in_dim}) or (1, n_instances, {in_dim}), got {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(f"{name} was built for {in_dim}-d instance features, got a bag of {x.shape[-1]}-d features {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} got an empty bag (0 instances)")
    return x


def _xavier_linear_init(module: nn.Module) -> None:
    """MambaMIL / CLAM init for the non-mixer layers: xavier-normal Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _MILBase(nn.Module):
    """The common timm-style API of the MIL models."""

    model_name: str = ""
    num_classes: int
    embed_dim: int

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments (plain types only): `create_mil_model(**model.config)` rebuilds the model."""
        return dict(self._config)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._config["num_classes"] = num_classes
        self.classifier = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, h: torch.Tensor, return_attention: bool = False, pre_logits: bool = False):
        """h: (B, n, embed_dim) instance embeddings -> logits (B, n_classes) [, raw attention (B, n)]."""
        scores = self.attention_scores(h)  # (B, n)
        weights = torch.softmax(scores.float(), dim=-1).to(h.dtype)
        pooled = torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # (B, embed_dim)
        out = pooled if pre_logits else self.classifier(pooled)
        return (out, scores) if return_attention else out

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """x: a bag (n_instances, in_dim) or (1, n_instances, in_dim).

        Returns logits (1, n_classes); with return_attention=True also the raw (pre-softmax) attention
        score of every instance, (1, n_instances): softmax over the last axis gives the pooling weights.
        """
        return self.forward_head(self.forward_features(x), return_attention=return_attention)


class MambaMIL(_MILBase):
    """MambaMIL with a choice of mixer ("lb", "mamba", "bimamba", "srmamba", "lb-srmamba").

    Args:
        in_dim: instance feature size (1024 for ResNet-50 truncated after stage 3).
        num_classes: number of bag classes.
        mixer: see the module docstring.
        depth: number of [LayerNorm -> mixer] residual layers (MambaMIL: 2).
        embed_dim: width after the first projection (MambaMIL: 512).
        drop_rate: dropout after the first projection.
        act: "gelu" or "relu" after the first projection.
        d_state, d_conv, expand: mixer sizes (16, 4, 2).
        rate: SRMamba's stride ("srmamba", "lb-srmamba").
        window: the LB window ("lb", "lb-srmamba"): a positive int or "auto".
        attn_dim: hidden size of the attention pooling (128).
        ssm_cfg: further `lbmamba.nn.Mamba` kwargs (dt_rank, dt_min, ...).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        mixer: str = "lb",
        depth: int = 2,
        embed_dim: int = 512,
        drop_rate: float = 0.25,
        act: str = "gelu",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        rate: int = 10,
        window: Union[int, str] = "auto",
        attn_dim: int = 128,
        ssm_cfg: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if act not in ("gelu", "relu"):
            raise ValueError(f"act must be 'gelu' or 'relu', got {act!r}")
        self._config = dict(
            model=mixer, in_dim=in_dim, num_classes=num_classes, depth=depth, embed_dim=embed_dim,
            drop_rate=drop_rate, act=act, d_state=d_state, d_conv=d_conv, expand=expand, rate=rate,
            window=window, attn_dim=attn_dim, ssm_cfg=dict(ssm_cfg or {}),
        )
        self.model_name = mixer
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.mixer = mixer
        self.grad_checkpointing = False

        self.fc = nn.Sequential(
            nn.Linear(in_dim, embed_dim), nn.GELU() if act == "gelu" else nn.ReLU(), nn.Dropout(drop_rate)
        )
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(embed_dim),
                _make_mixer(mixer, embed_dim, d_state, d_conv, expand, rate, window, ssm_cfg),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.attention = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # xavier for the projections / pooling / classifier; the mixers keep Mamba's own init
        for part in (self.fc, self.norm, self.attention, self.classifier):
            _xavier_linear_init(part)
        for layer in self.layers:
            _xavier_linear_init(layer[0])

    @torch.jit.ignore
    def no_weight_decay(self):
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each mixer layer in the backward (less memory for very large bags)."""
        self.grad_checkpointing = enable

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention(h).squeeze(-1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, in_dim) or (B, n, in_dim) -> instance embeddings (B, n, embed_dim) after the final norm."""
        x = _as_bag(x, self.in_dim, type(self).__name__)
        h = self.fc(x.to(self.fc[0].weight.dtype))
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = h + grad_checkpoint(layer, h, use_reentrant=False)
            else:
                h = h + layer(h)
        return self.norm(h)


class ABMIL(_MILBase):
    """Gated-attention MIL (Ilse et al., 2018, as in CLAM's Attn_Net_Gated), no Mamba layers.

    Args:
        in_dim, num_classes, embed_dim, drop_rate, attn_dim: as MambaMIL (act is ReLU, as CLAM).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        drop_rate: float = 0.25,
        attn_dim: int = 128,
        act: str = "relu",
    ):
        super().__init__()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
        if act not in ("gelu", "relu"):
            raise ValueError(f"act must be 'gelu' or 'relu', got {act!r}")
        self._config = dict(
            model="abmil", in_dim=in_dim, num_classes=num_classes, embed_dim=embed_dim,
            drop_rate=drop_rate, attn_dim=attn_dim, act=act,
        )
        self.model_name = "abmil"
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.fc = nn.Sequential(
            nn.Linear(in_dim, embed_dim), nn.ReLU() if act == "relu" else nn.GELU(), nn.Dropout(drop_rate)
        )
        self.attention_a = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh(), nn.Dropout(drop_rate))
        self.attention_b = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Sigmoid(), nn.Dropout(drop_rate))
        self.attention_c = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        _xavier_linear_init(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_bag(x, self.in_dim, type(self).__name__)
        return self.fc(x.to(self.fc[0].weight.dtype))


# ---------------------------------------------------------------------- construction
_MAMBA_KEYS = ("in_dim", "num_classes", "depth", "embed_dim", "drop_rate", "act", "d_state", "d_conv",
               "expand", "rate", "window", "attn_dim", "ssm_cfg")
_ABMIL_KEYS = ("in_dim", "num_classes", "embed_dim", "drop_rate", "attn_dim", "act")


def create_mil_model(model: str = "lb", **config) -> _MILBase:
    """A MIL model by name: one of MODEL_NAMES. Keyword arguments the chosen model does not take are
    ignored when they are MambaMIL-only options (depth, rate, window... for "abmil"); others raise."""
    if model not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {model!r}")
    keys = _ABMIL_KEYS if model == "abmil" else _MAMBA_KEYS
    unknown = sorted(set(config) - set(_MAMBA_KEYS) - set(_ABMIL_KEYS))
    if unknown:
        raise TypeError(f"unknown MIL model options {unknown}; expected some of {sorted(set(_MAMBA_KEYS) | set(_ABMIL_KEYS))}")
    kwargs = {k: v for k, v in config.items() if k in keys}
    if model == "abmil":
        return ABMIL(**kwargs)
    return MambaMIL(mixer=model, **kwargs)


# ---------------------------------------------------------------------- timm registration
def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 2,
        "first_conv": "fc.0",
        "classifier": "classifier",
        "license": "apache-2.0",
        **kwargs,
    }


_LB_PAPER = dict(paper_ids="arXiv:2506.15976", paper_name="LBMamba: Locally Bi-directional Mamba")
_MAMBAMIL_PAPER = dict(paper_ids="arXiv:2403.06800", paper_name="MambaMIL")

default_cfgs = generate_default_cfgs(
    {
        "mambamil_lb": _cfg(**_LB_PAPER),
        "mambamil_lb_srmamba": _cfg(**_LB_PAPER),
        "mambamil_mamba": _cfg(**_MAMBAMIL_PAPER),
        "mambamil_bimamba": _cfg(**_MAMBAMIL_PAPER),
        "mambamil_srmamba": _cfg(**_MAMBAMIL_PAPER),
        "abmil": _cfg(paper_ids="arXiv:1802.04712", paper_name="Attention-based Deep Multiple Instance Learning"),
    }
)


def _create(variant: str, cls, pretrained: bool, **kwargs):
    if kwargs.get("features_only"):
        raise ValueError(f"{variant} has no features_only mode; use model.forward_features(bag)")
    return build_model_with_cfg(cls, variant, pretrained, kwargs_filter=("in_chans", "img_size", "global_pool"), **kwargs)


@register_model
def mambamil_lb(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with one LB scan per layer (LB-MambaMIL; 2 layers, width 512)."""
    return _create("mambamil_lb", MambaMIL, pretrained, **dict(dict(mixer="lb"), **kwargs))


@register_model
def mambamil_lb_srmamba(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL-SRMamba with LB scans in both scans."""
    return _create("mambamil_lb_srmamba", MambaMIL, pretrained, **dict(dict(mixer="lb-srmamba"), **kwargs))


@register_model
def mambamil_mamba(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with the plain (forward) Mamba mixer."""
    return _create("mambamil_mamba", MambaMIL, pretrained, **dict(dict(mixer="mamba"), **kwargs))


@register_model
def mambamil_bimamba(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with the bidirectional (Vim v2) mixer."""
    return _create("mambamil_bimamba", MambaMIL, pretrained, **dict(dict(mixer="bimamba"), **kwargs))


@register_model
def mambamil_srmamba(pretrained: bool = False, **kwargs) -> MambaMIL:
    """MambaMIL with the sequence-reordering mixer (SRMamba, rate 10)."""
    return _create("mambamil_srmamba", MambaMIL, pretrained, **dict(dict(mixer="srmamba"), **kwargs))


@register_model
def abmil(pretrained: bool = False, **kwargs) -> ABMIL:
    """Gated-attention MIL baseline (no Mamba layers)."""
    return _create("abmil", ABMIL, pretrained, **kwargs)
