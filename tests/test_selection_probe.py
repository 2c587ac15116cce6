"""The ablations' selection score: a linear probe fitted on a set's train split and scored on its val split; the
test split is never decoded."""

from types import SimpleNamespace

import numpy as np
import pytest

from mmkd.evaluation.dataset import ArrayImages, EvalDataset
from mmkd.evaluation.selection import Selection, SelectionError, selection_sets, set_probe_outcomes

CLASSES = ["a", "b", "c"]


class Logged(ArrayImages):
    """ArrayImages that records which images were decoded."""

    def __init__(self, array):
        super().__init__(array)
        self.loaded: set[int] = set()

    def load(self, i):
        self.loaded.add(int(i))
        return super().load(i)


class ClassEncoder:
    """Reads the class from the image's mean grey level (10, 20, 30) and embeds it as a noisy one-hot."""

    name, embed_dim = "fake", 4

    def __init__(self, noise: float):
        self.noise, self.rng = noise, np.random.default_rng(0)

    def encode_pil(self, images, batch):
        level = np.array([np.asarray(im, np.float64).mean() for im in images])
        cls = np.clip(np.round(level / 10).astype(int) - 1, 0, 2)
        x = np.eye(self.embed_dim)[cls] + self.noise * self.rng.standard_normal((len(images), self.embed_dim))
        return x.astype(np.float32)


def dataset(n_train=10, n_val=4, n_test=5):
    labels, split = [], []
    for s, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for c in range(3):
            labels += [c] * n
            split += [s] * n
    labels = np.array(labels)
    images = np.stack([np.full((8, 8), 10 * (y + 1), np.uint8) for y in labels])
    ds = EvalDataset("toy", "xray", Logged(images), item_image=np.arange(len(labels)), item_split=np.array(split),
                     labels=labels, classes=CLASSES)
    return ds


def one_set(ds, max_items=100):
    entry = SimpleNamespace(name="toy", tasks=["zeroshot", "probe"], splits=["train", "val", "test"], multilabel=False,
                            prompts={c: [f"a {c}"] for c in CLASSES})
    return selection_sets([entry], lambda e: ds, max_items, seed=0)


def test_probe_on_val_is_fitted_on_train_and_never_decodes_a_test_image():
    ds = dataset()
    (s,) = one_set(ds)
    out = set_probe_outcomes(ClassEncoder(0.05), s, batch=16, seed=0, head_seeds=3, c_grid=(0.1, 1.0, 10.0))
    assert out.shape == (12,) and np.array_equal(out, np.ones(12))  # separable: every val item right, every head
    test = set(np.flatnonzero(ds.item_split == "test").tolist())
    assert ds.images.loaded and not (ds.images.loaded & test)
    # Selection concatenates per set, in set order, one outcome per val item: the gate's paired bootstrap applies
    assert np.array_equal(Selection([s]).probe_outcomes(ClassEncoder(0.05), 16, 0, 3, (1.0,)), out)


def test_probe_outcomes_are_the_mean_over_head_seeds_and_follow_the_labels():
    ds = dataset()
    (s,) = one_set(ds)
    noisy = set_probe_outcomes(ClassEncoder(1.5), s, batch=16, seed=0, head_seeds=3, c_grid=(1.0,))
    assert set(np.unique(noisy * 3).round(6)) <= {0.0, 1.0, 2.0, 3.0}  # a mean of three 0/1 heads
    assert 0 < noisy.mean() < 1
    ds.labels[np.flatnonzero(ds.item_split == "val")] = (ds.labels[ds.item_split == "val"] + 1) % 3
    (wrong,) = one_set(ds)
    assert set_probe_outcomes(ClassEncoder(0.05), wrong, 16, 0, 1, (1.0,)).sum() == 0  # val labels decide


def test_a_set_without_train_items_is_refused_by_name():
    ds = dataset(n_train=0)
    (s,) = one_set(ds)
    with pytest.raises(SelectionError, match="toy: no train items"):
        set_probe_outcomes(ClassEncoder(0.05), s, 16, 0, 1, (1.0,))
