"""Accuracy: the fraction of predictions equal to their references (shipped with hf_ame for offline use;
same inputs and output as the Hub's ``evaluate-metric/accuracy``)."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = (TP + TN) / (TP + TN + FP + FN): the proportion of correct predictions."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground truth labels.
    normalize (bool): fraction (True, default) or count (False) of correct predictions.
    sample_weight (list of float): sample weights, default None.
Returns:
    accuracy (float): in [0, 1] when normalize is True.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        # numpy only: scikit-learn is not a dependency of hf_ame (same result as sklearn's accuracy_score)
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        w = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * w).sum())
        return {"accuracy": total / float(w.sum()) if normalize else total}
