"""Real fine-tuned ViT ingredients, built offline from scikit-learn's digits (1797 8x8 images).

As in the AME paper's class-exclusion experiment (ViT fine-tuned on CIFAR-10): one small ViT is
pretrained (supervised, all classes) on a split of the images, then K copies get a fresh 10-class
head and are fine-tuned, with different seeds, on shards that never show some of the classes.
Ingredients are saved with ``save_pretrained`` (plus a ViT image processor) and cached on disk,
keyed by every setting, so re-runs are instant.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

__all__ = ["DigitsSetup", "load_digits_splits", "build_digits_ingredients", "digits_base", "accuracy", "vit_config"]


BASE = "vit-digits-base"


@dataclass(frozen=True)
class DigitsSetup:
    """Every setting that shapes the ingredients (and so their cache key)."""

    n_models: int = 6
    unseen_fraction: float = 0.5  # fraction of the 10 classes each fine-tune never sees
    seed: int = 0
    hidden_size: int = 96
    layers: int = 2
    pretrain_epochs: int = 40
    finetune_epochs: int = 10
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    head_init: str = "shared"  # "shared": one fresh head init for all fine-tunes; "per-model": one each
    mask_unseen: bool = True  # softmax over the seen classes only while fine-tuning
    batch_size: int = 32
    version: int = 4  # bump when the recipe below changes, so caches rebuild

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def vit_config(setup: DigitsSetup):
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=setup.hidden_size,
                     num_hidden_layers=setup.layers, num_attention_heads=4, intermediate_size=2 * setup.hidden_size,
                     num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
                     architectures=["ViTForImageClassification"])


def load_digits_splits(seed: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, stratified splits of the digits: pretrain 30%, finetune 40%, validation 10%, test 20%.
    Images are (n, 3, 8, 8) floats (grey replicated to RGB, as image pipelines load images),
    normalised to mean 0.5 / std 0.5 of [0, 1]; labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1).expand(-1, 3, -1, -1).contiguous() / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = list(range(len(y)))
    rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=y)
    rest_y = y[rest]
    rest, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=rest_y)
    pre, fine = train_test_split(rest, test_size=4 / 7, random_state=seed, stratify=y[rest])
    return {name: (x[i], y[i]) for name, i in (("pretrain", pre), ("finetune", fine), ("validation", val), ("test", test))}


def _train(model, x, y, epochs: int, lr: float, batch_size: int, seed: int, allowed: Optional[List[int]] = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            b = perm[start:start + batch_size]
            logits = model(pixel_values=x[b]).logits
            if allowed is not None and len(allowed) > 1:
                # the model never learns about unseen classes: softmax over the seen ones (with a
                # single seen class that would leave no gradient, so then plain cross-entropy)
                mask = torch.full((10,), float("-inf"))
                mask[allowed] = 0.0
                logits = logits + mask
            loss = torch.nn.functional.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of a ViT classifier (a model or a folder) on images ``x``."""
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(model)
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        pred = model(pixel_values=x[start:start + batch_size]).logits.argmax(-1)
        correct += int((pred == y[start:start + batch_size]).sum())
    return correct / len(y)


def _classes_for(model_index: int, n_unseen: int, seed: int) -> List[int]:
    gen = torch.Generator().manual_seed(seed * 7919 + model_index)
    unseen = set(torch.randperm(10, generator=gen)[:n_unseen].tolist())
    return [c for c in range(10) if c not in unseen]


def build_digits_ingredients(root: Union[str, Path], setup: DigitsSetup = DigitsSetup(), *, verbose: bool = True) -> List[Path]:
    """Build (or reuse from ``root/<settings hash>``) ``setup.n_models`` fine-tuned ViT folders."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    folder = Path(root) / f"digits-{setup.key()}"
    paths = [folder / f"vit-digits-ft-{i}" for i in range(setup.n_models)]
    if (folder / "done.json").exists() and all((p / "model.safetensors").exists() for p in paths + [folder / BASE]):
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    splits = load_digits_splits(setup.seed)
    torch.manual_seed(setup.seed)
    backbone = ViTForImageClassification(vit_config(setup))
    if verbose:
        print(f"[digits] pretraining a {sum(p.numel() for p in backbone.parameters()) / 1e3:.0f}k-parameter ViT "
              f"on {len(splits['pretrain'][1])} images (all classes)", flush=True)
    _train(backbone, *splits["pretrain"], setup.pretrain_epochs, setup.lr, setup.batch_size, setup.seed)
    pre_state = {k: v.clone() for k, v in backbone.state_dict().items()}
    xf, yf = splits["finetune"]
    n_unseen = int(round(10 * setup.unseen_fraction))
    processor = ViTImageProcessor(do_resize=False, do_rescale=True, rescale_factor=1 / 16, do_normalize=True,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 8, "width": 8})
    # the base model of task-vector merges: the pretrained ViT with the head the fine-tunes start from
    base = ViTForImageClassification(vit_config(setup))
    base.load_state_dict(pre_state)
    torch.manual_seed(setup.seed * 1000)
    base.classifier.reset_parameters()
    base.save_pretrained(folder / BASE)
    processor.save_pretrained(folder / BASE)
    meta = []
    for i, path in enumerate(paths):
        classes = _classes_for(i, n_unseen, setup.seed)
        keep = torch.isin(yf, torch.tensor(classes))
        # each fine-tune sees a different random half of the allowed images
        gen = torch.Generator().manual_seed(setup.seed * 104729 + i)
        idx = keep.nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)[: max(1, len(idx) // 2 + 1)]]
        model = ViTForImageClassification(vit_config(setup))
        model.load_state_dict(pre_state)
        # a fresh 10-class head, as in the paper; "shared": the same fresh init for every fine-tune,
        # as fine-tunes of one pretrained model with a new head usually start from one checkpoint
        torch.manual_seed(setup.seed * 1000 + (0 if setup.head_init == "shared" else i + 1))
        model.classifier.reset_parameters()
        _train(model, xf[idx], yf[idx], setup.finetune_epochs, setup.finetune_lr, setup.batch_size, setup.seed + i,
               classes if setup.mask_unseen else None)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        meta.append({"path": path.name, "classes": classes, "images": int(len(idx))})
        if verbose:
            print(f"[digits] fine-tuned {path.name} on classes {classes} ({len(idx)} images)", flush=True)
    (folder / "done.json").write_text(json.dumps({"setup": asdict(setup), "models": meta}, indent=2))
    return paths


def digits_base(paths: List[Path]) -> Path:
    """The base model beside ingredients built by :func:`build_digits_ingredients`: the pretrained
    ViT with the (shared) fresh head the fine-tunes started from."""
    return Path(paths[0]).parent / BASE


def digits_dataset(split: str = "validation", seed: int = 0):
    """A ``datasets.Dataset`` of one split: ``image`` (8x8 PIL images, pixel values 0..16 as the
    saved image processor expects) and ``label`` (int)."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image

    x, y = load_digits_splits(seed)[split]
    raw = ((x[:, 0] * 0.5 + 0.5) * 16.0).round().clamp(0, 16).to(torch.uint8).numpy()
    from PIL import Image as PILImage

    images = [PILImage.fromarray(np.ascontiguousarray(a), mode="L").convert("RGB") for a in raw]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": images, "label": y.tolist()}, features=features)


def export_examples(folder: Union[str, Path], setup: DigitsSetup = DigitsSetup(), *, cache: Union[str, Path, None] = None,
                    verbose: bool = False) -> Path:
    """Put the digits ingredients at stable names for the example recipes (``recipes/*.yaml`` read
    ``${HF_AME_EXAMPLES}``): ``vit-digits-ft-{i}`` folders and the ``digits-validation`` /
    ``digits-test`` splits (``Dataset.save_to_disk``). Returns ``folder``."""
    folder = Path(folder)
    paths = build_digits_ingredients(cache or folder / ".build", setup, verbose=verbose)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "examples.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == setup.key():
        return folder
    for p in paths:
        dest = folder / p.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(p, dest)
    for split in ("validation", "test"):
        dest = folder / f"digits-{split}"
        shutil.rmtree(dest, ignore_errors=True)
        digits_dataset(split, setup.seed).save_to_disk(str(dest))
    stamp.write_text(json.dumps({"key": setup.key(), "models": [p.name for p in paths]}))
    return folder
