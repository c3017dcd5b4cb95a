"""Streaming activation statistics for alignment merging (ZipIt!, MuDSC, permutation) and RegMean.

Statistics are float64 running sums — ``count``, ``sum`` of features and ``outer`` (sum of
``f f^T``) — so no activation is kept beyond a few batches (at most :data:`GATHER_BYTES` of
rows per point, gathered for fewer and larger products), batches can be sharded over
processes (the sums are all-reduced) and results can be cached on disk. Each batch's product
``F^T F`` is computed in float32 (a GEMM over at most :data:`PRODUCT_ROWS` rows) and added to
the float64 total, on CPU and CUDA alike (TF32 off): the relative error against an all-float64
path is ~1e-7 (tested <= 1e-6) at a fraction of the cost.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ViTAdapter
from .data import TaskData

_CACHE_VERSION = 1
_TINY_STD = 1e-12
#: dtype of the per-batch products ``F^T F`` (totals are always float64). float32 halves the cost;
#: set to ``torch.float64`` for the exact reference path (used by tests and benchmarks).
PRODUCT_DTYPE = torch.float32
#: rows per float32 product before it is added to the float64 total (bounds the float32 error)
PRODUCT_ROWS = 8192
#: CPU products by BLAS ``ssyrk`` (lower triangle, half the FLOPs) instead of ``torch.mm``
CPU_SYRK = True
#: joint feature rows of one point gathered over batches (up to this many bytes, and at most
#: :data:`PRODUCT_ROWS` rows) before their product is taken: fewer, larger products
GATHER_BYTES = 4 << 20
# point kind -> (module role, hook type, parts per model); "out" hooks read the module output
_KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "qk": (("q", "out"), ("k", "out")),
    "k_out": (("k", "out"),),
    "vo": (("o", "in"),),
    "mlp": (("fc2", "in"),),
    "attn_in": (("q", "in"),),
    "fc1_in": (("fc1", "in"),),
}
_GLOBAL_POINTS = ("residual", "residual_tokens", "classifier_in")
POINT_KINDS = ("residual", "residual_tokens", *_KINDS)


@dataclass
class FeatureStats:
    """Streaming float64 first and second moments of ``D`` features (no activations kept)."""

    count: int
    sum: torch.Tensor  # [D] float64
    outer: torch.Tensor  # [D, D] float64, sum of f f^T

    @classmethod
    def zeros(cls, dim: int, device: str | torch.device = "cpu") -> FeatureStats:
        return cls(
            0,
            torch.zeros(dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dim, dtype=torch.float64, device=device),
        )

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, features: torch.Tensor) -> None:
        """Add a ``[n, D]`` block of feature vectors: the sum in float64, the product ``F^T F`` in
        :data:`PRODUCT_DTYPE` (float32) added to the float64 total."""
        f = features.reshape(-1, self.dim)
        self.count += f.shape[0]
        self.sum.add_(f.sum(0, dtype=torch.float64))
        accumulate_outer_(self.outer, f, lower_only=False)

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("these statistics hold no samples (count is 0)")

    def mean(self) -> torch.Tensor:
        self._require_samples()
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """``E[f f^T] - E[f] E[f]^T`` (population covariance, float64, exactly symmetric)."""
        mu = self.mean()
        cov = self.outer / self.count - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    def std(self) -> torch.Tensor:
        return self.covariance().diagonal().clamp_min(0).sqrt()

    def valid(self) -> torch.Tensor:
        """``[D]`` bool: features whose standard deviation is above a tiny threshold."""
        std = self.std()
        scale = std.max() if std.numel() else std.new_tensor(0.0)
        return std > max(_TINY_STD, 1e-9 * float(scale))

    def correlation(self) -> torch.Tensor:
        """Pearson correlation; a zero-variance feature has correlation 0 with every other
        feature (not a division by eps) and 1 with itself."""
        cov = self.covariance()
        std = cov.diagonal().clamp_min(0).sqrt()
        ok = self.valid()
        inv = torch.where(ok, 1.0 / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(std))
        corr = (cov * inv[:, None] * inv[None, :]).clamp_(-1.0, 1.0)
        corr.diagonal().fill_(1.0)
        return corr

    def gram(self, normalize: bool = True) -> torch.Tensor:
        """``sum f f^T``, divided by ``count`` when ``normalize`` (RegMean's input Gram)."""
        if normalize:
            self._require_samples()
            return self.outer / self.count
        return self.outer.clone()

    def block(self, index: int, num_models: int) -> FeatureStats:
        """The statistics of model ``index`` alone, out of joint statistics of ``num_models``."""
        if self.dim % num_models:
            raise ValueError(f"{self.dim} features cannot be split into {num_models} models")
        d = self.dim // num_models
        sl = slice(index * d, (index + 1) * d)
        return FeatureStats(self.count, self.sum[sl].clone(), self.outer[sl, sl].clone())

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if not isinstance(other, FeatureStats):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot add statistics of {self.dim} and {other.dim} features")
        return FeatureStats(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    def to(self, device: str | torch.device) -> FeatureStats:
        return FeatureStats(self.count, self.sum.to(device), self.outer.to(device))


# ------------------------------------------------------------------------------------ points
def statistics_points(
    adapter: ViTAdapter, kinds: Sequence[str] = ("residual", "qk", "vo", "mlp")
) -> list[str]:
    """Point names for ``kinds``: global points first, then per block in block order."""
    bad = [k for k in kinds if k not in POINT_KINDS and k != "classifier_in"]
    if bad:
        raise ValueError(f"unknown statistics point kind(s) {bad}; valid kinds: {', '.join(POINT_KINDS)}")
    out = [k for k in kinds if k in _GLOBAL_POINTS]
    for i in range(adapter.spec.num_layers):
        out += [f"{k}.{i}" for k in kinds if k in _KINDS]
    return out


def _parse_point(point: str, adapter: ViTAdapter) -> tuple[str, int | None, int]:
    """(kind, layer, feature size of one model)."""
    s = adapter.spec
    if point in ("residual", "classifier_in", "residual_tokens"):
        return point, None, s.hidden_size
    kind, _, idx = point.partition(".")
    if kind not in _KINDS or not idx.isdigit():
        raise ValueError(
            f"unknown statistics point {point!r}; use residual, residual_tokens, classifier_in or "
            f"<kind>.<block> with kind in {', '.join(_KINDS)}"
        )
    layer = int(idx)
    if layer >= s.num_layers:
        raise ValueError(f"point {point!r}: the model has only {s.num_layers} blocks")
    return kind, layer, s.intermediate_size if kind == "mlp" else s.hidden_size


def _product_dtype(f: torch.Tensor) -> torch.dtype:
    return torch.float64 if f.dtype == torch.float64 else PRODUCT_DTYPE


def accumulate_outer_(
    outer: torch.Tensor, f: torch.Tensor, *, lower_only: bool = False, scratch: dict | None = None
) -> bool:
    """``outer += f^T f``: ``outer`` is float64; each product over at most :data:`PRODUCT_ROWS` rows
    of ``f`` is computed in float32 (float64 when ``f`` is float64 or :data:`PRODUCT_DTYPE` says so)
    and added to it. ``scratch`` caches the float32 product buffer between calls (keyed by size).

    On CPU with ``lower_only`` (and :data:`CPU_SYRK`), a BLAS ``?syrk`` fills only the lower
    triangle of the row-major ``outer`` and True is returned: the caller mirrors it once at the end
    (:func:`symmetrize_lower_`). Keep the BLAS to torch's thread count (:func:`_blas_threads`):
    measured on this project's shared 2-core machine, OpenBLAS threads left spinning made a
    ``[544, 256]`` ``ssyrk`` take 20 ms instead of 0.3 ms (``torch.mm``: 0.6 ms). Otherwise the
    product is ``torch.mm`` (TF32 off on CUDA), symmetric up to rounding (:func:`symmetrize_`), and
    False is returned."""
    dtype = _product_dtype(f)
    f = f.to(dtype)
    if f.is_cuda:
        with _fp32_exact():
            _accumulate_gemm(outer, f, dtype, scratch)
        return False
    if lower_only and CPU_SYRK and outer.is_contiguous():
        _accumulate_syrk(outer, f.contiguous(), dtype, scratch)
        return True
    _accumulate_gemm(outer, f, dtype, scratch)
    return False


def _accumulate_syrk(outer: torch.Tensor, f: torch.Tensor, dtype: torch.dtype, scratch: dict | None) -> None:
    """Lower triangle of the row-major ``outer`` += ``f^T f`` by BLAS ``?syrk`` (half a GEMM's FLOPs)."""
    from scipy.linalg import blas

    if dtype == torch.float64:
        c = outer.numpy().T  # column-major view: its upper triangle is the row-major lower one
        for start in range(0, f.shape[0], PRODUCT_ROWS):
            chunk = f[start : start + PRODUCT_ROWS].numpy()
            res = blas.dsyrk(1.0, chunk.T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
            if res.ctypes.data != c.ctypes.data:
                outer.copy_(torch.from_numpy(res.T.copy()))
        return
    buf = _scratch(scratch, outer.shape[0], dtype, outer.device)
    c = buf.numpy().T
    for start in range(0, f.shape[0], PRODUCT_ROWS):
        chunk = f[start : start + PRODUCT_ROWS].numpy()
        res = blas.ssyrk(1.0, chunk.T, beta=0.0, c=c, trans=0, lower=0, overwrite_c=1)
        if res.ctypes.data != c.ctypes.data:
            buf.copy_(torch.from_numpy(res.T.copy()))
        outer.add_(buf)  # buf's strict upper triangle is never written (stays 0)


def _accumulate_cross(
    block: torch.Tensor, fi: torch.Tensor, fj: torch.Tensor, dtype: torch.dtype, scratch: dict | None
) -> None:
    """``block += fi^T fj`` (float64 ``block``; products over at most :data:`PRODUCT_ROWS` rows in
    ``dtype``)."""
    if dtype == torch.float64:
        for start in range(0, fi.shape[0], PRODUCT_ROWS):
            block.addmm_(fi[start : start + PRODUCT_ROWS].T, fj[start : start + PRODUCT_ROWS])
        return
    buf = _scratch(scratch, (fi.shape[1], fj.shape[1]), dtype, block.device)
    for start in range(0, fi.shape[0], PRODUCT_ROWS):
        torch.mm(fi[start : start + PRODUCT_ROWS].T, fj[start : start + PRODUCT_ROWS], out=buf)
        block.add_(buf)


def _accumulate_gemm(outer: torch.Tensor, f: torch.Tensor, dtype: torch.dtype, scratch: dict | None) -> None:
    if dtype == torch.float64:
        for start in range(0, f.shape[0], PRODUCT_ROWS):
            chunk = f[start : start + PRODUCT_ROWS]
            outer.addmm_(chunk.T, chunk)
        return
    buf = _scratch(scratch, outer.shape[0], dtype, outer.device)
    for start in range(0, f.shape[0], PRODUCT_ROWS):
        chunk = f[start : start + PRODUCT_ROWS]
        torch.mm(chunk.T, chunk, out=buf)
        outer.add_(buf)


def _scratch(scratch: dict | None, dim: int | tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """A zeroed ``[dim, dim]`` product buffer (square: for ``?syrk``, whose strict upper triangle
    stays zero) or a ``[rows, cols]`` one (a tuple: cross products), cached in ``scratch``."""
    key = (dim, dtype, str(device))
    if scratch is not None and key in scratch:
        return scratch[key]
    buf = torch.zeros(*((dim, dim) if isinstance(dim, int) else dim), dtype=dtype, device=device)
    if scratch is not None:
        scratch[key] = buf
    return buf


@contextlib.contextmanager
def _fp32_exact():
    """No TF32 for the float32 products on CUDA (it would cost ~1e-3 relative error)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def symmetrize_(outer: torch.Tensor) -> None:
    """Make an accumulated ``sum f f^T`` exactly symmetric (average with its transpose)."""
    outer.copy_((outer + outer.T) / 2)


def symmetrize_lower_(outer: torch.Tensor) -> None:
    """Complete a matrix of which only the lower triangle was accumulated."""
    lower = outer.tril()
    outer.copy_(lower + lower.tril(-1).T)


def _blas_threads():
    """Let the BLAS used by :func:`accumulate_outer_` use as many threads as torch does."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


class _Collector:
    """Hooks on N models; a point is accumulated when the last model has produced it."""

    def __init__(self, models, adapters, points, device):
        self.n = len(models)
        self.points = list(points)
        self.stats: dict[str, FeatureStats] = {}
        self.parts: dict[str, int] = {}
        self.buffers: dict[str, list[list[torch.Tensor]]] = {}
        self.handles = []
        self.triangular: set[str] = set()  # points whose outer holds only its lower triangle (syrk)
        self.rounded: set[str] = set()  # points to symmetrize at the end (GEMM rounding)
        self.scratch: dict = {}  # float32 product buffers, one per feature size
        self.gathered: dict[str, tuple[torch.Tensor, int]] = {}  # point -> (rows buffer, rows filled)
        for point in self.points:
            kind, layer, d = _parse_point(point, adapters[0])
            self.stats[point] = FeatureStats.zeros(self.n * d, device)
            self.buffers[point] = [[] for _ in range(self.n)]
            if kind in _GLOBAL_POINTS:
                cls_only = kind != "residual_tokens"
                for m, (model, adapter) in enumerate(zip(models, adapters, strict=True)):
                    mod = adapter.module(model, "final_ln")
                    self.handles.append(mod.register_forward_hook(self._out_hook(point, m, cls_only)))
                self.parts[point] = 1
                continue
            hooks = _KINDS[kind]
            self.parts[point] = len(hooks)
            for m, (model, adapter) in enumerate(zip(models, adapters, strict=True)):
                for role, where in hooks:
                    mod = adapter.module(model, role, layer)
                    if where == "out":
                        self.handles.append(mod.register_forward_hook(self._out_hook(point, m, False)))
                    else:
                        self.handles.append(mod.register_forward_pre_hook(self._in_hook(point, m)))

    def _out_hook(self, point: str, m: int, cls_only: bool):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            self._add(point, m, out[:, 0] if cls_only else out)

        return hook

    def _in_hook(self, point: str, m: int):
        def hook(_module, inputs):
            self._add(point, m, inputs[0])

        return hook

    def _add(self, point: str, m: int, features: torch.Tensor) -> None:
        buf = self.buffers[point]
        buf[m].append(features.detach().reshape(-1, features.shape[-1]))
        if m == self.n - 1 and len(buf[m]) == self.parts[point]:
            self._flush(point)

    def _flush(self, point: str) -> None:
        """One batch of ``point`` is complete: copy each model's rows into its gather buffer (a
        contiguous row block: a plain copy); take the products once the buffers are full."""
        parts = self.buffers[point]
        self.buffers[point] = [[] for _ in range(self.n)]
        rows = {sum(p.shape[0] for p in model_parts) for model_parts in parts}
        if len(rows) != 1:
            raise RuntimeError(f"point {point!r}: models produced different numbers of samples {rows}")
        r = rows.pop()
        first = parts[0][0]
        d = first.shape[1]
        gathered, filled = self.gathered.get(point, (None, 0))
        if gathered is not None and gathered.shape[1] < filled + r:
            self._accumulate(point, gathered[:, :filled])
            filled = 0
        if gathered is None or gathered.shape[1] < r:
            capacity = max(r, min(PRODUCT_ROWS, GATHER_BYTES // (self.n * d * 4)))
            gathered = torch.empty(self.n, capacity, d, dtype=_product_dtype(first), device=first.device)
        for m, model_parts in enumerate(parts):
            at = filled
            for p in model_parts:
                gathered[m, at : at + p.shape[0]].copy_(p)
                at += p.shape[0]
        self.gathered[point] = (gathered, filled + r)

    def _accumulate(self, point: str, gathered: torch.Tensor) -> None:
        """Add the ``[n, rows, d]`` gathered features (model m's in block m of the joint feature
        vector) to the point's float64 count, sum and outer product."""
        st = self.stats[point]
        n, rows, d = gathered.shape
        st.count += rows
        for m in range(n):
            st.sum[m * d : (m + 1) * d].add_(gathered[m].sum(0, dtype=torch.float64))
        if n == 1 or gathered.is_cuda or not CPU_SYRK:
            joint = gathered[0] if n == 1 else gathered.permute(1, 0, 2).reshape(rows, n * d)
            if accumulate_outer_(st.outer, joint, lower_only=True, scratch=self.scratch):
                self.triangular.add(point)
            else:
                self.rounded.add(point)
            return
        # CPU, several models: the lower blocks of the joint product, F_i^T F_j for j <= i, from
        # the per-model blocks in place (ssyrk on the diagonal, GEMM below it): no joint copy
        dtype = gathered.dtype
        for i in range(n):
            rows_i = slice(i * d, (i + 1) * d)
            _accumulate_syrk(st.outer[rows_i, rows_i], gathered[i], dtype, self.scratch)
            for j in range(i):
                block = st.outer[rows_i, j * d : (j + 1) * d]
                _accumulate_cross(block, gathered[i], gathered[j], dtype, self.scratch)
        self.triangular.add(point)

    def finalize(self) -> dict[str, FeatureStats]:
        """Take the products of the rows still gathered, and make the accumulated outer products
        exactly symmetric (see :func:`accumulate_outer_`)."""
        with torch.inference_mode():  # the gathered rows and product buffers were made in it
            for point, (gathered, filled) in self.gathered.items():
                if filled:
                    self._accumulate(point, gathered[:, :filled])
        self.gathered.clear()
        for point in self.triangular:
            symmetrize_lower_(self.stats[point].outer)
        for point in self.rounded - self.triangular:
            symmetrize_(self.stats[point].outer)
        self.triangular.clear()
        self.rounded.clear()
        self.scratch.clear()
        return self.stats

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------ distribution
def _dist_info(accelerator) -> tuple[int, int]:
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce(stats: dict[str, FeatureStats], accelerator, world: int) -> None:
    if world == 1:
        return
    for st in stats.values():
        count = torch.tensor([float(st.count)], dtype=torch.float64, device=st.sum.device)
        for t in (count, st.sum, st.outer):
            if accelerator is not None:
                t.copy_(accelerator.reduce(t, reduction="sum"))
            else:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        st.count = int(round(float(count.item())))


# ------------------------------------------------------------------------------------ data
def _images(data: TaskData, start: int, stop: int) -> list:
    rows = data.dataset[start:stop]
    return [img.convert("RGB") if hasattr(img, "convert") else img for img in rows[data.image_column]]


def _processor_id(processor) -> str:
    to_json = getattr(processor, "to_json_string", None)
    return to_json() if callable(to_json) else repr(processor)


def _batch_plan(data: Sequence[TaskData], batch_size: int) -> list[tuple[int, int, int]]:
    """(task, start, stop) per batch; batches do not cross tasks."""
    plan = []
    for t, d in enumerate(data):
        plan += [(t, s, min(s + batch_size, len(d))) for s in range(0, len(d), batch_size)]
    return plan


def _autocast(device: str, mixed_precision: str):
    if mixed_precision in (None, "no"):
        return contextlib.nullcontext()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    return torch.autocast(torch.device(device).type, dtype=dtypes[mixed_precision])


def _run(
    models: Sequence[nn.Module],
    data: Sequence[TaskData],
    processors: Sequence,
    plan: list[tuple[int, int, int]],
    *,
    device: str,
    mixed_precision: str,
    desc: str,
    quiet: bool,
) -> int:
    """Forward every model on every batch of ``plan`` (each with its own processor); returns images seen."""
    groups: dict[str, list[int]] = {}
    for m, proc in enumerate(processors):
        groups.setdefault(_processor_id(proc), []).append(m)
    seen = 0
    with torch.inference_mode(), _autocast(device, mixed_precision):
        for t, start, stop in tqdm(plan, desc=desc, disable=quiet, unit="batch"):
            images = _images(data[t], start, stop)
            pixels: dict[int, torch.Tensor] = {}
            for members in groups.values():
                px = processors[members[0]](images=images, return_tensors="pt")["pixel_values"].to(device)
                pixels.update(dict.fromkeys(members, px))
            for m, model in enumerate(models):
                model(pixel_values=pixels[m])
            seen += stop - start
    return seen


# ------------------------------------------------------------------------------------ cache
def model_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (used as the model identity when no cache key is given)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_cache_key(source) -> str:
    """Identity of a :class:`~hf_vitmerge.loading.ModelSource` for the statistics cache: the
    commit SHA for Hub models, else the folder and each weight file's size and mtime."""
    if getattr(source, "commit", None):
        return f"{source.ref}@{source.commit}"
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.weight_files()]
    return f"{Path(source.path).resolve()}:{files}"


def _data_fingerprint(data: TaskData) -> str:
    fp = getattr(data.dataset, "_fingerprint", None)
    return str(fp) if fp else f"{data.source}:{data.split}:{len(data)}:{data.image_column}"


def _cache_file(cache_dir, mode, cache_key, models, data, processors, points, mixed_precision) -> Path | None:
    if cache_dir is None:
        return None
    identity = cache_key if cache_key is not None else [model_fingerprint(m) for m in models]
    payload = {
        "version": _CACHE_VERSION,
        "mode": mode,
        "models": identity,
        "num_models": len(models),
        "points": list(points),
        "data": [(_data_fingerprint(d), len(d)) for d in data],
        "processors": [_processor_id(p) for p in processors],
        "mixed_precision": mixed_precision or "no",
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return Path(cache_dir) / f"stats-{mode}-{digest}.safetensors"


def save_stats(stats: dict[str, FeatureStats], path: str | os.PathLike) -> None:
    """Write statistics as float64 safetensors (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, counts = {}, {}
    for point, st in stats.items():
        tensors[f"{point}/sum"] = st.sum.detach().cpu().contiguous()
        tensors[f"{point}/outer"] = st.outer.detach().cpu().contiguous()
        counts[point] = st.count
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"counts": json.dumps(counts), "order": json.dumps(list(stats))})
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> dict[str, FeatureStats]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        counts = json.loads(meta["counts"])
        return {
            p: FeatureStats(counts[p], f.get_tensor(f"{p}/sum"), f.get_tensor(f"{p}/outer"))
            for p in json.loads(meta["order"])
        }


# ------------------------------------------------------------------------------------ public API
def _collect(
    mode: str,
    models: Sequence[nn.Module],
    data: Sequence[TaskData],
    processors: Sequence,
    points: Sequence[str],
    *,
    batch_size: int,
    device: str,
    mixed_precision: str,
    accelerator,
    cache_dir,
    cache_key: str | None,
    quiet: bool,
) -> dict[str, FeatureStats]:
    if not models:
        raise ValueError("statistics need at least one model")
    if len(processors) != len(models):
        raise ValueError(f"got {len(processors)} image processors for {len(models)} models")
    if not points:
        raise ValueError("no statistics points requested")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if len(set(points)) != len(points):
        raise ValueError(f"statistics points are repeated: {list(points)}")
    if any(len(d) == 0 for d in data) or not data:
        raise ValueError("statistics need non-empty calibration data")
    if accelerator is not None:
        device = str(accelerator.device)
    adapters = [ViTAdapter.from_model(m) for m in models]
    from .arch import check_compatible

    check_compatible({f"model {i}": a for i, a in enumerate(adapters)})
    for p in points:
        _parse_point(p, adapters[0])
    rank, world = _dist_info(accelerator)
    path = _cache_file(cache_dir, mode, cache_key, models, data, processors, points, mixed_precision)
    if path is not None and path.is_file():
        return load_stats(path)

    originals = [next(m.parameters()).device for m in models]
    training = [m.training for m in models]
    for m in models:
        m.to(device).eval()
    collector = _Collector(models, adapters, points, device)
    plan = _batch_plan(data, batch_size)[rank::world]
    try:
        with _blas_threads():
            _run(
                models,
                data,
                processors,
                plan,
                device=device,
                mixed_precision=mixed_precision,
                desc=f"statistics ({mode})",
                quiet=quiet or rank != 0,
            )
    finally:
        collector.remove()
        for m, dev, tr in zip(models, originals, training, strict=True):
            m.to(dev).train(tr)
    stats = collector.finalize()
    _all_reduce(stats, accelerator, world)
    stats = {p: st.to("cpu") for p, st in stats.items()}
    if path is not None and rank == 0:
        save_stats(stats, path)
    return stats


def collect_joint_stats(
    models: list[nn.Module],
    data: list[TaskData],
    processors: list,
    points: list[str],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    mixed_precision: str = "no",
    accelerator=None,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    quiet: bool = False,
) -> dict[str, FeatureStats]:
    """Statistics of the concatenated features of all models on the same images.

    Every model sees every image of every task in ``data`` (each preprocessed by the model's
    own processor); per point the features of the N models are concatenated (``D = N * d``,
    model order), so ``stats[p].correlation()`` holds the cross-model correlations.

    With an ``accelerate.Accelerator`` or an initialised process group, each process takes a
    strided share of the batches and the float64 sums are all-reduced, so every process ends
    with the same totals. With ``cache_dir``, results are stored keyed by ``cache_key`` (the
    models' identity; a hash of their weights when None), the points, the data fingerprints,
    the processors and the precision; a second call loads them without running the models.
    """
    return _collect(
        "joint",
        list(models),
        list(data),
        list(processors),
        list(points),
        batch_size=batch_size,
        device=device,
        mixed_precision=mixed_precision,
        accelerator=accelerator,
        cache_dir=cache_dir,
        cache_key=cache_key,
        quiet=quiet,
    )


def collect_model_stats(
    model: nn.Module, data: TaskData, processor, points: list[str], **kwargs
) -> dict[str, FeatureStats]:
    """Statistics of one model on its own data (e.g. RegMean Grams); same keywords as
    :func:`collect_joint_stats`."""
    return _collect("model", [model], [data], [processor], list(points), **_defaults(kwargs))


def _defaults(kwargs: dict) -> dict:
    """``kwargs`` over the keyword-only defaults of :func:`collect_joint_stats` (the one list)."""
    allowed = {
        name: p.default
        for name, p in inspect.signature(collect_joint_stats).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unexpected keyword(s) {unknown}; valid: {', '.join(allowed)}")
    return {**allowed, **kwargs}


def benchmark_throughput(
    models: Sequence[nn.Module],
    data: Sequence[TaskData],
    processors: Sequence,
    points: Sequence[str],
    batch_size: int = 32,
    *,
    device: str = "cpu",
    mixed_precision: str = "no",
    repeats: int = 1,
) -> dict[str, float]:
    """Images per second of plain inference vs statistics collection on the same pipeline.

    Both runs use the same batching, preprocessing and forward passes; the statistics run adds
    the hooks and the float32-product, float64-total accumulation (no cache). Each is run ``repeats`` times, interleaved,
    after one warm-up batch, and the best time is kept.
    """
    data, models, processors = list(data), list(models), list(processors)
    adapters = [ViTAdapter.from_model(m) for m in models]
    for m in models:
        m.to(device).eval()
    plan = _batch_plan(data, batch_size)
    kw = dict(device=device, mixed_precision=mixed_precision, desc="bench", quiet=True)
    _run(models, data, processors, plan[:1], **kw)

    def timed(with_stats: bool) -> float:
        collector = _Collector(models, adapters, points, device) if with_stats else None
        start = time.perf_counter()
        with _blas_threads():
            n = _run(models, data, processors, plan, **kw)
        if collector is not None:
            collector.finalize()
            collector.remove()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    runs = [(timed(False), timed(True)) for _ in range(repeats)]  # interleaved: load changes hit both
    plain, stats = max(r[0] for r in runs), max(r[1] for r in runs)
    return {"inference_images_per_s": plain, "stats_images_per_s": stats, "ratio": stats / plain}
