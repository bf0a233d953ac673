"""F1 score, the harmonic mean of precision and recall (shipped with hf_ame for offline use; same
inputs and output as the Hub's ``evaluate-metric/f1``)."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * (precision * recall) / (precision + recall)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground truth labels.
    labels (list of int): labels to include when average is not 'binary'.
    pos_label (int): the positive class for binary F1. Default 1.
    average (str): 'binary' (default), 'micro', 'macro', 'weighted', 'samples' or None.
    sample_weight (list of float): sample weights.
Returns:
    f1 (float or array of float): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        # numpy only: scikit-learn is not a dependency of hf_ame (same results as sklearn's f1_score for
        # single-label inputs; a class with no true and no predicted sample scores 0, as sklearn's default)
        y, p = np.asarray(references), np.asarray(predictions)
        w = np.ones(len(y), dtype=np.float64) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if average == "binary":
            classes = [pos_label]
        elif labels is not None:
            classes = list(labels)
        else:
            classes = sorted(set(y.tolist()) | set(p.tolist()))
        if average == "samples":
            raise ValueError("f1: average='samples' is for multilabel inputs, which this metric does not take")
        tp = np.array([(w * ((p == c) & (y == c))).sum() for c in classes])
        fp = np.array([(w * ((p == c) & (y != c))).sum() for c in classes])
        fn = np.array([(w * ((p != c) & (y == c))).sum() for c in classes])
        if average == "micro":
            d = 2 * tp.sum() + fp.sum() + fn.sum()
            return {"f1": float(2 * tp.sum() / d) if d else 0.0}
        denom = 2 * tp + fp + fn
        per_class = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
        if average == "binary":
            return {"f1": float(per_class[0])}
        if average == "macro":
            return {"f1": float(per_class.mean())}
        if average == "weighted":
            support = tp + fn
            return {"f1": float((per_class * support).sum() / support.sum()) if support.sum() else 0.0}
        if average is None:
            return {"f1": per_class}
        raise ValueError(f"f1: average must be 'binary', 'micro', 'macro', 'weighted' or None, got {average!r}")
