"""Scoring ingredients with ``evaluate`` metrics on a ``datasets`` split, cached on disk.

A metric is an ``evaluate`` metric name (``evaluate.load``; when the Hub cannot be reached the
copies shipped in ``hf_ame/metrics`` are used, with a warning), an ``evaluate.EvaluationModule``,
or a callable ``(model, dataset) -> float``. Image and text classifiers go through
``evaluate.evaluator`` (the model plus its image processor / tokenizer); causal LMs are scored by
mean token loss / perplexity on a text column; other cases run batched predictions here and hand
them to ``metric.compute``.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from .errors import MetricError
from .tasks import pipeline_tag_for

__all__ = [
    "MetricError",
    "DatasetRef",
    "Metric",
    "resolve_metric",
    "resolve_dataset",
    "infer_task",
    "score_model",
    "ScoreCache",
    "LOWER_IS_BETTER",
    "SHIPPED_METRICS",
]

SHIPPED_DIR = Path(__file__).parent / "metrics"
SHIPPED_METRICS = tuple(sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / f"{p.name}.py").exists()))
LOWER_IS_BETTER = {"loss", "perplexity", "eval_loss", "mse", "mae", "rmse", "wer", "cer", "ter"}
_LM_METRICS = {"loss", "perplexity"}
_WARNED: set = set()  # metric names already warned about (one line per process)


# ------------------------------------------------------------------------------------------- metric
@dataclass
class Metric:
    """A resolved metric: what to call, which key of its result to read, and its direction."""

    name: str
    module: Any = None  # evaluate.EvaluationModule
    fn: Optional[Callable[[Any, Any], float]] = None
    key: Optional[str] = None
    greater_is_better: bool = True
    kwargs: Dict[str, Any] = field(default_factory=dict)
    shipped: bool = False

    def cache_id(self) -> str:
        if self.fn is not None:
            return f"callable:{getattr(self.fn, '__module__', '')}.{getattr(self.fn, '__qualname__', repr(self.fn))}"
        return json.dumps({"name": self.name, "key": self.key, "kwargs": self.kwargs,
                           "config": getattr(self.module, "config_name", None)}, sort_keys=True, default=str)


def _load_shipped(name: str):
    import evaluate

    return evaluate.load(str(SHIPPED_DIR / name))


def resolve_metric(metric: Union[str, Any, Callable], *, greater_is_better: Optional[bool] = None,
                   metric_key: Optional[str] = None, metric_kwargs: Optional[Mapping[str, Any]] = None) -> Metric:
    """Turn ``order_by`` into a :class:`Metric` (see the module docstring)."""
    import evaluate

    kwargs = dict(metric_kwargs or {})
    if isinstance(metric, str):
        name = metric
        if name in _LM_METRICS:  # computed from the model's own token losses
            return Metric(name, _load_shipped("perplexity"), key=name,
                          greater_is_better=bool(greater_is_better) if greater_is_better is not None else False,
                          kwargs=kwargs, shipped=True)
        try:
            module = evaluate.load(name)
            shipped = False
        except Exception as exc:  # noqa: BLE001 - offline, missing, or a network error
            if name not in SHIPPED_METRICS:
                raise MetricError(
                    f"metric {name!r}: evaluate.load failed "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}) and hf_ame ships no "
                    f"offline copy of it (shipped: {', '.join(SHIPPED_METRICS)}, plus 'loss'); pass an "
                    "evaluate.EvaluationModule or a callable (model, dataset) -> float"
                ) from None
            if name not in _WARNED:
                _WARNED.add(name)
                warnings.warn(f"hf_ame: evaluate could not load {name!r} from the Hub ({type(exc).__name__}); "
                              "using the copy shipped with hf_ame", UserWarning, stacklevel=4)
            module, shipped = _load_shipped(name), True
        gib = greater_is_better if greater_is_better is not None else name not in LOWER_IS_BETTER
        return Metric(name, module, key=metric_key or name, greater_is_better=gib, kwargs=kwargs, shipped=shipped)
    if isinstance(metric, evaluate.EvaluationModule):
        name = metric.name
        gib = greater_is_better if greater_is_better is not None else name not in LOWER_IS_BETTER
        return Metric(name, metric, key=metric_key or name, greater_is_better=gib, kwargs=kwargs)
    if callable(metric):
        name = getattr(metric, "__name__", "custom")
        gib = greater_is_better if greater_is_better is not None else name not in LOWER_IS_BETTER
        return Metric(name, fn=metric, greater_is_better=gib)
    raise MetricError("order_by: expected a metric name, an evaluate.EvaluationModule or a callable, "
                      f"got {type(metric).__name__}")


# ------------------------------------------------------------------------------------------ dataset
@dataclass
class DatasetRef:
    """A dataset a recipe can name: ``datasets.load_dataset(path, name, split=..., data_files=..., revision=...)``
    plus the columns to read (``input_column``: image or text; ``label_column``)."""

    path: str
    name: Optional[str] = None
    split: str = "validation"
    data_files: Optional[Union[str, List[str], Dict[str, Any]]] = None
    revision: Optional[str] = None
    input_column: Optional[str] = None
    label_column: Optional[str] = None

    def load(self):
        from datasets import DatasetDict, load_dataset, load_from_disk

        folder = Path(self.path).expanduser()
        if folder.is_dir() and ((folder / "state.json").exists() or (folder / "dataset_dict.json").exists()):
            ds = load_from_disk(str(folder))  # a folder written by Dataset.save_to_disk
            if isinstance(ds, DatasetDict):
                if self.split not in ds:
                    raise MetricError(f"eval_dataset: {self.path!r} has no split {self.split!r} "
                                      f"(splits: {', '.join(ds)})")
                ds = ds[self.split]
            return ds
        try:
            return load_dataset(self.path, self.name, split=self.split, data_files=self.data_files,
                                revision=self.revision)
        except Exception as exc:  # noqa: BLE001
            raise MetricError(f"eval_dataset: cannot load {self.path!r} split {self.split!r}: "
                              f"{type(exc).__name__}: {exc}") from None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def resolve_dataset(dataset: Any):
    """A ``datasets.Dataset`` from a Dataset, a :class:`DatasetRef` or a mapping of its fields."""
    from datasets import Dataset

    if isinstance(dataset, Dataset):
        return dataset, None
    if isinstance(dataset, Mapping):
        unknown = set(dataset) - set(DatasetRef.__dataclass_fields__)
        if unknown:
            raise MetricError(f"eval_dataset: unknown field {sorted(unknown)[0]!r}; "
                              f"expected {', '.join(DatasetRef.__dataclass_fields__)}")
        dataset = DatasetRef(**dataset)
    if isinstance(dataset, DatasetRef):
        return dataset.load(), dataset
    raise MetricError(f"eval_dataset: expected a datasets.Dataset or a dataset reference, got {type(dataset).__name__}")


def dataset_fingerprint(ds) -> str:
    fp = getattr(ds, "_fingerprint", None)
    if fp:
        return str(fp)
    return hashlib.sha1(repr((len(ds), ds.column_names, ds[:3] if len(ds) else None)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- models
def infer_task(config: Any) -> str:
    """'image-classification', 'text-classification' or 'causal-lm' from the architecture name."""
    archs = list(getattr(config, "architectures", None) or [])
    tag = pipeline_tag_for(archs)
    if tag in ("image-classification", "text-classification"):
        return tag
    if tag == "text-generation":
        return "causal-lm"
    raise MetricError(f"cannot infer a scoring task from architectures {archs!r}; "
                      "pass order_by=<callable (model, dataset) -> float>")


def _pick(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise MetricError(f"eval_dataset: no column {wanted!r} ({what}); columns: {', '.join(columns)}")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise MetricError(f"eval_dataset: cannot find the {what} column among {', '.join(columns)}; name it with "
                      f"{'input_column' if what != 'label' else 'label_column'}=")


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _processor_for(model_path: Optional[Union[str, Path]], task: str):
    if model_path is None:
        return None
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        if task == "image-classification":
            return AutoImageProcessor.from_pretrained(model_path)
        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - no processor files: fall back to tensors in the dataset
        return None


@torch.no_grad()
def score_model(model, dataset, metric: Metric, *, task: Optional[str] = None, processor: Any = None,
                model_path: Optional[Union[str, Path]] = None, input_column: Optional[str] = None,
                label_column: Optional[str] = None, batch_size: int = 32) -> float:
    """The metric's value for ``model`` on ``dataset`` (a float; see :class:`Metric` for its direction)."""
    model.eval()
    if metric.fn is not None:
        value = metric.fn(model, dataset)
        return float(value)
    task = task or infer_task(model.config)
    if processor is None:
        processor = _processor_for(model_path, task)
    cols = list(dataset.column_names)
    if task == "causal-lm":
        col = _pick(cols, input_column, ("text", "content", "sentence"), "text")
        return _lm_score(model, dataset, metric, processor, col, batch_size)
    if metric.name in _LM_METRICS:
        raise MetricError(f"metric {metric.name!r} needs a causal LM; this model is a {task} model")
    if task == "image-classification":
        icol = _pick(cols, input_column, ("image", "img", "pixel_values"), "image")
    else:
        icol = _pick(cols, input_column, ("text", "sentence", "content", "input_ids"), "text")
    lcol = _pick(cols, label_column, ("label", "labels", "target"), "label")
    use_evaluator = (processor is not None and not metric.kwargs and icol not in ("pixel_values", "input_ids"))
    if use_evaluator:
        return _evaluator_score(model, dataset, metric, processor, task, icol, lcol)
    preds = _predict(model, dataset, processor, task, icol, batch_size)
    result = metric.module.compute(predictions=preds, references=list(dataset[lcol]), **metric.kwargs)
    return _read(result, metric)


def _read(result: Mapping[str, Any], metric: Metric) -> float:
    if metric.key in result:
        return float(result[metric.key])
    keys = [k for k in result if not k.endswith(("_in_seconds", "_per_second"))]
    if len(keys) == 1:
        return float(result[keys[0]])
    raise MetricError(f"metric {metric.name!r} returned {sorted(result)}; choose one with metric_key=")


def _evaluator_score(model, dataset, metric, processor, task, icol, lcol) -> float:
    from evaluate import evaluator

    dev = _model_device(model)
    kwargs: Dict[str, Any] = ({"feature_extractor": processor} if task == "image-classification"
                              else {"tokenizer": processor})
    label2id = getattr(model.config, "label2id", None) or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluator(task).compute(model_or_pipeline=model, data=dataset, metric=metric.module, input_column=icol,
                                         label_column=lcol, label_mapping=label2id,
                                         device=dev.index if dev.type == "cuda" else -1, **kwargs)
    return _read(result, metric)


def _predict(model, dataset, processor, task, icol, batch_size) -> List[int]:
    dev = _model_device(model)
    preds: List[int] = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start:start + batch_size][icol]
        if icol == "pixel_values":
            inputs = {"pixel_values": torch.as_tensor(batch, dtype=model.dtype)}
        elif icol == "input_ids":
            inputs = {"input_ids": torch.as_tensor(batch)}
        elif task == "image-classification":
            if processor is None:
                raise MetricError("image scoring needs an image processor saved with the model, "
                                  "or a pixel_values column")
            inputs = processor(images=batch, return_tensors="pt")
        else:
            if processor is None:
                raise MetricError("text scoring needs a tokenizer saved with the model, or an input_ids column")
            inputs = processor(batch, padding=True, truncation=True, return_tensors="pt")
        inputs = {k: (v.to(dev, dtype=model.dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}
        preds.extend(model(**inputs).logits.argmax(-1).tolist())
    return preds


def _lm_score(model, dataset, metric, tokenizer, col, batch_size) -> float:
    dev = _model_device(model)
    nll: List[float] = []
    ntok: List[int] = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start:start + batch_size][col]
        if col == "input_ids":
            ids = [torch.as_tensor(x) for x in batch]
            width = max(len(x) for x in ids)
            input_ids = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in ids])
            mask = torch.stack([torch.nn.functional.pad(torch.ones_like(x), (0, width - len(x))) for x in ids])
        else:
            if tokenizer is None:
                raise MetricError("causal-LM scoring needs a tokenizer saved with the model, or an input_ids column")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            enc = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
            input_ids, mask = enc["input_ids"], enc["attention_mask"]
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
        m = mask[:, 1:].float()
        nll.extend((lp * m).sum(1).tolist())
        ntok.extend(m.sum(1).long().tolist())
    result = metric.module.compute(nll=nll, tokens=ntok)
    return float(result[metric.key or "loss"])


# -------------------------------------------------------------------------------------------- cache
def default_cache_path() -> Path:
    root = os.environ.get("HF_AME_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hf_ame")
    return Path(root) / "scores.json"


def checkpoint_fingerprint(path: Union[str, Path], sha: Optional[str] = None) -> str:
    """The Hub commit sha when known, else a hash of the folder's weight and config files' names,
    sizes and modification times (cheap: no weight bytes are read)."""
    if sha:
        return f"sha:{sha}"
    p = Path(path)
    parts = []
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name == "config.json"):
            st = f.stat()
            parts.append((f.name, st.st_size, st.st_mtime_ns))
    return "files:" + hashlib.sha1(json.dumps([str(p.resolve()), parts]).encode()).hexdigest()


class ScoreCache:
    """Scores on disk: {key: {"score", "metric", "model", "seconds"}}. Keyed by (ingredient
    fingerprint, dataset fingerprint, metric, task, columns). ``path=None`` -> ``$HF_AME_CACHE/scores.json``
    (default ``~/.cache/huggingface/hf_ame``); ``enabled=False`` never reads nor writes."""

    def __init__(self, path: Union[str, Path, None] = None, enabled: bool = True):
        self.path = Path(path) if path is not None else default_cache_path()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_fp: str, dataset_fp: str, metric: Metric, extra: Mapping[str, Any]) -> str:
        return hashlib.sha1(json.dumps([model_fp, dataset_fp, metric.cache_id(), dict(extra)], sort_keys=True,
                                       default=str).encode()).hexdigest()

    def _read(self) -> Dict[str, Any]:
        """The cache's entries, checked: a malformed file is named (not silently overwritten, nor a
        bare AttributeError or KeyError later)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            raise self._malformed(f"cannot be read as JSON ({type(exc).__name__}: {exc})") from None
        if not isinstance(data, dict):
            raise self._malformed(f"is a JSON {type(data).__name__}, not an object of entries")
        for key, entry in data.items():
            score = entry.get("score") if isinstance(entry, dict) else None
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise self._malformed(f"entry {key!r} has no numeric score ({repr(entry)[:80]})")
        return data

    def _malformed(self, what: str) -> MetricError:
        return MetricError(f"score cache {self.path} {what}; delete the file, or score without the cache "
                           "(score_cache=False, hf-ame score --no-cache)")

    def get(self, key: str) -> Optional[float]:
        if not self.enabled:
            return None
        hit = self._read().get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(hit["score"])

    def put(self, key: str, score: float, **info: Any) -> None:
        if not self.enabled:
            return
        data = self._read()
        data[key] = {"score": score, **info}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def release_memory() -> None:
    """Return freed memory now (CPU and GPU): call after dropping the last reference to a scored model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
