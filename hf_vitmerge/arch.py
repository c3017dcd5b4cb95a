"""The one place that knows the structure of a Hugging Face ViT.

Everything else in hf_vitmerge speaks in *canonical keys* — the checkpoint keys that
``save_pretrained`` writes (``vit.encoder.layer.3.attention.attention.query.weight``),
which are stable across transformers releases — and in *roles* (``q.weight`` of block 3).
This module maps both to live modules, whatever in-memory layout the installed
transformers uses:

* transformers 4.x: ``vit.encoder.layer.N.attention.attention.query`` (same as the checkpoint),
* transformers 5.x: ``vit.layers.N.attention.q_proj`` (renamed in memory, not on disk).

It also defines the merge groups used by alignment methods (ZipIt!, MuDSC, permutation):
one residual stream through the whole network and, per block, a QK, a VO and an MLP group,
each as the list of (canonical key, axis) pairs that one transform touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError

# role -> (4.x module path relative to a block, 5.x module path relative to a block)
_BLOCK_MODULES: dict[str, tuple[str, str]] = {
    "ln1": ("layernorm_before", "layernorm_before"),
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
    "o": ("attention.output.dense", "attention.o_proj"),
    "ln2": ("layernorm_after", "layernorm_after"),
    "fc1": ("intermediate.dense", "mlp.fc1"),
    "fc2": ("output.dense", "mlp.fc2"),
}
# Block modules in checkpoint order; the checkpoint (canonical) path is always the 4.x one.
BLOCK_ROLES: tuple[str, ...] = tuple(_BLOCK_MODULES)
_BLOCK_CONTAINERS = ("encoder.layer", "layers")  # 4.x, 5.x (relative to the ViTModel)

# Which kind each role belongs to; used by per-group recipes, diagnostics and gated merging.
KINDS = ("embeddings", "attention", "mlp", "norm", "head")
_ROLE_KIND = {
    "patch": "embeddings",
    "cls": "embeddings",
    "pos": "embeddings",
    "mask": "embeddings",
    "ln1": "norm",
    "ln2": "norm",
    "final_ln": "norm",
    "q": "attention",
    "k": "attention",
    "v": "attention",
    "o": "attention",
    "fc1": "mlp",
    "fc2": "mlp",
    "classifier": "head",
    "pooler": "head",
}


# Roles whose ``weight`` is the 2-D matrix of a linear layer: the "task matrices" that
# spectral methods (TSV-M, Iso-C, WUDI) decompose. The classifier is left out on purpose: it
# is a per-task head, merged (when labels are shared) like any other non-matrix parameter.
LINEAR_ROLES = frozenset({"q", "k", "v", "o", "fc1", "fc2", "pooler"})


class IncompatibleModelError(InputError):
    """Raised when a model is not a ViT this library can merge, or models do not match."""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a ViT, in canonical terms."""

    key: str  # canonical (checkpoint) key
    role: str  # e.g. "q", "fc1", "cls", "classifier"
    attr: str  # "weight", "bias", or "" for bare parameters (cls token, position embeddings)
    layer: int | None  # block index, None outside blocks
    kind: str  # one of KINDS
    shape: tuple[int, ...]

    @property
    def is_linear_weight(self) -> bool:
        """The ``[out, in]`` weight of one of the transformer's linear layers (see ``LINEAR_ROLES``)."""
        return self.attr == "weight" and self.role in LINEAR_ROLES


@dataclass(frozen=True)
class MergeGroup:
    """A set of features that one merge/unmerge transform acts on.

    ``outputs`` are the (key, axis) pairs whose axis indexes the group's features (the
    merge matrix M is applied there); ``inputs`` are the pairs that consume those features
    (the unmerge matrix U is applied there).
    """

    name: str  # "residual", "qk.3", "vo.3", "mlp.3"
    kind: str  # "residual" | "qk" | "vo" | "mlp"
    size: int
    layer: int | None
    num_heads: int | None  # for qk / vo: features are grouped into heads of equal size
    outputs: tuple[tuple[str, int], ...]
    inputs: tuple[tuple[str, int], ...]

    @property
    def head_dim(self) -> int | None:
        return self.size // self.num_heads if self.num_heads else None

    def touches(self) -> tuple[tuple[str, int], ...]:
        return self.outputs + self.inputs


@dataclass(frozen=True)
class ViTSpec:
    """The architecture facts two ViTs must share to be merged."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int
    qkv_bias: bool
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_config(cls, config) -> ViTSpec:
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            image_size=_as_int(config.image_size),
            patch_size=_as_int(config.patch_size),
            num_channels=config.num_channels,
            qkv_bias=bool(getattr(config, "qkv_bias", True)),
            hidden_act=str(config.hidden_act),
            layer_norm_eps=float(config.layer_norm_eps),
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def differences(self, other: ViTSpec) -> list[str]:
        """Human-readable list of mismatching fields (layer_norm_eps is not structural)."""
        out = []
        for name in self.__dataclass_fields__:
            if name == "layer_norm_eps":
                continue
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: {a} vs {b}")
        return out


def _as_int(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise IncompatibleModelError(f"non-square image/patch size {value} is not supported")
        return int(value[0])
    return int(value)


@dataclass
class ViTAdapter:
    """Canonical view of a ViT: parameters, kinds, merge groups, module access.

    Build it from a config (``ViTAdapter.from_config``) or a model
    (``ViTAdapter.from_model``). ``prefix`` is ``"vit."`` for
    ``ViTForImageClassification`` and ``""`` for a bare ``ViTModel``.
    """

    spec: ViTSpec
    prefix: str = "vit."
    num_labels: int | None = None  # None: no classifier (bare backbone)
    has_mask_token: bool = False
    has_pooler: bool = False
    params: list[ParamInfo] = field(init=False)

    def __post_init__(self) -> None:
        self.params = list(self._enumerate())
        self._by_key = {p.key: p for p in self.params}

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config, *, with_classifier: bool = True, has_pooler: bool = False) -> ViTAdapter:
        if getattr(config, "model_type", None) != "vit":
            raise IncompatibleModelError(
                f"expected a ViT config (model_type 'vit'), got model_type {getattr(config, 'model_type', None)!r}"
            )
        return cls(
            spec=ViTSpec.from_config(config),
            prefix="vit." if with_classifier else "",
            num_labels=config.num_labels if with_classifier else None,
            has_pooler=has_pooler,
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTAdapter:
        """Adapter for a ``ViTForImageClassification``, a ``ViTModel``, or a hf_vitmerge model
        that wraps a ViT backbone under ``.vit``."""
        from transformers import ViTConfig

        config = getattr(model, "config", None)
        if not isinstance(config, ViTConfig):
            raise IncompatibleModelError(
                f"{type(model).__name__} is not a ViT model (config.model_type must be 'vit')"
            )
        has_vit = isinstance(getattr(model, "vit", None), nn.Module)
        has_classifier = has_vit and isinstance(getattr(model, "classifier", None), nn.Linear)
        backbone = model.vit if has_vit else model
        adapter = cls(
            spec=ViTSpec.from_config(config),
            prefix="vit." if has_vit else "",
            num_labels=model.classifier.out_features if has_classifier else None,
            has_mask_token=getattr(backbone.embeddings, "mask_token", None) is not None,
            has_pooler=getattr(backbone, "pooler", None) is not None,
        )
        return adapter

    # ---------------------------------------------------------------- keys and roles
    def key(self, role: str, attr: str = "weight", layer: int | None = None) -> str:
        """Canonical key of a role, e.g. ``key("q", "weight", 3)``."""
        p = self.prefix
        if role in _BLOCK_MODULES:
            if layer is None:
                raise ValueError(f"role {role!r} needs a layer index")
            return f"{p}encoder.layer.{layer}.{_BLOCK_MODULES[role][0]}.{attr}"
        top = {
            "patch": f"{p}embeddings.patch_embeddings.projection.{attr}",
            "cls": f"{p}embeddings.cls_token",
            "pos": f"{p}embeddings.position_embeddings",
            "mask": f"{p}embeddings.mask_token",
            "final_ln": f"{p}layernorm.{attr}",
            "pooler": f"{p}pooler.dense.{attr}",
            "classifier": f"classifier.{attr}",
        }
        if role not in top:
            raise KeyError(f"unknown ViT role {role!r}")
        return top[role]

    def info(self, key: str) -> ParamInfo:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"{key!r} is not a parameter of this ViT") from None

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def keys_of_kind(self, *kinds: str) -> list[str]:
        return [p.key for p in self.params if p.kind in kinds]

    def block_keys(self, layer: int, kind: str) -> list[str]:
        """All keys of block ``layer`` of one kind (``attention`` or ``mlp``, ``norm``)."""
        return [p.key for p in self.params if p.layer == layer and p.kind == kind]

    @property
    def classifier_keys(self) -> list[str]:
        return self.keys_of_kind("head")

    @property
    def backbone_keys(self) -> list[str]:
        return [p.key for p in self.params if p.kind != "head"]

    def _enumerate(self) -> Iterable[ParamInfo]:
        s = self.spec
        d, ff = s.hidden_size, s.intermediate_size

        def mk(role, attr, shape, layer=None):
            return ParamInfo(self.key(role, attr, layer), role, attr, layer, _ROLE_KIND[role], shape)

        yield mk("cls", "", (1, 1, d))
        if self.has_mask_token:
            yield mk("mask", "", (1, 1, d))
        yield mk("pos", "", (1, s.num_patches + 1, d))
        yield mk("patch", "weight", (d, s.num_channels, s.patch_size, s.patch_size))
        yield mk("patch", "bias", (d,))
        for i in range(s.num_layers):
            for role in BLOCK_ROLES:
                if role in ("ln1", "ln2"):
                    yield mk(role, "weight", (d,), i)
                    yield mk(role, "bias", (d,), i)
                    continue
                out_f, in_f = {"fc1": (ff, d), "fc2": (d, ff)}.get(role, (d, d))
                yield mk(role, "weight", (out_f, in_f), i)
                if role == "o" or role.startswith("fc") or s.qkv_bias:
                    yield mk(role, "bias", (out_f,), i)
        yield mk("final_ln", "weight", (d,))
        yield mk("final_ln", "bias", (d,))
        if self.has_pooler:
            yield mk("pooler", "weight", (s.hidden_size, d))
            yield mk("pooler", "bias", (s.hidden_size,))
        if self.num_labels is not None:
            yield mk("classifier", "weight", (self.num_labels, d))
            yield mk("classifier", "bias", (self.num_labels,))

    # ---------------------------------------------------------------- merge groups
    def groups(self) -> list[MergeGroup]:
        """Residual stream first, then QK, VO, MLP of every block (in block order)."""
        s = self.spec
        has = self._by_key.__contains__
        res_out: list[tuple[str, int]] = [(self.key("cls", ""), 2), (self.key("pos", ""), 2)]
        if self.has_mask_token:
            res_out.append((self.key("mask", ""), 2))
        res_out += [(self.key("patch", "weight"), 0), (self.key("patch", "bias"), 0)]
        res_in: list[tuple[str, int]] = []
        blocks: list[MergeGroup] = []
        for i in range(s.num_layers):
            k = lambda role, attr="weight", i=i: self.key(role, attr, i)  # noqa: E731
            for ln in ("ln1", "ln2"):
                res_out += [(k(ln), 0), (k(ln, "bias"), 0)]
            res_out += [(k("o"), 0), (k("o", "bias"), 0), (k("fc2"), 0), (k("fc2", "bias"), 0)]
            res_in += [(k("q"), 1), (k("k"), 1), (k("v"), 1), (k("fc1"), 1)]
            qk_out = [(k("q"), 0), (k("k"), 0)]
            qk_out += [(b, 0) for b in (k("q", "bias"), k("k", "bias")) if has(b)]
            vo_out = [(k("v"), 0)] + [(b, 0) for b in (k("v", "bias"),) if has(b)]
            blocks += [
                MergeGroup(f"qk.{i}", "qk", s.hidden_size, i, s.num_heads, tuple(qk_out), ()),
                MergeGroup(f"vo.{i}", "vo", s.hidden_size, i, s.num_heads, tuple(vo_out), ((k("o"), 1),)),
                MergeGroup(
                    f"mlp.{i}",
                    "mlp",
                    s.intermediate_size,
                    i,
                    None,
                    ((k("fc1"), 0), (k("fc1", "bias"), 0)),
                    ((k("fc2"), 1),),
                ),
            ]
        res_out += [(self.key("final_ln", "weight"), 0), (self.key("final_ln", "bias"), 0)]
        if self.has_pooler:
            res_in.append((self.key("pooler", "weight"), 1))
        if self.num_labels is not None:
            res_in.append((self.key("classifier", "weight"), 1))
        residual = MergeGroup(
            "residual", "residual", s.hidden_size, None, None, tuple(res_out), tuple(res_in)
        )
        return [residual, *blocks]

    # ---------------------------------------------------------------- live modules
    def backbone(self, model: nn.Module) -> nn.Module:
        return model.vit if self.prefix else model

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self._blocks(model)[layer]

    def _blocks(self, model: nn.Module) -> nn.ModuleList:
        vit = self.backbone(model)
        for path in _BLOCK_CONTAINERS:
            mod = _get_path(vit, path)
            if isinstance(mod, nn.ModuleList):
                return mod
        raise IncompatibleModelError(
            f"cannot find the transformer blocks of {type(model).__name__}: "
            f"expected one of {_BLOCK_CONTAINERS} under the ViT backbone"
        )

    def module(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Module:
        """The live module of a role (``q``, ``fc2``, ``ln1``, ``final_ln``, ``patch``, ``classifier``)."""
        if role in _BLOCK_MODULES:
            blk = self.block(model, layer)
            for path in _BLOCK_MODULES[role]:
                mod = _get_path(blk, path)
                if isinstance(mod, nn.Module):
                    return mod
            raise IncompatibleModelError(f"block {layer} has no module for role {role!r}")
        vit = self.backbone(model)
        if role == "patch":
            return vit.embeddings.patch_embeddings.projection
        if role == "final_ln":
            return vit.layernorm
        if role == "classifier":
            return model.classifier
        if role == "pooler":
            return vit.pooler.dense
        raise KeyError(f"role {role!r} has no module")

    def parameter(self, model: nn.Module, key: str) -> torch.Tensor:
        """The live parameter behind a canonical key."""
        p = self.info(key)
        if p.role in ("cls", "pos", "mask"):
            emb = self.backbone(model).embeddings
            return {"cls": emb.cls_token, "pos": emb.position_embeddings, "mask": emb.mask_token}[p.role]
        return getattr(self.module(model, p.role, p.layer), p.attr)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Canonical state dict (detached views of the live parameters)."""
        return {k: self.parameter(model, k).detach() for k in self.keys}

    @torch.no_grad()
    def load_state_dict(
        self, model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True
    ) -> None:
        """Copy canonical tensors into the live model (shapes must match)."""
        if strict:
            missing = [k for k in self.keys if k not in tensors]
            extra = [k for k in tensors if k not in self._by_key]
            if missing or extra:
                raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in tensors.items():
            if key not in self._by_key:
                continue
            param = self.parameter(model, key)
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(param.shape)}"
                )
            param.copy_(value.to(param.dtype))

    # ---------------------------------------------------------------- checkpoints
    def canonical_key(self, checkpoint_key: str) -> str | None:
        """Map a key found in a checkpoint file (either layout) to the canonical key."""
        if checkpoint_key in self._by_key:
            return checkpoint_key
        p = self.prefix
        for container in _BLOCK_CONTAINERS[1:]:
            head = f"{p}{container}."
            if not checkpoint_key.startswith(head):
                continue
            rest = checkpoint_key[len(head) :]
            idx, _, tail = rest.partition(".")
            for role, (_old, new) in _BLOCK_MODULES.items():
                if tail.startswith(new + "."):
                    attr = tail[len(new) + 1 :]
                    return self.key(role, attr, int(idx))
        return None


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def check_compatible(adapters: Mapping[str, ViTAdapter]) -> None:
    """Raise ``IncompatibleModelError`` naming the models and fields that differ."""
    names = list(adapters)
    ref_name, ref = names[0], adapters[names[0]]
    problems = []
    for name in names[1:]:
        diff = ref.spec.differences(adapters[name].spec)
        if diff:
            # differences() lists this model's value first: name the models in the same order
            problems.append(f"{ref_name!r} vs {name!r}: " + ", ".join(diff))
    if problems:
        raise IncompatibleModelError(
            "these models cannot be merged because their architectures differ:\n  "
            + "\n  ".join(problems)
            + "\nMerge only ViTs with the same hidden size, depth, heads, MLP size, image/patch size, "
            "channels, qkv bias and activation."
        )
