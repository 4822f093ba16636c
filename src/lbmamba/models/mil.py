"""Multiple-instance learning on whole-slide images: MambaMIL with the LB scan, and attention-MIL baselines.

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
                  `rate` (`lbmamba.nn.SRMamba`); outputs summed
    "lb"          one LB scan (the forward scan with the local backward scan inside, `window`)
    "lb-srmamba"  SRMamba with LB scans in both of its scans

With window=1 the LB scan is the plain scan, so "lb" equals "mamba" and "lb-srmamba" equals "srmamba"
for the same weights (parameter names are shared, so state dicts move between them).

MambaMIL initialises every Linear layer xavier-normal with a zero bias, the mixers' included (`init=
"mambamil"`; `init="mamba"` keeps Mamba's own initialisation in the mixers).

ABMIL ("abmil", Ilse et al., 2018, as MambaMIL's `att_mil`): fc -> ReLU -> Dropout, attention pooling
Linear -> Tanh -> Linear, classifier; PyTorch's default initialisation. "abmil-gated" is CLAM's gated
variant (tanh branch * sigmoid branch -> Linear(., 1)). Neither has Mamba layers.

Every model is registered with timm under the name in `MIL_MODELS` (`timm.create_model("mambamil_lb",
in_dim=1024, num_classes=2)`), with timm's model API (`forward_features`, `forward_head`,
`forward_intermediates`, `features_only`, `reset_classifier`, ...). `model.config` holds the
constructor arguments and `create_mil_model(**model.config)` rebuilds the model from a checkpoint's copy.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from ..nn import Mamba, SRMamba
from ..nn.mixer import at_least_fp32
from ..ops import resolve_window, selective_scan_fn

__all__ = ["MIL_MODELS", "MIXERS", "MODEL_NAMES", "MIL_INITS", "MambaMIL", "ABMIL", "GatedABMIL", "create_mil_model"]

#: the MambaMIL mixers: name -> (mixer class, its arguments)
_MIXERS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "lb": (Mamba, dict(scan="lb")),
    "mamba": (Mamba, dict(scan="forward")),
    "bimamba": (Mamba, dict(scan="bi", if_divide_out=False)),  # MambaMIL's BiMamba sums the two directions (no "/2")
    "srmamba": (SRMamba, dict(scan="forward")),
    "lb-srmamba": (SRMamba, dict(scan="lb")),
}
MIXERS = tuple(_MIXERS)
#: every MIL model: short name (as `lbmamba mil train --model` takes it) -> timm model name
MIL_MODELS = {**{mixer: "mambamil_" + mixer.replace("-", "_") for mixer in MIXERS}, "abmil": "abmil",
              "abmil-gated": "abmil_gated"}
#: how MambaMIL initialises (see MambaMIL's `init`)
MIL_INITS = ("mambamil", "mamba")
MODEL_NAMES = tuple(MIL_MODELS)


def _make_mixer(mixer: str, d_model: int, d_state: int, d_conv: int, expand: int, rate: int, window,
                ssm_cfg: Optional[Mapping[str, Any]]) -> nn.Module:
    cls, kwargs = _MIXERS[mixer]
    if kwargs["scan"] == "lb":
        kwargs = dict(kwargs, window=window)
    if cls is SRMamba:
        kwargs = dict(kwargs, rate=rate)
    return cls(d_model, d_state=d_state, d_conv=d_conv, expand=expand, **kwargs, **dict(ssm_cfg or {}))


def _constructor_args(cls: type, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The arguments of `cls.__init__`, taken from `values` (its locals())."""
    return {name: values[name] for name in inspect.signature(cls.__init__).parameters if name != "self"}


def _as_bag(x: torch.Tensor, in_dim: int, name: str) -> torch.Tensor:
    """(n, d) or (B, n, d) -> (B, n, d), with clear errors."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor bag, got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"{name} expects a bag of shape (n_instances, {in_dim}) or (1, n_instances, {in_dim}), "
                         f"got {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(f"{name} was built for {in_dim}-d instance features, got a bag of {x.shape[-1]}-d features "
                         f"{tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} got an empty bag (0 instances)")
    return x


def _classifier(embed_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()


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
    """The timm-style API the MIL models share. A subclass builds `fc`, `layers` (instance-embedding
    layers, possibly none), `norm`, the pooling (`attention_scores`) and `classifier`, and records its
    constructor arguments in `_config` (with "model", its short name)."""

    in_dim: int
    num_classes: int
    embed_dim: int
    grad_checkpointing: bool = False
    #: positions per scan call (None: the whole bag in one call); see set_scan_chunk
    scan_chunk: Optional[int] = None

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments (plain types only): `create_mil_model(**model.config)` rebuilds the model."""
        return dict(self._config)

    @property
    def num_features(self) -> int:
        """Width of the pooled bag embedding (timm's name for what `forward_head(pre_logits=True)` gives)."""
        return self.embed_dim

    @property
    def feature_info(self) -> List[Dict[str, Any]]:
        """One entry per embedding layer (the `fc` projection when there is no other)."""
        names = [f"layers.{i}" for i in range(len(self.layers))] or ["fc"]
        return [dict(num_chs=self.embed_dim, reduction=1, module=name) for name in names]

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {name for name, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^fc", blocks=[(r"^layers\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each mixer layer in the backward (less memory for very large bags)."""
        self.grad_checkpointing = enable

    def set_scan_chunk(self, chunk: Optional[int]) -> None:
        """Run each mixer layer over the bag in chunks of about `chunk` instances (None: the whole bag at once),
        carrying the scan's state and the convolution's look-back from chunk to chunk: the same result, with
        the layer's (d_inner x instances) intermediates made for one chunk at a time instead of the whole bag
        (at inference; in training autograd keeps every chunk's, unless grad_checkpointing). Chunks hold whole
        LB windows (`chunk` is rounded down to a multiple of the window, at least one window), so the windows
        are those of one call. One-direction mixers only ("lb", "mamba"); a model without mixers ignores it."""
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"scan_chunk must be a positive int or None, got {chunk!r}")
        mixer = getattr(self, "mixer", None)
        if chunk is not None and mixer is not None and mixer not in _CHUNKABLE:
            raise ValueError(f"scan_chunk needs a one-direction mixer {_CHUNKABLE}: the {mixer!r} mixer's second "
                             "branch runs over the bag in another order")
        self.scan_chunk = chunk

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._config["num_classes"] = num_classes
        self.classifier = _classifier(self.embed_dim, num_classes)

    def _projection_only(self, name: str, cls: type, args: Mapping[str, Any]) -> None:
        """The parts of an attention-MIL model without mixers: `fc` (Linear, activation, dropout), no layers, no
        final norm; `args` are the constructor's locals()."""
        _check_common(args["in_dim"], args["act"])
        self._config = dict(model=name, **_constructor_args(cls, args))
        self.in_dim, self.num_classes, self.embed_dim = args["in_dim"], args["num_classes"], args["embed_dim"]
        self.fc = nn.Sequential(nn.Linear(self.in_dim, self.embed_dim),
                                nn.ReLU() if args["act"] == "relu" else nn.GELU(), nn.Dropout(args["drop_rate"]))
        self.layers = nn.ModuleList()
        self.norm = nn.Identity()

    def _layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        chunk = self.scan_chunk
        run = layer if chunk is None or chunk >= h.shape[1] else lambda x: layer_in_chunks(layer, x, chunk)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return h + grad_checkpoint(run, h, use_reentrant=False)
        return h + run(h)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, in_dim) or (B, n, in_dim) -> instance embeddings (B, n, embed_dim) after the final norm."""
        x = _as_bag(x, self.in_dim, type(self).__name__)
        h = self.fc(x.to(self.fc[0].weight.dtype))
        for layer in self.layers:
            h = self._layer(layer, h)
        return self.norm(h)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Instance embeddings (B, n, embed_dim) after each embedding layer (see `feature_info`), with the
        final norm when `norm`; otherwise as timm's ViT (indices: last n if int, all if None)."""
        if output_fmt != "NLC":
            raise ValueError(f"MIL models give (batch, instances, channels) features: output_fmt must be 'NLC', "
                             f"got {output_fmt!r}")
        layers = list(self.layers)
        take_indices, max_index = feature_take_indices(max(len(layers), 1), indices)
        x = _as_bag(x, self.in_dim, type(self).__name__)
        h = self.fc(x.to(self.fc[0].weight.dtype))
        intermediates = []
        if not layers:  # the projection is the only embedding layer
            intermediates.append(self.norm(h) if norm else h)
        for i, layer in enumerate(layers[: max_index + 1] if stop_early else layers):
            h = self._layer(layer, h)
            if i in take_indices:
                intermediates.append(self.norm(h) if norm else h)
        if intermediates_only:
            return intermediates
        return self.norm(h), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(max(len(self.layers), 1), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

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


#: the mixers whose layers run in chunks (set_scan_chunk): one scan, left to right
_CHUNKABLE = ("lb", "mamba")


def layer_in_chunks(layer: nn.Sequential, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """A [LayerNorm -> Mamba mixer] layer over h (B, n, embed_dim) in chunks of positions, as one call.

    The mixer's steps, chunk by chunk: LayerNorm and in_proj per position; the causal conv1d with the chunk's
    d_conv - 1 positions before it read again; x_proj, dt_proj; the scan from the previous chunk's last state
    (prev_state), with the window the whole bag would have and chunks of whole windows; out_proj.
    """
    norm, mixer = layer[0], layer[1]
    conv1d, x_proj, dt_proj, A_log, D = mixer.branch()
    seqlen = h.shape[1]
    window = resolve_window(mixer.window, seqlen)  # as one call over the bag
    chunk = max(window, chunk - chunk % window)
    look_back = mixer.d_conv - 1
    A = -torch.exp(at_least_fp32(A_log))
    outs, state = [], None
    for start in range(0, seqlen, chunk):
        end = min(start + chunk, seqlen)
        first = max(0, start - look_back)
        x, z = mixer.project_in(norm(h[:, first:end])).chunk(2, dim=1)
        x = F.conv1d(x, conv1d.weight, conv1d.bias, padding=look_back, groups=mixer.d_inner)[..., :end - first]
        x, z = F.silu(x[..., start - first:]), z[..., start - first:]
        dt, B, C = torch.split(F.linear(x.transpose(1, 2), x_proj.weight), [mixer.dt_rank, mixer.d_state,
                                                                             mixer.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
        y, state = selective_scan_fn(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), at_least_fp32(D), z,
                                     at_least_fp32(dt_proj.bias), True, True, state, window=window)
        outs.append(mixer.out_proj(y.transpose(1, 2)))
    return torch.cat(outs, dim=1)


def _check_common(in_dim: Any, act: str) -> None:
    if not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be a positive int, got {in_dim!r}")
    if act not in ("gelu", "relu"):
        raise ValueError(f"act must be 'gelu' or 'relu', got {act!r}")


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
        rate: SRMamba's stride ("srmamba", "lb-srmamba"; MambaMIL's scripts: 5).
        window: the LB window ("lb", "lb-srmamba"): a positive int or "auto".
        attn_dim: hidden size of the attention pooling (128).
        ssm_cfg: further `lbmamba.nn.Mamba` kwargs (dt_rank, dt_min, ...).
        init: "mambamil" (MambaMIL's: xavier-normal weights and zero biases for every Linear layer, the
            mixers' in_proj / x_proj / dt_proj / out_proj included, so every step size starts at
            softplus(0)) or "mamba" (the mixers keep Mamba's own initialisation, step sizes log-uniform
            in [dt_min, dt_max], as LBVim / Vim do).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        mixer: str = "lb",
        depth: int = 2,
        embed_dim: int = 512,
        drop_rate: float = 0.0,
        act: str = "gelu",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        rate: int = 5,
        window: Union[int, str] = "auto",
        attn_dim: int = 128,
        ssm_cfg: Optional[Dict[str, Any]] = None,
        init: str = "mambamil",
    ):
        super().__init__()
        if mixer not in _MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        _check_common(in_dim, act)
        if init not in MIL_INITS:
            raise ValueError(f"init must be one of {MIL_INITS}, got {init!r}")
        self._config = dict(model=mixer, **_constructor_args(MambaMIL, locals()))
        del self._config["mixer"]
        self._config["ssm_cfg"] = dict(ssm_cfg or {})
        self.in_dim, self.num_classes, self.embed_dim, self.mixer = in_dim, num_classes, embed_dim, mixer

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
        self.classifier = _classifier(embed_dim, num_classes)
        if init == "mambamil":
            _xavier_linear_init(self)
        else:  # the mixers keep Mamba's own initialisation; xavier for the rest
            for part in (self.fc, self.norm, self.attention, self.classifier, *(layer[0] for layer in self.layers)):
                _xavier_linear_init(part)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention(h).squeeze(-1)


class ABMIL(_MILBase):
    """Attention MIL (Ilse et al., 2018) as MambaMIL's `att_mil` baseline: fc -> ReLU (-> Dropout), attention
    pooling Linear -> Tanh -> Linear with softmax over the instances, a linear classifier; PyTorch's default
    initialisation.

    Args:
        in_dim, num_classes, embed_dim, drop_rate, attn_dim, act: as MambaMIL (act ReLU; dropout after the
            first layer only, none when 0).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        drop_rate: float = 0.0,
        attn_dim: int = 128,
        act: str = "relu",
    ):
        super().__init__()
        self._projection_only("abmil", ABMIL, locals())
        self.attention = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1))
        self.classifier = _classifier(embed_dim, num_classes)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention(h).squeeze(-1)


class GatedABMIL(_MILBase):
    """Gated-attention MIL (Ilse et al., 2018, as in CLAM's Attn_Net_Gated), no Mamba layers: the tanh branch
    times a sigmoid branch gives the attention; xavier-normal Linear weights, zero biases (CLAM's init).

    Args:
        in_dim, num_classes, embed_dim, drop_rate, attn_dim, act: as MambaMIL (act is ReLU, as CLAM; dropout
            after the first layer and in both attention branches).
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
        self._projection_only("abmil-gated", GatedABMIL, locals())
        self.attention_a = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Tanh(), nn.Dropout(drop_rate))
        self.attention_b = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.Sigmoid(), nn.Dropout(drop_rate))
        self.attention_c = nn.Linear(attn_dim, 1)
        self.classifier = _classifier(embed_dim, num_classes)
        _xavier_linear_init(self)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


_ATTENTION_MIL = {"abmil": ABMIL, "abmil-gated": GatedABMIL}


def _model_class(model: str) -> type:
    if model not in MIL_MODELS:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {model!r}")
    return _ATTENTION_MIL.get(model, MambaMIL)


def create_mil_model(model: str = "lb", **config) -> _MILBase:
    """A MIL model by short name (one of MODEL_NAMES). Options the chosen model does not take are ignored
    when another MIL model takes them (depth, rate, window... for the attention-MIL ones); others raise
    TypeError."""
    cls = _model_class(model)
    known = {name for c in (MambaMIL, ABMIL, GatedABMIL) for name in inspect.signature(c.__init__).parameters}
    known -= {"self", "mixer"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise TypeError(f"unknown MIL model options {unknown}; expected some of {sorted(known)}")
    takes = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in takes}
    return cls(mixer=model, **kwargs) if cls is MambaMIL else cls(**kwargs)


# ---------------------------------------------------------------------- timm registration
def _cfg(**kwargs) -> Dict[str, Any]:
    return {"url": "", "num_classes": 2, "first_conv": "fc.0", "classifier": "classifier", "license": "apache-2.0",
            **kwargs}


_PAPERS = {
    "lb": dict(paper_ids="arXiv:2506.15976", paper_name="LBMamba: Locally Bi-directional Mamba"),
    "mambamil": dict(paper_ids="arXiv:2403.06800", paper_name="MambaMIL"),
    "abmil": dict(paper_ids="arXiv:1802.04712", paper_name="Attention-based Deep Multiple Instance Learning"),
}
_DOCS = {
    "lb": "MambaMIL with one LB scan per layer (LB-MambaMIL; 2 layers, width 512).",
    "lb-srmamba": "MambaMIL-SRMamba with LB scans in both scans.",
    "mamba": "MambaMIL with the plain (forward) Mamba mixer.",
    "bimamba": "MambaMIL with the bidirectional (Vim v2) mixer.",
    "srmamba": "MambaMIL with the sequence-reordering mixer (SRMamba, rate 5).",
    "abmil": "Attention MIL baseline (MambaMIL's att_mil; no Mamba layers).",
    "abmil-gated": "Gated-attention MIL baseline (CLAM's; no Mamba layers).",
}


def _paper(model: str) -> Dict[str, str]:
    return _PAPERS["abmil" if model.startswith("abmil") else "lb" if model.startswith("lb") else "mambamil"]


default_cfgs = generate_default_cfgs({name: _cfg(**_paper(model)) for model, name in MIL_MODELS.items()})


def _register(model: str, variant: str) -> None:
    """Register the timm entry point `variant` for the MIL model `model`."""
    cls = _model_class(model)
    fixed = {"mixer": model} if cls is MambaMIL else {}

    def entrypoint(pretrained: bool = False, **kwargs) -> _MILBase:
        out_indices = kwargs.pop("out_indices", None)  # every embedding layer
        return build_model_with_cfg(cls, variant, pretrained, kwargs_filter=("in_chans", "img_size", "global_pool"),
                                    feature_cfg=dict(feature_cls="getter", out_indices=out_indices, output_fmt="NLC"),
                                    **dict(fixed, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__doc__ = _DOCS[model]
    globals()[variant] = register_model(entrypoint)  # timm lists it in this module's __all__: it must exist here


for _model, _variant in MIL_MODELS.items():
    _register(_model, _variant)
