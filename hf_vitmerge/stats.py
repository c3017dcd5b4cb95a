"""Streaming activation statistics for alignment merging (ZipIt!, MuDSC, permutation) and RegMean.

Statistics are float64 running sums — ``count``, ``sum`` of features and ``outer`` (sum of
``f f^T``) — so no activation is kept beyond its batch, batches can be sharded over processes
(the sums are all-reduced) and results can be cached on disk. Each batch's product ``F^T F`` is
computed in float32 (a GEMM over at most :data:`PRODUCT_ROWS` rows) and added to the float64
total, on CPU and CUDA alike (TF32 off): the relative error against an all-float64 path is ~1e-7
(tested <= 1e-6) at a fraction of the cost; collections take the per-batch feature sums in float32
too. Points of one shape are staged and multiplied together, and on CPU the products run on a
background thread while the models compute the next batch (:class:`_Collector`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import ViTAdapter
from .data import TaskData
from .threads import intra_op_threads, usable_cores

_CACHE_VERSION = 1
_TINY_STD = 1e-12
#: dtype of the per-batch products ``F^T F`` (totals are always float64). float32 halves the cost;
#: set to ``torch.float64`` for the exact reference path (used by tests and benchmarks).
PRODUCT_DTYPE = torch.float32
#: rows per float32 product before it is added to the float64 total (bounds the float32 error)
PRODUCT_ROWS = 8192
#: features (bytes) that may wait for the background products thread before the models pause
PENDING_BYTES = 256 << 20
#: at most this many bytes of one batch's features per staging buffer shared by several points
GROUP_BYTES = 32 << 20
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
        accumulate_outer_(self.outer, f)

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


def _product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype products of features of ``dtype`` are taken in (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else PRODUCT_DTYPE


def accumulate_outer_(outer: torch.Tensor, f: torch.Tensor, *, scratch: dict | None = None) -> None:
    """``outer += f^T f``: ``outer`` is float64; each product over at most :data:`PRODUCT_ROWS` rows
    of ``f`` is computed in float32 (float64 when ``f`` is float64 or :data:`PRODUCT_DTYPE` says so;
    TF32 off on CUDA) and added to it. ``scratch`` caches the float32 product buffer between calls.
    The result is symmetric up to rounding (:meth:`FeatureStats.covariance` symmetrizes)."""
    dtype = _product_dtype(f.dtype)
    f = f.to(dtype)
    with _fp32_exact() if f.is_cuda else contextlib.nullcontext():
        if dtype == torch.float64:
            for start in range(0, f.shape[0], PRODUCT_ROWS):
                rows = f[start : start + PRODUCT_ROWS]
                outer.addmm_(rows.T, rows)
            return
        buf = _scratch(scratch, (f.shape[1], f.shape[1]), dtype, outer.device)
        for start in range(0, f.shape[0], PRODUCT_ROWS):
            rows = f[start : start + PRODUCT_ROWS]
            torch.mm(rows.T, rows, out=buf)
            outer.add_(buf)


def _scratch(scratch: dict | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A product buffer of ``shape``, cached in ``scratch``."""
    key = (shape, dtype, str(device))
    if scratch is not None and key in scratch:
        return scratch[key]
    buf = torch.empty(shape, dtype=dtype, device=device)
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


def symmetrize_lower_(outer: torch.Tensor) -> None:
    """Complete a matrix of which only the lower triangle was accumulated."""
    lower = outer.tril()
    outer.copy_(lower + lower.tril(-1).T)


def _cores_per_process(processes: int) -> int:
    return max(1, usable_cores() // max(1, processes))


def _stats_worker_enabled(device: str | torch.device, processes: int = 1) -> bool:
    """Whether a collection on ``device`` takes its products on a background thread:
    ``$HF_VITMERGE_STATS_WORKER`` (1 / 0) if set, else on CPU when each of the ``processes``
    collecting on this machine has two or more cores. CUDA needs none: its products already run
    asynchronously on the device."""
    if torch.device(device).type != "cpu":
        return False
    env = os.environ.get("HF_VITMERGE_STATS_WORKER", "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return _cores_per_process(processes) >= 2


@dataclass
class _Group:
    """Points of one feature size and row count per batch, accumulated together.

    Per batch each model's features are copied into one ``[P, N, parts * rows, d]`` buffer (point,
    model, row, feature: every copy is contiguous) from a pool reused across batches, so the
    models' own activations are freed at once and no new memory is touched after the first batch.
    The products are batched over the ``P`` points (``torch.bmm``), one per lower pair of models
    ``(i, j <= i)``, and the sums are one reduction of the whole buffer."""

    points: list[str]
    d: int  # features per model
    parts: int  # row blocks per model and batch (a QK point: query and key outputs)
    n: int  # models
    sum: torch.Tensor | None = None  # [P, N d] float64 (made by ``allocate``)
    outer: torch.Tensor | None = None  # [P, N d, N d] float64 (lower blocks)
    count: int = 0
    staged: _Staging | None = None  # this batch's buffer while the models fill it
    sum_blocks: torch.Tensor | None = None  # ``sum`` as [P, N, d]
    blocks: list = field(default_factory=list)  # (i, j, view of ``outer``'s block) for j <= i
    rows: int = 0  # rows per part in this batch
    writes: int = 0  # (point, model, part) blocks written into ``staged``

    @property
    def expected_writes(self) -> int:
        return len(self.points) * self.n * self.parts

    def allocate(self, device: torch.device) -> None:
        """The float64 totals, and the views the products add to (made once: each view is an
        operation that would otherwise take Python's lock on every batch)."""
        num, n, d = len(self.points), self.n, self.d
        self.sum = torch.zeros(num, n * d, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num, n * d, n * d, dtype=torch.float64, device=device)
        self.sum_blocks = self.sum.view(num, n, d)
        self.blocks = [
            (i, j, self.outer[:, i * d : (i + 1) * d, j * d : (j + 1) * d])
            for i in range(n)
            for j in range(i + 1)
        ]


class _Staging:
    """One ``[P, N, rows, d]`` staging buffer and its views: ``dest[p][m][part]`` for the hooks'
    copies, ``models[i]`` (``[P, rows, d]``) for the products."""

    def __init__(self, buf: torch.Tensor, parts: int):
        self.buf = buf
        self.key = (tuple(buf.shape), buf.dtype, parts)  # the pool's key
        num, n, rows, _ = buf.shape
        r = rows // parts
        self.dest = [
            [[buf[p, m, k * r : (k + 1) * r] for k in range(parts)] for m in range(n)] for p in range(num)
        ]
        self.models = [buf[:, i] for i in range(n)]

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()


class _Collector:
    """Hooks on N models; each batch's features are staged per point group and accumulated.

    Per batch and point, model ``i``'s rows ``F_i`` (of every part: a QK point's query and key
    outputs are rows of the same features) add ``F_i^T F_j`` (``j <= i``) to the lower blocks of
    the float64 outer product, and their column sums to the sums, each product and sum taken in
    float32 (:data:`PRODUCT_DTYPE`) over at most :data:`PRODUCT_ROWS` rows; :meth:`finalize`
    mirrors the lower blocks. Points with the same feature size and rows share one staging buffer
    and batched products (:class:`_Group`): at the zoo's sizes per-point products cost more in
    operations than in flops, and holding the models' activations for them made the allocator
    return and re-fault memory.

    On CPU with two or more cores (:func:`_stats_worker_enabled`) the products run on one
    background thread with one intra-op thread, handed over once per batch when the last model's
    forward pass ends, while the models compute the next batch on the other core(s)
    (:meth:`running`); every operation the worker runs costs the models the time to take Python's
    lock back, hence few and large ones. The worker runs the same operations in the same order as
    inline, so the results are bit-identical, and at most :data:`PENDING_BYTES` of staged features
    wait for it. Inline, a group is accumulated as soon as the last model has written it. Features
    are copied when the hook fires, so no later in-place change of an activation can reach them;
    staging holds one batch of every point's features of all N models (plus what waits for the
    worker). Measured on 2 cores (BENCHMARKS.md, issue 15): the default alignment collection of
    two tiny ViTs runs at 0.66-0.70 of inference speed (per-point products: 0.57-0.58).
    """

    def __init__(self, models, adapters, points, device, *, processes: int = 1, batch_size: int = 32):
        self.n = len(models)
        self.points = list(points)
        self.device = torch.device(device)
        self.groups: list[_Group] = []
        self.handles = []
        self.scratch: dict = {}  # product buffers, one per shape (used by one thread)
        self.free: dict[tuple, list[_Staging]] = {}  # staging buffers by (shape, dtype, parts)
        self.cores = _cores_per_process(processes)
        self.executor = _start_worker() if _stats_worker_enabled(device, processes) else None
        self.pending: deque[tuple[Future, int]] = deque()
        self.pending_bytes = 0
        self.ready: list[tuple[_Group, _Staging]] = []  # this batch's complete groups, for the worker
        if self.executor is not None:  # the last model's forward ends a batch: hand it over at once
            self.handles.append(models[-1].register_forward_hook(lambda *_: self._submit_ready()))
        tokens = adapters[0].spec.num_patches + 1
        open_groups: dict[tuple[int, int, bool], _Group] = {}
        for point in self.points:
            kind, layer, d = _parse_point(point, adapters[0])
            cls_only = kind in _GLOBAL_POINTS and kind != "residual_tokens"
            hooks = (("final_ln", "out"),) if kind in _GLOBAL_POINTS else _KINDS[kind]
            rows = batch_size * (1 if cls_only else tokens)
            group = self._group_for(open_groups, (d, len(hooks), cls_only), rows)
            group.points.append(point)
            p = len(group.points) - 1
            for m, (model, adapter) in enumerate(zip(models, adapters, strict=True)):
                for part, (role, where) in enumerate(hooks):
                    mod = adapter.module(model, role, layer)
                    if where == "out":
                        hook = mod.register_forward_hook(self._out_hook(group, p, m, part, cls_only))
                    else:
                        hook = mod.register_forward_pre_hook(self._in_hook(group, p, m, part))
                    self.handles.append(hook)
        for g in self.groups:
            g.allocate(self.device)

    def _group_for(self, open_groups: dict, key: tuple[int, int, bool], rows_per_part: int) -> _Group:
        """The open group of ``key`` (feature size, parts, CLS only) if one more point keeps its
        staging buffer within :data:`GROUP_BYTES`, else a new one."""
        d, parts, _ = key
        point_bytes = rows_per_part * parts * self.n * d * 4
        group = open_groups.get(key)
        if group is None or (len(group.points) + 1) * point_bytes > GROUP_BYTES:
            group = _Group(points=[], d=d, parts=parts, n=self.n)
            self.groups.append(group)
            open_groups[key] = group
        return group

    def running(self):
        """Context for the forward passes: with the worker on, the models get the cores it leaves
        (torch's thread count, at most this process's cores - 1), restored after."""
        if self.executor is None:
            return contextlib.nullcontext()
        return intra_op_threads(max(1, min(torch.get_num_threads(), self.cores - 1)))

    def _out_hook(self, group: _Group, p: int, m: int, part: int, cls_only: bool):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            self._stage(group, p, m, part, out[:, 0] if cls_only else out)

        return hook

    def _in_hook(self, group: _Group, p: int, m: int, part: int):
        def hook(_module, inputs):
            self._stage(group, p, m, part, inputs[0])

        return hook

    def _stage(self, g: _Group, p: int, m: int, part: int, features: torch.Tensor) -> None:
        """Copy one (point, model, part) block of this batch into the group's buffer; the last
        block completes the group."""
        f = features.reshape(-1, features.shape[-1])
        if g.staged is None:
            g.rows, g.writes = f.shape[0], 0
            g.staged = self._take_buffer((len(g.points), self.n, g.parts * g.rows, g.d), f.dtype, g.parts)
        elif f.shape[0] != g.rows:
            raise RuntimeError(
                f"point {g.points[p]!r}: models produced different numbers of samples ({g.rows} and {f.shape[0]})"
            )
        g.staged.dest[p][m][part].copy_(f)
        g.writes += 1
        if g.writes == g.expected_writes:
            staged, g.staged = g.staged, None
            if self.executor is None:
                self._accumulate(g, staged)
            else:
                self.ready.append((g, staged))

    def _take_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, parts: int) -> _Staging:
        """A staging buffer from the pool, or a new one."""
        dtype = _product_dtype(dtype)
        pool = self.free.get((shape, dtype, parts))
        if pool:
            return pool.pop()
        return _Staging(torch.empty(shape, dtype=dtype, device=self.device), parts)

    def _release_buffer(self, staged: _Staging) -> None:
        self.free.setdefault(staged.key, []).append(staged)

    def _submit_ready(self) -> None:
        """Hand the batch's complete groups to the worker as one task."""
        if not self.ready:
            return
        items, self.ready = self.ready, []
        nbytes = sum(s.nbytes for _, s in items)
        self.pending.append((self.executor.submit(self._accumulate_all, items), nbytes))
        self.pending_bytes += nbytes
        while self.pending and (self.pending_bytes > PENDING_BYTES or self.pending[0][0].done()):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self.pending.popleft()
        self.pending_bytes -= nbytes
        future.result()  # re-raises the worker's error in the caller

    def _accumulate_all(self, items: list[tuple[_Group, _Staging]]) -> None:
        for g, staged in items:
            self._accumulate(g, staged)

    def _accumulate(self, g: _Group, staged: _Staging) -> None:
        """Add one batch (``staged.buf[p]``: point p's rows per model) to the group's count, sums
        and the lower blocks of its outer products; the buffer returns to the pool."""
        exact = _fp32_exact() if self.device.type == "cuda" else contextlib.nullcontext()
        rows = staged.buf.shape[2]
        g.count += rows
        with torch.inference_mode(), exact:
            for start in range(0, rows, PRODUCT_ROWS):
                if rows <= PRODUCT_ROWS:
                    x, models = staged.buf, staged.models
                else:
                    x = staged.buf[:, :, start : start + PRODUCT_ROWS]
                    models = [x[:, i] for i in range(self.n)]
                g.sum_blocks.add_(x.sum(2))
                for i, j, block in g.blocks:
                    _accumulate_batched_product(block, models[i], models[j], self.scratch)
        self._release_buffer(staged)

    def finalize(self) -> dict[str, FeatureStats]:
        """Wait for the queued products, then give each point its statistics with the outer
        product's lower blocks mirrored (exactly symmetric totals)."""
        if self.executor is not None:
            self._submit_ready()
        while self.pending:
            self._wait_oldest()
        if any(g.staged is not None for g in self.groups):
            raise RuntimeError(
                "a batch of statistics was left incomplete (a model's forward pass did not finish)"
            )
        stats = {}
        for g in self.groups:
            for p, point in enumerate(g.points):
                outer = g.outer[p].clone()
                symmetrize_lower_(outer)
                stats[point] = FeatureStats(g.count, g.sum[p].clone(), outer)
        self.scratch.clear()
        self.free.clear()
        return {point: stats[point] for point in self.points}

    def close(self) -> None:
        """Remove the hooks and stop the worker (dropping queued work if :meth:`finalize` was not
        reached, e.g. after an error)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        self.pending.clear()
        self.pending_bytes = 0
        self.ready = []
        for g in self.groups:
            g.staged = None
        self.free.clear()


def _accumulate_batched_product(
    total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: dict | None
) -> None:
    """``total[p] += a[p]^T b[p]`` for a stack of points (float64 ``total``, possibly a view); the
    product is taken in the dtype of ``a`` and ``b`` (float32, or float64 on the exact path)."""
    buf = _scratch(scratch, (a.shape[0], a.shape[2], b.shape[2]), a.dtype, total.device)
    torch.bmm(a.transpose(1, 2), b, out=buf)
    total.add_(buf)


def _start_worker() -> ThreadPoolExecutor:
    """One background thread whose torch ops (and MKL) run single-threaded. ``torch.set_num_threads``
    in a thread also sets the process-wide count, so the caller's count is restored once the
    worker has set its own (which MKL and OpenMP keep per thread)."""
    before = torch.get_num_threads()
    executor = ThreadPoolExecutor(
        1, thread_name_prefix="hf_vitmerge-stats", initializer=torch.set_num_threads, initargs=(1,)
    )
    executor.submit(lambda: None).result()
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return executor


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
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes on this machine (torchrun)
    collector = _Collector(models, adapters, points, device, processes=local, batch_size=batch_size)
    plan = _batch_plan(data, batch_size)[rank::world]
    try:
        with collector.running():
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
            stats = collector.finalize()
    finally:
        collector.close()
        for m, dev, tr in zip(models, originals, training, strict=True):
            m.to(dev).train(tr)
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
        start = time.perf_counter()
        collector = (
            _Collector(models, adapters, points, device, batch_size=batch_size) if with_stats else None
        )
        try:
            with collector.running() if collector is not None else contextlib.nullcontext():
                n = _run(models, data, processors, plan, **kw)
                if collector is not None:
                    collector.finalize()
        finally:
            if collector is not None:
                collector.close()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - start)

    runs = [(timed(False), timed(True)) for _ in range(repeats)]  # interleaved: load changes hit both
    plain, stats = max(r[0] for r in runs), max(r[1] for r in runs)
    return {"inference_images_per_s": plain, "stats_images_per_s": stats, "ratio": stats / plain}
