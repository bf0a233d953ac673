"""Perplexity and mean token loss from per-sequence negative log-likelihoods (shipped with hf_ame).

Unlike the Hub's ``evaluate-metric/perplexity`` (which loads a model by name), this module takes
what a causal LM already computed: for each sequence, the summed token NLL (nats) and its number of
predicted tokens. perplexity = exp(sum(nll) / sum(tokens)); lower is better.
"""
import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(mean token negative log-likelihood); loss = that mean, in nats per token."
_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): summed negative log-likelihood of each sequence, in nats.
    tokens (list of int): number of predicted tokens of each sequence.
Returns:
    perplexity (float), loss (float): lower is better.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, tokens):
        total = sum(tokens)
        if total <= 0:
            raise ValueError("perplexity: no predicted tokens")
        loss = float(sum(nll)) / total
        return {"perplexity": math.exp(loss), "loss": loss}
