"""F1 score, the harmonic mean of precision and recall (shipped with hf_ame for offline use; same
inputs and output as the Hub's ``evaluate-metric/f1``)."""
import datasets
import evaluate
from sklearn.metrics import f1_score

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
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                         sample_weight=sample_weight)
        return {"f1": float(score) if getattr(score, "size", 1) == 1 else score}
