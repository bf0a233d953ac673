"""The AME algorithm on plain tensors: no files, no models (see ``docs/ame.md``).

For one tensor, with ordered ingredients x_1..x_N, S = ceil(N / B) steps per epoch:

    w <- w_0;  for each step t (global, from 1) over batches b of the (shuffled) order:
        p <- w if adaptive_pivot else w_0
        g <- zeta_t * (p - mean_{j in b} x_j) / S
        w <- optimizer.step(w, g) at learning rate eta_t

Every coordinate-wise optimizer treats tensors independently, so a whole model is merged tensor
by tensor with the same :func:`plan_steps` (the shuffle is drawn once per epoch, shared by all
tensors); stepping several tensors through one optimizer gives identical results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .config import AMEConfig, ConfigError
from .errors import HFAMEError
from .methods import MethodContext, get_method
from .optimizers import build_optimizer, get_optimizer
from .schedules import amplification, learning_rate

__all__ = [
    "is_exact_soup",
    "is_plain_sgd",
    "needs_optimizer",
    "load_optimizer_support",
    "AMEStep",
    "plan_steps",
    "resolve_pivot",
    "Pivot",
    "soup",
    "initial_merge",
    "AMEStepper",
    "ame_merge",
    "ame_merge_many",
    "NonFiniteError",
    "non_finite_inputs",
]


class NonFiniteError(HFAMEError, ValueError):
    """A merged tensor (or block) holds NaN or Inf. ``culprits``: indices of the ingredients whose
    copy holds one (empty: the merge itself overflowed, e.g. a learning rate far too high)."""

    def __init__(self, culprits: Sequence[int]):
        self.culprits = list(culprits)
        super().__init__(f"non-finite values from ingredient(s) {self.culprits}" if self.culprits
                         else "the merge produced non-finite values")


def non_finite_inputs(ingredients: Sequence[torch.Tensor]) -> List[int]:
    """Indices of the copies holding a NaN or Inf (only called once a merged result is non-finite:
    the normal path never takes this extra pass over the inputs)."""
    return [j for j in range(len(ingredients)) if not bool(torch.isfinite(ingredients[j]).all())]


@dataclass(frozen=True)
class AMEStep:
    """One optimizer step: global index ``t`` (from 1), its epoch (from 1), the ingredient
    indices averaged in it, the learning rate eta_t and the gradient scale zeta_t / S."""

    t: int
    epoch: int
    batch: Tuple[int, ...]
    lr: float
    scale: float


def plan_steps(n_ingredients: int, config: AMEConfig) -> List[AMEStep]:
    """The full step schedule for ``n_ingredients`` ingredients (indices into the given order).

    With ``shuffle`` the order of each epoch is ``torch.randperm`` drawn from a generator seeded
    with ``config.seed``, once per epoch: identical for every tensor of a model.
    """
    if n_ingredients < 1:
        raise ValueError("AME needs at least one ingredient")
    b = config.batch_size or n_ingredients  # None: all ingredients in one step
    s = math.ceil(n_ingredients / b)
    gen = torch.Generator().manual_seed(int(config.seed))
    steps: List[AMEStep] = []
    t = 0
    for epoch in range(1, config.epochs + 1):
        if config.shuffle:
            order = torch.randperm(n_ingredients, generator=gen).tolist()
        else:
            order = list(range(n_ingredients))
        for start in range(0, n_ingredients, b):
            t += 1
            zeta = amplification(t, config.amplification)
            lr = learning_rate(t, config.lr, config.lr_schedule, config.lr_power)
            steps.append(AMEStep(t, epoch, tuple(order[start:start + b]), lr, zeta / s))
    return steps


class Pivot(NamedTuple):
    """``config.pivot`` resolved once: ``kind`` "soup", "index" (ingredient ``index`` in merge
    order) or "base" (a separate base checkpoint). A config's pivot string may be a folder path or an
    ingredient's name; code past :func:`resolve_pivot` tests these properties, never the string."""

    kind: str
    index: Optional[int] = None

    @property
    def is_base(self) -> bool:
        return self.kind == "base"

    @property
    def is_soup(self) -> bool:
        return self.kind == "soup"


PivotSpec = Pivot  # the older name


def resolve_pivot(pivot: Union[str, int], n: int, names: Sequence[str] = ()) -> Pivot:
    """Map ``config.pivot`` to Pivot("soup"), Pivot("index", i) or Pivot("base").

    ``"first"`` is index 0 of the given order; a string equal to an ingredient's name selects that
    ingredient; any other string names a separate base checkpoint.
    """
    if isinstance(pivot, int) and not isinstance(pivot, bool):
        if not -n <= pivot < n:
            raise ConfigError(f"pivot: ingredient index {pivot} is out of range for {n} ingredients")
        return Pivot("index", pivot % n)
    if pivot == "soup":
        return Pivot("soup")
    if pivot == "first":
        return Pivot("index", 0)
    if isinstance(pivot, str) and pivot in names:
        return Pivot("index", list(names).index(pivot))
    return Pivot("base")


def soup(ingredients: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32,
         device: Optional[torch.device] = None) -> torch.Tensor:
    """Uniform average in ``dtype``, accumulated one ingredient at a time (never stacked).

    Computed as x_1 + mean_i(x_i - x_1): fine-tunes differ by small deltas, so this loses less
    precision than summing raw weights, and identical ingredients give x_1 back exactly.
    """
    n = len(ingredients)
    x0 = ingredients[0]
    first = x0.to(device=device, dtype=dtype, copy=True)
    if n == 1:
        return first
    # a lazy row of copies on disk says its sizes without reading them
    sizes = getattr(ingredients, "element_sizes", None) or [x.element_size() for x in ingredients]
    if max(sizes) * 2 <= first.element_size():
        # bf16/fp16 into fp32: sums of up to 2**16 such values are exact, and so is sum / n when all
        # are equal, so one plain pass (N ops) loses nothing. (Any wider copy: the formula below,
        # so mixed-dtype ingredients merge exactly as their values upcast to fp32 would.)
        for i in range(1, n):
            first.add_(ingredients[i].to(device=first.device))
        return first.div_(n)
    acc = torch.zeros_like(first)
    for i in range(1, n):
        acc.add_(ingredients[i].to(device=first.device)).sub_(first)
    return first.add_(acc, alpha=1.0 / n)


def initial_merge(ingredients: Sequence[torch.Tensor], pivot: PivotSpec, *, base: Optional[torch.Tensor] = None,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> torch.Tensor:
    """w_0 for one tensor, as a fresh tensor in ``dtype`` on ``device``."""
    kind, idx = pivot
    if kind == "soup":
        return soup(ingredients, dtype, device)
    if kind == "index":
        return ingredients[idx].to(device=device, dtype=dtype, copy=True)
    if base is None:
        raise ConfigError("pivot: a base checkpoint was named but no base tensor was given")
    return base.to(device=device, dtype=dtype, copy=True)


def _build_fast(config: AMEConfig, weights: List[torch.Tensor]) -> torch.optim.Optimizer:
    """The configured optimizer, with torch's fused kernel when it has one for these tensors (about
    10x faster than the for-loop Adam on CPU) unless the user chose ``fused``/``foreach`` themselves."""
    kwargs = config.optimizer_arguments()
    entry = get_optimizer(config.optimizer)
    if "fused" not in kwargs and "foreach" not in kwargs and "fused" in entry.defaults():
        try:
            return build_optimizer(config.optimizer, weights, lr=float(config.lr), kwargs={**kwargs, "fused": True})
        except Exception:  # noqa: BLE001 - no fused kernel for this device/dtype: use the default path
            pass
    return build_optimizer(config.optimizer, weights, lr=float(config.lr), kwargs=kwargs)


def is_plain_sgd(config: AMEConfig) -> bool:
    """SGD without momentum, weight decay or maximize: a step is w - lr g, element by element."""
    kw = config.optimizer_arguments()
    return (config.optimizer in ("sgd", "gd") and not kw.get("momentum") and not kw.get("weight_decay")
            and not kw.get("maximize") and not kw.get("nesterov"))


def needs_optimizer(config: AMEConfig, steps: Sequence[AMEStep]) -> bool:
    """Whether merging along ``steps`` builds a torch optimizer (plain SGD steps of lr 1 do not:
    :meth:`AMEStepper.step` applies them itself)."""
    return bool(steps) and not (is_plain_sgd(config) and all(s.lr == 1.0 for s in steps))


def load_optimizer_support() -> None:
    """Import ``torch._dynamo`` now, on the caller's thread: torch.optim imports it when the first
    optimizer is built (0.8 s here, once per process). Left to the first merge worker, the import
    ran beside the other workers and took longer: AdamW-AME 1 epoch on 4 x 309 MiB, 1.73-2.12 s with
    the import inside, against 0.68-0.75 s after it (measured one merge per process)."""
    import torch._dynamo  # noqa: F401 - the import is the point


def is_exact_soup(config: AMEConfig, n_ingredients: int) -> bool:
    """True when the config is spec special case 1 (SGD, lr 1 constant, zeta 1, one epoch, fixed
    pivot, B dividing N, no momentum / weight decay): the result is exactly the uniform average,
    which the engine then computes in one pass instead of N optimizer steps."""
    return (config.method is None and is_plain_sgd(config) and config.lr == 1.0 and config.lr_schedule == "constant"
            and not callable(config.amplification) and config.amplification == 1 and config.epochs == 1
            and not config.adaptive_pivot and n_ingredients % (config.batch_size or n_ingredients) == 0)


class AMEStepper:
    """The merge state of one or more tensors, advanced one :class:`AMEStep` at a time.

    ``init`` holds w_0 for each tensor (float, any device); the stepper owns fresh copies in the
    config's state dtype (float32 for a half compute dtype: see :attr:`AMEConfig.torch_state_dtype`).
    ``state_dict`` / ``load_state_dict`` capture weights AND optimizer state (greedy AME).
    """

    def __init__(self, init: Sequence[torch.Tensor], config: AMEConfig, keys: Sequence[str] = (),
                 positions: Sequence[float] = (), has_base: bool = False):
        self.config = config
        self.has_base = has_base  # the pivot is a base checkpoint (methods with an optional base use it)
        # a merge method builds each step's pseudogradient (keys name the tensors: seeds of random drops)
        self.method = get_method(config.method) if config.method is not None else None
        self.method_params = config.method_arguments()
        self.keys = list(keys) or [f"tensor{k}" for k in range(len(init))]
        self.positions = list(positions) or [0.0] * len(init)  # layer position 0..1 (mergekit's gradient t)
        # w_0 is rounded through the compute dtype first: the inputs a method sees are in that dtype (as
        # mergekit loads them), so w = w_0 - g must start from the same value
        compute, state = config.torch_compute_dtype, config.torch_state_dtype
        self.weights: List[torch.Tensor] = [w.detach().to(compute).to(state, copy=True) for w in init]
        # The fixed pivot is only kept when it is used.
        self.pivots: Optional[List[torch.Tensor]] = None if config.adaptive_pivot else [w.clone() for w in self.weights]
        self._grads = [torch.empty_like(w) for w in self.weights]
        for w, g in zip(self.weights, self._grads):
            w.grad = g
        self._optimizer: Optional[torch.optim.Optimizer] = None  # built at the first step that needs it
        self._plain = is_plain_sgd(config)
        self._drew = False  # the last step's method drew random numbers (DARE, DELLA, ...)
        self._converged = False  # ... or met its own tolerance on every tensor

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer, built on first use: its constructor imports ``torch._dynamo`` (about a
        second, once per process), which a merge of plain SGD steps of lr 1 never needs."""
        if self._optimizer is None:
            self._optimizer = _build_fast(self.config, self.weights)
        return self._optimizer

    @torch.no_grad()
    def step(self, step: AMEStep, ingredients: Sequence[Sequence[torch.Tensor]]) -> None:
        """Apply ``step``; ``ingredients[k][j]`` is ingredient j's copy of tensor k."""
        scale = step.scale / len(step.batch)
        for k, (w, g) in enumerate(zip(self.weights, self._grads)):
            p = w if self.pivots is None else self.pivots[k]
            if self.method is not None:
                g.copy_(self._method_gradient(p, ingredients[k], step, k)).mul_(step.scale)
                if w.grad is not g:
                    w.grad = g
                continue
            # g = scale * sum_j (p - x_j): each difference is exact 0 where x_j == p, so identical
            # ingredients give a zero pseudogradient (adaptive optimizers would amplify rounding).
            for i, j in enumerate(step.batch):
                x = self._load(ingredients[k][j], g)
                if i == 0:
                    torch.sub(p, x, out=g)
                else:
                    g.add_(p).sub_(x)
            g.mul_(scale)
            if w.grad is not g:  # an optimizer may have replaced .grad; keep ours
                w.grad = g
        if self._plain and step.lr == 1.0 and self._optimizer is None:
            for w, g in zip(self.weights, self._grads):  # SGD's update w - lr g with lr 1: the same bits
                w.sub_(g)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = step.lr
        self.optimizer.step()

    def _method_gradient(self, p: torch.Tensor, copies: Sequence[torch.Tensor], step: AMEStep, k: int) -> torch.Tensor:
        def get(i: int) -> torch.Tensor:
            return self._load(copies[step.batch[i]], p, copy=True)

        ctx = MethodContext(p, get, step.batch, self.method_params, int(self.config.seed), self.keys[k], step.t,
                            self.positions[k], has_base=self.has_base, dtype=self.config.torch_compute_dtype)
        g = self.method.fn(ctx)
        self._drew = self._drew or ctx.drew
        self._converged = self._converged and ctx.converged
        return g

    def _load(self, x: torch.Tensor, like: torch.Tensor, copy: bool = False) -> torch.Tensor:
        """An ingredient's copy as the merge reads it: rounded to a half compute dtype when stored in
        another dtype at least as wide (mergekit's ``dtype`` is the dtype tensors are loaded in), then
        in the state dtype on the merge's device."""
        compute = self.config.torch_compute_dtype
        if compute != like.dtype and x.dtype != compute and x.dtype.itemsize >= compute.itemsize:
            x = x.to(compute)  # bf16 -> fp16 too: same width, other range and precision
        return x.to(device=like.device, dtype=like.dtype, copy=copy, non_blocking=not copy)

    def run(self, steps: Sequence[AMEStep], ingredients: Sequence[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        """Every step in turn; stops early at a fixed point (see :meth:`may_stop_after`): the remaining
        steps would repeat it on the same weights, so the result is the same to the bit. Also stops
        where the method says it converged (its own ``tol``, e.g. huber's: the robust preset's)."""
        for k, s in enumerate(steps):
            watch = self.may_stop_after(steps, k)
            before = [w.clone() for w in self.weights] if watch else None
            self._drew, self._converged = False, self.method is not None
            self.step(s, ingredients)
            if watch and not self._drew and (self._converged or all(map(torch.equal, self.weights, before))):
                break
        return self.weights

    def may_stop_after(self, steps: Sequence[AMEStep], k: int) -> bool:
        """Whether step k could be a fixed point: a stateless optimizer (plain SGD, lr 1) and every
        later step the same batch, lr and scale (the robust preset: 20 steps, usually still after the
        first). Then an unchanged state (and no random draw) means every later step is a no-op."""
        s = steps[k]
        return (self._plain and self._optimizer is None and s.lr == 1.0 and k + 1 < len(steps)
                and all((r.batch, r.lr, r.scale) == (s.batch, s.lr, s.scale) for r in steps[k + 1:]))

    def release(self) -> List[torch.Tensor]:
        """Drop optimizer state and buffers now and return the merged weights (detached).

        torch optimizers sit in reference cycles, so without this their state (several copies of
        the tensor) would live until the next garbage collection: memory would grow with the model.
        """
        out = [w.detach() for w in self.weights]
        for w in self.weights:
            w.grad = None
        if self._optimizer is not None:
            self._optimizer.state.clear()
            self._optimizer.param_groups.clear()
        self.weights, self._grads, self.pivots = [], [], None
        return out

    def state_dict(self) -> Dict[str, Any]:
        """A deep copy of the weights and the optimizer state."""
        opt = self.optimizer.state_dict()
        opt_copy = {"state": {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                              for k, s in opt["state"].items()},
                    "param_groups": [dict(g) for g in opt["param_groups"]]}
        return {"weights": [w.detach().clone() for w in self.weights], "optimizer": opt_copy}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with torch.no_grad():
            for w, v in zip(self.weights, state["weights"]):
                w.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])


def ame_merge_many(
    ingredients: Sequence[Sequence[torch.Tensor]],
    config: AMEConfig,
    *,
    names: Sequence[str] = (),
    bases: Optional[Sequence[torch.Tensor]] = None,
    device: Optional[torch.device] = None,
    keys: Sequence[str] = (),
    positions: Sequence[float] = (),
) -> List[torch.Tensor]:
    """Merge several tensors together: ``ingredients[k][j]`` is ingredient j's tensor k.

    Returns the merged tensors in ``config.compute_dtype`` (computed in the state dtype, rounded
    once). Equal, tensor for tensor, to calling
    :func:`ame_merge` on each tensor alone. ``names``: the ingredients' (a pivot may name one);
    ``keys`` and ``positions``: tensor k's name (seeding a method's random drops) and layer position
    (0 to 1, for per-layer parameter gradients), as a streamed merge passes them.
    """
    if not ingredients:
        return []
    n = len(ingredients[0])
    if any(len(xs) != n for xs in ingredients):
        raise ValueError("every tensor needs one copy per ingredient")
    config.validate()
    pivot = resolve_pivot(config.pivot, n, names)
    dtype = config.torch_state_dtype
    init = [initial_merge(xs, pivot, base=None if bases is None else bases[k], dtype=dtype, device=device)
            for k, xs in enumerate(ingredients)]
    stepper = AMEStepper(init, config, keys, positions, has_base=pivot.is_base)
    stepper.run(plan_steps(n, config), ingredients)
    return [w.to(config.torch_compute_dtype) for w in stepper.release()]


def ame_merge(
    ingredients: Sequence[torch.Tensor],
    config: AMEConfig,
    *,
    names: Sequence[str] = (),
    base: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Merge one tensor from its N ingredient copies (in the given order); returns compute dtype."""
    return ame_merge_many([ingredients], config, names=names, bases=None if base is None else [base], device=device)[0]
