"""Ordering, selection and greedy modes, scored with real evaluate metrics on real data."""
import json
import random
import warnings

import pytest
import torch

from hf_ame import AMEConfig, AMEMerger
from hf_ame.algorithm import AMEStepper, plan_steps
from hf_ame.checkpoints import Checkpoint
from hf_ame.ordering import greedy_ame, rank
from hf_ame.scoring import MetricError, ScoreCache, resolve_metric
from hf_ame.testing import make_family


def _manual_accuracy(path, ds):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path).eval()
    proc = AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        pred = model(**proc(images=list(ds["image"]), return_tensors="pt")).logits.argmax(-1)
    return float((pred == torch.tensor(list(ds["label"]))).float().mean())


def test_scores_ordering_top_k(digits, tmp_path):
    paths, val, _ = digits
    merger = AMEMerger.from_pretrained(paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = merger.score("accuracy", val, cache=tmp_path / "s.json", progress=False)
    assert scores == pytest.approx([_manual_accuracy(p, val) for p in paths])
    r = merger.merge(AMEConfig.soup(), order_by="accuracy", eval_dataset=val, top_k=2, output_dir=tmp_path / "top2",
                     score_cache=tmp_path / "s.json", progress=False)
    expected = sorted(range(4), key=lambda i: (-scores[i], i))
    assert [i.order for i in r.ingredients] == [expected.index(k) for k in range(4)]
    assert [i.kept for i in r.ingredients] == [k in expected[:2] for k in range(4)]
    assert r.report.ingredients == [paths[k] for k in expected[:2]]  # merged in that order
    assert r.scores["best_ingredient"] == {"id": paths[expected[0]], "score": max(scores)}
    assert r.scores["merged"] == pytest.approx(_manual_accuracy(r.output_dir, val))
    assert r.metric == {"name": "accuracy", "greater_is_better": True, "shipped": True}
    asc = merger.merge(AMEConfig.soup(), order_by="accuracy", eval_dataset=val, order="ascending", top_k=3,
                       output_dir=tmp_path / "asc", score_cache=tmp_path / "s.json", progress=False)
    worst_first = sorted(range(4), key=lambda i: (scores[i], i))
    assert asc.report.ingredients == [paths[k] for k in worst_first[:3]]


def test_rank_rules():
    assert rank([0.2, 0.9, 0.5]) == ([1, 2, 0], [1, 2, 0])
    assert rank([0.2, 0.9, 0.5], greater_is_better=False, top_k=2) == ([0, 2, 1], [0, 2])
    assert rank([0.2, 0.9, 0.5], greater_is_better=False, order="descending") == ([1, 2, 0], [1, 2, 0])
    assert rank([None, None], order="given") == ([0, 1], [0, 1])
    assert rank([0.5, 0.5, 0.7]) == ([2, 0, 1], [2, 0, 1])  # ties keep the given order
    with pytest.raises(ValueError, match="top_k: expected an integer >= 1"):
        rank([1.0], top_k=0)
    with pytest.raises(ValueError, match="order: expected one of best, descending, ascending, given"):
        rank([1.0], order="random")


def test_offline_metric_and_unknown_metric():
    # The suite runs with HF_HUB_OFFLINE=1: evaluate cannot reach the Hub, the shipped module is used.
    import hf_ame.scoring as scoring

    scoring._WARNED.discard("accuracy")
    with pytest.warns(UserWarning, match="using the copy shipped with hf_ame"):
        m = resolve_metric("accuracy")
    assert m.shipped and m.module.compute(predictions=[1, 0], references=[1, 1])["accuracy"] == 0.5
    with pytest.raises(MetricError, match=r"metric 'no_such_metric_xyz': evaluate.load failed .*\(shipped: accuracy, f1, perplexity"):
        resolve_metric("no_such_metric_xyz")
    assert resolve_metric("loss").greater_is_better is False
    assert resolve_metric("perplexity").greater_is_better is False


def test_score_cache_skips_second_evaluation(digits, tmp_path, monkeypatch):
    import hf_ame.merger as merger_module  # the name AMEMerger.score calls

    paths, val, _ = digits
    calls = []
    real = merger_module.load_model

    def counting(path, *a, **kw):
        calls.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(merger_module, "load_model", counting)
    merger = AMEMerger.from_pretrained(paths)
    cache = ScoreCache(tmp_path / "scores.json")
    first = merger.score("accuracy", val, cache=cache, progress=False)
    assert len(calls) == 4 and cache.misses == 4
    second = merger.score("accuracy", val, cache=ScoreCache(tmp_path / "scores.json"), progress=False)
    assert second == first and len(calls) == 4  # not evaluated again
    merger.score("accuracy", val.select(range(50)), cache=cache, progress=False)  # other data: evaluated
    assert len(calls) == 8
    data = json.loads((tmp_path / "scores.json").read_text())
    assert len(data) == 8 and {v["metric"] for v in data.values()} == {"accuracy"}


def test_greedy_soup_rejects_a_broken_ingredient(digits, tmp_path):
    from transformers import ViTForImageClassification

    from digits import DigitsSetup, vit_config

    paths, val, _ = digits
    broken = tmp_path / "broken"
    torch.manual_seed(123)
    from conftest import DIGITS_SETUP_KW

    ViTForImageClassification(vit_config(DigitsSetup(**DIGITS_SETUP_KW))).save_pretrained(broken)
    import shutil

    shutil.copy(f"{paths[0]}/preprocessor_config.json", broken)
    merger = AMEMerger.from_pretrained(paths + [str(broken)])
    r = merger.merge(order_by="accuracy", eval_dataset=val, greedy="soup", output_dir=tmp_path / "greedy",
                     score_cache=False, progress=False)
    kept = {i.id: i.kept for i in r.ingredients}
    assert kept[str(broken)] is False
    log = {e["candidate"]: e for e in r.greedy_log}
    assert log[str(broken)]["accepted"] is False
    best = max(i.score for i in r.ingredients)
    assert r.scores["merged"] >= best
    assert r.config.optimizer == "sgd" and r.greedy == "soup"
    assert r.report.ingredients == [e["candidate"] for e in r.greedy_log if e["accepted"]]


class _ScriptedSlot:
    """Scores a state by a script: lets a test reject exactly one chosen step."""

    def __init__(self, scores):
        self.scores = list(scores)

    def score(self, state):
        return self.scores.pop(0)


def test_greedy_ame_restores_weights_and_optimizer_state(families):
    ckpts = [Checkpoint(p) for p in families["bert"]]
    cfg = AMEConfig(optimizer="adam", lr=1e-2, epochs=2, batch_size=1, shuffle=True, seed=4)
    steps = plan_steps(4, cfg)
    # initial 0.5; step 1 improves, step 2 is worse (rejected), the rest improve
    script = [0.5, 0.6, 0.1] + [0.7 + 0.01 * i for i in range(len(steps) - 2)]
    state, best = greedy_ame(ckpts, cfg, _ScriptedSlot(script))
    assert best == pytest.approx(script[-1])
    # a run that never saw step 2
    names = [n for n, i in ckpts[0].tensors.items() if i.is_floating]
    xs = [[c.get_tensor(n) for c in ckpts] for n in names]
    from hf_ame.algorithm import soup

    ref = AMEStepper([soup(x) for x in xs], cfg)
    for s in [steps[0]] + steps[2:]:
        ref.step(s, xs)
    for n, w in zip(names, ref.weights):
        assert torch.equal(state[n], w), n
    # and it differs from a run that kept step 2
    full = AMEStepper([soup(x) for x in xs], cfg)
    full.run(steps, xs)
    assert any(not torch.equal(state[n], w) for n, w in zip(names, full.weights))


def test_greedy_ame_uses_layer_positions(families, tmp_path):
    """A per-layer (gradient) method parameter acts in greedy AME as in a streamed merge: with every
    step accepted, the two give the same tensors, and they differ from the parameter's t = 0 value."""
    from conftest import read_state

    base, *fts = families["llama"]
    ckpts = [Checkpoint(p) for p in fts]
    ramp = AMEConfig(optimizer="sgd", lr=1.0, epochs=1, batch_size=2, pivot="base", method="task_arithmetic",
                     method_kwargs={"weight": {"gradient": [0.2, 1.0]}})
    scores = [0.1 * i for i in range(len(plan_steps(3, ramp)) + 1)]  # every step better: all accepted
    state, _ = greedy_ame(ckpts, ramp, _ScriptedSlot(scores), base=Checkpoint(base))
    flat, _ = greedy_ame(ckpts, ramp.replace(method_kwargs={"weight": 0.2}), _ScriptedSlot(scores), base=Checkpoint(base))
    merger = AMEMerger.from_pretrained(fts, base_model=base)
    streamed = read_state(merger.merge(ramp, output_dir=tmp_path / "s", progress=False).output_dir)
    layered = [n for n in state if ".layers.1." in n]
    assert layered and all(torch.allclose(state[n], streamed[n], atol=1e-6) for n in state)
    assert all(not torch.allclose(state[n], flat[n]) for n in layered)


def test_greedy_ame_stops_at_non_finite_values(families, tmp_path):
    """A NaN in one ingredient stops greedy AME naming the model and the tensor (issue 12 item 4)."""
    import shutil

    from safetensors.torch import save_file

    from conftest import read_state
    from hf_ame import NonFiniteWeightsError

    bad = tmp_path / "bad"
    shutil.copytree(families["bert"][1], bad)
    state = read_state(bad)
    name = "bert.encoder.layer.0.output.dense.weight"
    state[name][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    ckpts = [Checkpoint(families["bert"][0]), Checkpoint(bad)]
    cfg = AMEConfig(optimizer="adam", lr=1e-2, epochs=1, batch_size=1, pivot="first")
    with pytest.raises(NonFiniteWeightsError, match=f"model '{bad}' has NaN or Inf values in tensor '{name}'"):
        greedy_ame(ckpts, cfg, _ScriptedSlot([0.5, 0.6, 0.7]))


def _text_set(n, seed):
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        words = [f"w{rng.randrange(40)}" for _ in range(6)]
        texts.append(" ".join(words))
        labels.append(int(sum(int(w[1:]) < 20 for w in words) > 3))
    return texts, labels


@pytest.fixture(scope="session")
def text_models(tmp_path_factory):
    """BERT classifiers with a real tokenizer, trained 0 / 30 / 120 steps on a small text set built here,
    and tiny Llama LMs trained 0 / 20 / 80 steps on its sentences."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("text")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]) + "\n")
    tok = BertTokenizer(str(vocab))
    train_t, train_y = _text_set(256, 0)
    val_t, val_y = _text_set(96, 1)
    enc = tok(train_t, padding=True, return_tensors="pt")
    bert_paths = make_family("bert", root / "bert", 3, seed=2, noise=0.0, num_labels=2)
    lm_paths = make_family("llama", root / "lm", 3, seed=2, noise=0.0, vocab_size=100)
    ids, mask, labels = enc["input_ids"], enc["attention_mask"], torch.tensor(train_y)

    def finetune(auto_cls, path, steps, batch, targets):
        model = auto_cls.from_pretrained(path)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(0)
        for _ in range(steps):
            b = torch.randint(0, 256, (batch,))
            loss = model(input_ids=ids[b], attention_mask=mask[b], labels=targets[b]).loss
            opt.zero_grad(); loss.backward(); opt.step()
        model.save_pretrained(path)
        tok.save_pretrained(path)

    for steps, p in zip((0, 30, 120), bert_paths):
        finetune(AutoModelForSequenceClassification, p, steps, 32, labels)
    for steps, p in zip((0, 20, 80), lm_paths):
        finetune(AutoModelForCausalLM, p, steps, 16, ids)  # next-token loss on the sentences
    val = Dataset.from_dict({"text": val_t, "label": val_y})
    return [str(p) for p in bert_paths], [str(p) for p in lm_paths], val


def test_text_classification_accuracy_and_macro_f1(text_models, tmp_path):
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    bert, _, val = text_models
    merger = AMEMerger.from_pretrained(bert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = merger.score("accuracy", val, cache=False, progress=False)
        f1 = merger.score("f1", val, metric_kwargs={"average": "macro"}, cache=False, progress=False)
    tok = AutoTokenizer.from_pretrained(bert[0])
    for p, a, f in zip(bert, acc, f1):
        model = AutoModelForSequenceClassification.from_pretrained(p).eval()
        with torch.no_grad():
            pred = model(**tok(list(val["text"]), padding=True, return_tensors="pt")).logits.argmax(-1)
        assert a == pytest.approx(float((pred == torch.tensor(list(val["label"]))).float().mean()))
        assert f == pytest.approx(f1_score(list(val["label"]), pred.tolist(), average="macro"))
    assert acc[2] > acc[0]  # training helped: the ranking has something to rank


def test_loss_metrics_rank_lower_is_better(text_models, tmp_path):
    _, lm, val = text_models
    merger = AMEMerger.from_pretrained(lm)
    losses = merger.score("loss", val, cache=False, progress=False)
    ppl = merger.score("perplexity", val, cache=False, progress=False)
    assert losses[2] < losses[1] < losses[0]
    assert ppl == pytest.approx([torch.tensor(x).exp().item() for x in losses], rel=1e-6)
    r = merger.merge(AMEConfig.soup(), order_by="loss", eval_dataset=val, top_k=2, output_dir=tmp_path / "lm",
                     score_cache=False, progress=False)
    assert r.report.ingredients == [lm[2], lm[1]] and r.ingredients[0].kept is False
    assert r.metric["greater_is_better"] is False and r.scores["best_ingredient"]["id"] == lm[2]


def test_callable_metric_and_errors(families, tmp_path):
    from datasets import Dataset

    calls = []

    def mean_first_weight(model, dataset):
        calls.append(1)
        return float(next(model.parameters()).mean())

    merger = AMEMerger.from_pretrained(families["bert"])
    ds = Dataset.from_dict({"x": [1, 2]})
    r = merger.merge(AMEConfig.soup(), order_by=mean_first_weight, eval_dataset=ds, top_k=3, output_dir=tmp_path / "o",
                     score_cache=tmp_path / "c.json", progress=False)
    assert len(calls) == 5 and sum(i.kept for i in r.ingredients) == 3  # 4 ingredients + the merged model
    with pytest.raises(ValueError, match="order_by: greedy modes, top_k, ordering and search need a metric"):
        merger.merge(top_k=2, output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="greedy: expected one of None, 'soup', 'ame'"):
        merger.merge(order_by=mean_first_weight, eval_dataset=ds, greedy="best", output_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="eval_dataset: scoring needs a dataset"):
        merger.merge(order_by="accuracy", output_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()
