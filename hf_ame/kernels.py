"""Fused Triton kernels for one tensor's merge on a GPU (optional: ``pip install triton``).

A merge is bandwidth-bound: torch's path reads every ingredient once to form the pseudogradient,
writes it, then its optimizer kernel reads it back with the weights and state. Here one kernel per
AME step reads the batch's ingredient slices (bf16, fp16 or fp32; one dtype per tensor), forms
``g = zeta_t / S / |b| * sum_j (p - x_j)`` in float32 registers and applies the optimizer's update
with torch's own formulas (SGD with momentum / dampening / nesterov / weight decay, Adam, AdamW,
amsgrad, Adagrad); the last step writes the output dtype directly. The exact soup is one kernel
over the N inputs. Up to 4 inputs are passed as addresses in the kernel's arguments; more through
a table of addresses, so one compiled kernel serves any N.

Used by :mod:`hf_ame.algorithm` for tensors on CUDA devices when :func:`fused_supported` says so;
everything else takes the torch path. The same kernels run on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check them against torch without a
GPU. Kernels are compiled lazily, for the interpreter flag in force at the first call.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .config import AMEConfig
from .optimizers import get_optimizer

try:  # optional dependency: the torch path is always there
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None

__all__ = ["HAVE_TRITON", "MAX_DIRECT_INPUTS", "fused_supported", "fused_soup", "fused_merge", "fused_soup_many",
           "fused_merge_many", "interpreting"]

HAVE_TRITON = triton is not None
# optimizer arguments the kernels implement, with the values that change nothing; any other
# argument set to a non-default value sends the tensor down the torch path
_HANDLED = {
    "sgd": {"momentum", "dampening", "weight_decay", "nesterov", "maximize"},
    "adam": {"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"},
    "adamw": {"betas", "eps", "weight_decay", "amsgrad", "maximize"},
    "adagrad": {"lr_decay", "weight_decay", "initial_accumulator_value", "eps", "maximize"},
}
_IGNORED = {"foreach", "fused", "capturable", "differentiable"}  # how torch runs, not what it computes
_BLOCK = 2048  # elements per program: 8 warps x 256 lanes; bandwidth-bound, so one size serves all
_WARPS = 8


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def fused_supported(config: AMEConfig, device: Optional[torch.device], tensors: Sequence[torch.Tensor] = ()) -> bool:
    """Whether the fused kernels compute this merge: triton installed, CUDA tensors (or CPU ones
    under the interpreter), float32 compute, one floating storage dtype, contiguous inputs, a
    registered optimizer with a kernel and only arguments the kernel implements.
    ``HF_AME_FUSED=0`` turns them off (the torch path then runs everywhere)."""
    if not HAVE_TRITON or os.environ.get("HF_AME_FUSED", "1") == "0":
        return False
    dev = torch.device(device) if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpreting())):
        return False
    if config.torch_state_dtype != torch.float32 or _kind(config) is None:
        return False
    if tensors:
        dt = tensors[0].dtype
        if dt not in _TL_DTYPES or any(t.dtype != dt or not _same_device(t.device, dev) or not t.is_contiguous()
                                       for t in tensors):
            return False
    return True


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _kind(config: AMEConfig) -> Optional[str]:
    """The kernel for ``config.optimizer`` ("sgd", "adam", "adamw", "adagrad") or None."""
    entry = get_optimizer(config.optimizer)
    kind = entry.fused_kernel  # the registry's flag (built-ins only)
    if kind is None:
        return None
    defaults = entry.defaults()
    for k, v in config.optimizer_arguments().items():
        if k in _IGNORED or k in _HANDLED[kind]:
            continue
        if k not in defaults or defaults[k] != v:
            return None
    return kind


# ---------------------------------------------------------------- kernels (plain functions, jitted lazily)

def _soup_kernel(tab, chunks, a0, a1, a2, a3, n, nf, inv_n, out, numel, X_DTYPE: tl.constexpr,
                 WIDE: tl.constexpr, DIRECT: tl.constexpr, OUT_BF16: tl.constexpr, MANY: tl.constexpr,
                 OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # torch's soup(): 16-bit inputs are summed in fp32 (exact) and divided by n; fp32 inputs as
    # x_1 + mean_i(x_i - x_1), so identical inputs give x_1 back bit for bit. Inputs: DIRECT > 0:
    # the addresses a0..a3 (no table to copy to the device); else tab[0:n]. MANY: several tensors
    # in one launch: program pid merges chunks[pid] = (k, start) of tensor k, whose row of tab is
    # (numel, out, x_0 .. x_{n-1}).
    pid = tl.program_id(0).to(tl.int64)
    if MANY:
        row = tab + tl.load(chunks + 2 * pid) * (2 + n)
        offs = tl.load(chunks + 2 * pid + 1) + tl.arange(0, BLOCK)
        numel = tl.load(row)
        out = tl.load(row + 1).to(tl.pointer_type(OUT_DTYPE))
        tab = row + 2
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if DIRECT > 0:
        x0 = tl.load(a0.to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x0 = tl.load(tl.load(tab).to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k in tl.static_range(1, 4):
        if k < DIRECT:
            a = a1 if k == 1 else (a2 if k == 2 else a3)
            xk = tl.load(a.to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
            if WIDE:
                x0 = x0 + xk
            else:
                acc = (acc + xk) - x0
    if DIRECT == 0:
        for k in range(1, n):
            xk = tl.load(tl.load(tab + k).to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
            if WIDE:
                x0 = x0 + xk
            else:
                acc = (acc + xk) - x0
    if WIDE:
        res = tl.div_rn(x0, nf)
    else:
        res = x0 + acc * inv_n
    if OUT_BF16:  # round to nearest even by hand: the interpreter's own bf16 cast truncates
        bits = res.to(tl.uint32, bitcast=True)
        bits = tl.where(res != res, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        tl.store(out + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out + offs, res.to(OUT_DTYPE), mask=mask)


# One AME step for one tensor: g = scale * sum_{j in batch} (p - x_j), then the optimizer's
# update, in one pass. The batch's inputs: DIRECT > 0: the addresses a0..a3 (nb <= 4); else
# tab[j] is ingredient j's address and tab[boff:boff + nb] this step's batch.
# OPT 0 sgd (c1 momentum, c2 dampening, FLAG nesterov), 1 adam (wd added
# to g), 2 adamw (decoupled wd), both with c1/c2 = beta1/beta2, c3 = sqrt(1 - beta2^t), lr =
# lr / (1 - beta1^t), FLAG amsgrad; 3 adagrad (lr already decayed, c1 initial accumulator).
# s1..s3: state tensors; FIRST: state is not read (torch's lazy init); LAST: write out (output
# dtype) instead of w. MANY: several tensors in one launch: program pid steps chunks[pid] = (k,
# start) of tensor k, whose row of tab is (numel, w, pivot, out, s1, s2, s3, x_0 .. x_{n-1}); the
# batch's indices are batches[boff:boff + nb].
def _step_kernel(w, pivot, tab, chunks, batches, boff, a0, a1, a2, a3, n, nb, out, s1, s2, s3, numel,
                 scale, lr, wd, c1, c2, c3, eps,
                 X_DTYPE: tl.constexpr, OPT: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                 ADAPTIVE: tl.constexpr, MAXIMIZE: tl.constexpr, FLAG: tl.constexpr, OUT_BF16: tl.constexpr,
                 DIRECT: tl.constexpr, MANY: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    if MANY:
        row = tab + tl.load(chunks + 2 * pid) * (7 + n)
        offs = tl.load(chunks + 2 * pid + 1) + tl.arange(0, BLOCK)
        numel = tl.load(row)
        w = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        pivot = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        out = tl.load(row + 3).to(tl.pointer_type(OUT_DTYPE))
        s1 = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        s2 = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        s3 = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        tab = row + 7  # the inputs' addresses
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        batches = tab  # one tensor: its inputs' addresses, then every step's batch indices
    mask = offs < numel
    wv = tl.load(w + offs, mask=mask, other=0.0)
    if ADAPTIVE:
        pv = wv
    else:
        pv = tl.load(pivot + offs, mask=mask, other=0.0)
    if DIRECT > 0:
        g = pv - tl.load(a0.to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
        for k in tl.static_range(1, 4):
            if k < DIRECT:
                a = a1 if k == 1 else (a2 if k == 2 else a3)
                g = (g + pv) - tl.load(a.to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        j0 = tl.load(batches + boff)
        g = pv - tl.load(tl.load(tab + j0).to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
        for k in range(1, nb):
            jk = tl.load(batches + boff + k)
            xk = tl.load(tl.load(tab + jk).to(tl.pointer_type(X_DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
            g = (g + pv) - xk
    g = g * scale
    if MAXIMIZE:
        g = -g
    if OPT == 0:
        if wd != 0.0:
            g = g + wd * wv
        if c1 != 0.0:
            if FIRST:
                buf = g
            else:
                buf = tl.load(s1 + offs, mask=mask, other=0.0) * c1 + (1.0 - c2) * g
            tl.store(s1 + offs, buf, mask=mask)
            if FLAG:
                g = g + c1 * buf
            else:
                g = buf
        wv = wv - lr * g
    elif OPT == 1 or OPT == 2:
        if OPT == 2:
            wv = wv * (1.0 - wd)  # wd arrives pre-multiplied by the step's lr, as torch decays
        elif wd != 0.0:
            g = g + wd * wv
        if FIRST:
            m = (1.0 - c1) * g
            v = (1.0 - c2) * g * g
        else:
            m = c1 * tl.load(s1 + offs, mask=mask, other=0.0) + (1.0 - c1) * g
            v = c2 * tl.load(s2 + offs, mask=mask, other=0.0) + (1.0 - c2) * g * g
        tl.store(s1 + offs, m, mask=mask)
        tl.store(s2 + offs, v, mask=mask)
        if FLAG:
            if not FIRST:
                v = tl.maximum(tl.load(s3 + offs, mask=mask, other=0.0), v)
            tl.store(s3 + offs, v, mask=mask)
        wv = wv - lr * tl.div_rn(m, tl.div_rn(tl.sqrt_rn(v), c3) + eps)
    else:
        if wd != 0.0:
            g = g + wd * wv
        if FIRST:
            ssum = c1 + g * g
        else:
            ssum = tl.load(s1 + offs, mask=mask, other=0.0) + g * g
        tl.store(s1 + offs, ssum, mask=mask)
        wv = wv - lr * tl.div_rn(g, tl.sqrt_rn(ssum) + eps)
    if LAST and OUT_BF16:  # as in _soup_kernel
        bits = wv.to(tl.uint32, bitcast=True)
        bits = tl.where(wv != wv, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
        tl.store(out + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    elif LAST:
        tl.store(out + offs, wv.to(OUT_DTYPE), mask=mask)
    else:
        tl.store(w + offs, wv, mask=mask)


@functools.lru_cache(maxsize=None)
def _jit(fn: Callable, interpret: bool) -> Any:
    # triton.jit decides interpreter-or-compiler when it decorates: decorate per mode, on first use
    return triton.jit(fn)


def _launch(fn: Callable, numel: int, *args: Any, **meta: Any) -> None:
    kernel = _jit(fn, interpreting())
    grid = (triton.cdiv(max(numel, 1), _BLOCK),)
    kernel[grid](*args, BLOCK=_BLOCK, num_warps=_WARPS, **meta)


def _on(device: torch.device) -> Any:
    """Kernels run on the current CUDA device: make it the tensors' one (device_map over several
    GPUs), once per tensor rather than per launch (launches are what small tensors wait on)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_TL_DTYPES: Dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _tl_dtype(dtype: torch.dtype) -> Any:
    return getattr(tl, _TL_DTYPES[dtype])


# Inputs of a soup or an AME step passed as kernel arguments when there are at most this many
# (0 to _ADDRESS_ARGS); more are read through an address table copied to the device per tensor.
MAX_DIRECT_INPUTS = 4
_ADDRESS_ARGS = 4  # a0..a3 in the kernels' signatures


def _direct(count: int) -> bool:
    return count <= min(MAX_DIRECT_INPUTS, _ADDRESS_ARGS)


def _addresses(tensors: Sequence[torch.Tensor]) -> List[int]:
    """Up to 4 input addresses as kernel arguments (0 for the unused ones)."""
    return [t.data_ptr() for t in tensors] + [0] * (_ADDRESS_ARGS - len(tensors))


def _pointer_table(tensors: Sequence[torch.Tensor], device: torch.device, extra: Sequence[int] = ()) -> torch.Tensor:
    """The tensors' addresses (then ``extra`` integers) as an int64 tensor on ``device``. (Sent
    from pageable memory: pinning a small table per tensor measured 2x slower on an H200.)"""
    return torch.tensor([t.data_ptr() for t in tensors] + list(extra), dtype=torch.int64).to(device)


def fused_soup(ingredients: Sequence[torch.Tensor], out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The uniform average of ``ingredients`` (one dtype, one device, contiguous) in one kernel:
    each input read once, the output written once in ``out_dtype``. Same formulas as
    :func:`hf_ame.algorithm.soup`, then cast."""
    x0 = ingredients[0]
    out = torch.empty(x0.shape, dtype=out_dtype, device=x0.device)
    wide = x0.element_size() * 2 <= 4
    n = len(ingredients)
    direct = n if _direct(n) else 0
    tab = _pointer_table(ingredients, x0.device) if not direct else out  # (any pointer when unused)
    with _on(x0.device):
        _launch(_soup_kernel, x0.numel(), tab, out, *_addresses(ingredients if direct else []), n, float(n),
                1.0 / n, out, x0.numel(), X_DTYPE=_tl_dtype(x0.dtype), WIDE=wide, DIRECT=direct,
                OUT_BF16=out_dtype == torch.bfloat16, MANY=False, OUT_DTYPE=_tl_dtype(out_dtype))
    return out


def _chunks(numels: Sequence[int], device: torch.device) -> torch.Tensor:
    """(tensor k, first element) of every program of a launch over several tensors, as int64 pairs."""
    pairs = [v for k, m in enumerate(numels) for start in range(0, max(m, 1), _BLOCK) for v in (k, start)]
    return torch.tensor(pairs, dtype=torch.int64).to(device)


def _table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(r) for r in rows], dtype=torch.int64).to(device)


def fused_soup_many(groups: Sequence[Sequence[torch.Tensor]], out_dtype: torch.dtype = torch.float32
                    ) -> List[torch.Tensor]:
    """:func:`fused_soup` of several tensors in ONE launch (``groups[k]``: tensor k's N copies; one
    input dtype, one device, contiguous): small tensors are launch-bound one by one (a norm's 2048
    elements are 1 us of GPU work behind 20-50 us of launch). The same arithmetic: the same bits."""
    x0, n = groups[0][0], len(groups[0])
    outs = [torch.empty(g[0].shape, dtype=out_dtype, device=x0.device) for g in groups]
    tab = _table([[g[0].numel(), o.data_ptr(), *(x.data_ptr() for x in g)] for g, o in zip(groups, outs)], x0.device)
    chunks = _chunks([g[0].numel() for g in groups], x0.device)
    with _on(x0.device):
        _launch(_soup_kernel, chunks.numel() // 2 * _BLOCK, tab, chunks, 0, 0, 0, 0, n, float(n), 1.0 / n, outs[0], 2,
                X_DTYPE=_tl_dtype(x0.dtype), WIDE=x0.element_size() * 2 <= 4, DIRECT=0,
                OUT_BF16=out_dtype == torch.bfloat16, MANY=True, OUT_DTYPE=_tl_dtype(out_dtype))
    return outs


def _constants(kind: str, config: AMEConfig) -> Dict[str, Any]:
    """The optimizer's fixed hyperparameters, with torch's defaults, as the kernel takes them."""
    kw = {**get_optimizer(config.optimizer).defaults(), **config.optimizer_arguments()}
    c: Dict[str, Any] = {"wd": float(kw.get("weight_decay", 0.0) or 0.0), "c1": 0.0, "c2": 0.0, "eps": 0.0,
                         "OPT": 0, "FLAG": False, "MAXIMIZE": bool(kw.get("maximize", False)), "lr_decay": 0.0}
    if kind == "sgd":
        c.update(c1=float(kw.get("momentum", 0.0)), c2=float(kw.get("dampening", 0.0)), FLAG=bool(kw.get("nesterov")))
    elif kind in ("adam", "adamw"):
        b1, b2 = (float(b) for b in kw.get("betas", (0.9, 0.999)))
        decoupled = kind == "adamw" or bool(kw.get("decoupled_weight_decay", False))
        c.update(OPT=2 if decoupled else 1, c1=b1, c2=b2, eps=float(kw.get("eps", 1e-8)),
                 FLAG=bool(kw.get("amsgrad", False)))
    else:
        c.update(OPT=3, lr_decay=float(kw.get("lr_decay", 0.0)), c1=float(kw.get("initial_accumulator_value", 0.0)),
                 eps=float(kw.get("eps", 1e-10)))
    return c


def _step_scalars(c: Dict[str, Any], t: int, lr: float) -> tuple:
    """(lr, wd, c3) of step ``t`` (from 1) at learning rate ``lr``, in double on the host as torch's
    single-tensor optimizers compute them: Adam's bias corrections, Adagrad's decayed lr."""
    if c["OPT"] in (1, 2):
        b1, b2 = c["c1"], c["c2"]
        # AdamW multiplies w by (1 - lr * wd) before the update, with the undecayed step lr
        wd = lr * c["wd"] if c["OPT"] == 2 else c["wd"]
        return lr / (1 - b1 ** t), wd, math.sqrt(1 - b2 ** t)
    if c["OPT"] == 3:
        return lr / (1 + (t - 1) * c["lr_decay"]), c["wd"], 1.0
    return lr, c["wd"], 1.0


def _state_count(a: Dict[str, Any]) -> int:
    """How many float32 state tensors the update keeps (momentum; Adam's moments, amsgrad's max)."""
    if a["OPT"] == 0:
        return 1 if a["c1"] != 0.0 else 0
    if a["OPT"] == 3:
        return 1
    return 3 if a["FLAG"] else 2


def fused_merge(ingredients: Sequence[torch.Tensor], init: torch.Tensor, config: AMEConfig,
                steps: Sequence[Any], out_dtype: torch.dtype) -> torch.Tensor:
    """Run every AME step of one tensor with the fused kernel: ``init`` is w_0 (float32, on the
    ingredients' device; consumed), ``steps`` the planned :class:`~hf_ame.algorithm.AMEStep` s.
    Returns the merge in ``out_dtype``. The kernels' arithmetic is torch's, in a fused order:
    results agree with the torch path to float32 rounding (tests/test_kernels.py states the
    tolerances: 1e-7 under the interpreter, 2e-6 compiled for CUDA, where multiply-adds fuse)."""
    kind = _kind(config)
    dev = init.device
    w = init.contiguous()
    pivot = None if config.adaptive_pivot else w.clone()
    n, numel = len(ingredients), w.numel()
    # batches of up to 4 pass their inputs' addresses as arguments; larger ones read one table per
    # tensor: the ingredients' addresses, then every step's batch indices
    direct = all(_direct(len(s.batch)) for s in steps)
    tab = w if direct else _pointer_table(ingredients, dev, [j for s in steps for j in s.batch])
    c = _constants(kind, config)
    states: List[torch.Tensor] = [torch.empty_like(w) for _ in range(_state_count(c))] if steps else []
    slots = states + [w] * (3 - len(states))  # unused slots get any valid pointer
    out = torch.empty(w.shape, dtype=out_dtype, device=dev)
    meta = dict(X_DTYPE=_tl_dtype(ingredients[0].dtype), OPT=c["OPT"], ADAPTIVE=pivot is None,
                MAXIMIZE=c["MAXIMIZE"], FLAG=c["FLAG"], OUT_BF16=out_dtype == torch.bfloat16,
                OUT_DTYPE=_tl_dtype(out_dtype))
    pos = n
    with _on(dev):
        for t, s in enumerate(steps, start=1):
            lr, wd, c3 = _step_scalars(c, t, s.lr)
            nb = len(s.batch)
            addresses = _addresses([ingredients[j] for j in s.batch] if direct else [])
            _launch(_step_kernel, numel, w, w if pivot is None else pivot, tab, w, w, pos, *addresses, n, nb, out,
                    *slots, numel, s.scale / nb, lr, wd, c["c1"], c["c2"], c3, c["eps"], FIRST=t == 1,
                    LAST=t == len(steps), DIRECT=nb if direct else 0, MANY=False, **meta)
            pos += nb
    if not steps:
        out.copy_(w)
    return out


def fused_merge_many(groups: Sequence[Sequence[torch.Tensor]], inits: Sequence[torch.Tensor], config: AMEConfig,
                     steps: Sequence[Any], out_dtype: torch.dtype) -> List[torch.Tensor]:
    """:func:`fused_merge` of several tensors, each step ONE launch over all of them (``groups[k]``:
    tensor k's N copies, ``inits[k]`` its w_0 in float32, consumed): the same arithmetic, the same
    bits, len(steps) launches instead of len(steps) per tensor."""
    kind, dev, n = _kind(config), inits[0].device, len(groups[0])
    c = _constants(kind, config)
    ws = [w.contiguous() for w in inits]
    pivots = [None if config.adaptive_pivot else w.clone() for w in ws]
    outs = [torch.empty(w.shape, dtype=out_dtype, device=dev) for w in ws]
    states = [[torch.empty_like(w) for _ in range(_state_count(c))] if steps else [] for w in ws]
    rows = []
    for w, p, o, st, g in zip(ws, pivots, outs, states, groups):
        slots = [s.data_ptr() for s in st] + [w.data_ptr()] * (3 - len(st))  # unused slots: any valid address
        rows.append([w.numel(), w.data_ptr(), (w if p is None else p).data_ptr(), o.data_ptr(), *slots,
                     *(x.data_ptr() for x in g)])
    tab, chunks = _table(rows, dev), _chunks([w.numel() for w in ws], dev)
    batches = _table([[j for s in steps for j in s.batch] or [0]], dev)
    meta = dict(X_DTYPE=_tl_dtype(groups[0][0].dtype), OPT=c["OPT"], ADAPTIVE=config.adaptive_pivot,
                MAXIMIZE=c["MAXIMIZE"], FLAG=c["FLAG"], OUT_BF16=out_dtype == torch.bfloat16,
                OUT_DTYPE=_tl_dtype(out_dtype))
    pos, w0 = 0, ws[0]
    with _on(dev):
        for t, s in enumerate(steps, start=1):
            lr, wd, c3 = _step_scalars(c, t, s.lr)
            nb = len(s.batch)
            _launch(_step_kernel, chunks.numel() // 2 * _BLOCK, w0, w0, tab, chunks, batches, pos, 0, 0, 0, 0, n, nb,
                    outs[0], w0, w0, w0, 2, s.scale / nb, lr, wd, c["c1"], c["c2"], c3, c["eps"], FIRST=t == 1,
                    LAST=t == len(steps), DIRECT=0, MANY=True, **meta)
            pos += nb
    if not steps:
        for o, w in zip(outs, ws):
            o.copy_(w)
    return outs
