"""Before and after cleaning: two runs' validation tables compared on the images both held out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.compare import before_after
from core.interpret import item_table

VOCAB = ["cat", "dog"]


def table(files: list[str], targets: list[int], predicted: list[int]):
    probs = np.eye(2)[predicted] * 0.8 + 0.1
    return item_table(probs, np.array(targets), files, VOCAB, multi_label=False)


def test_both_models_are_scored_on_the_shared_images_against_the_labels_as_they_are_now():
    # before: a.jpg was in dog/ but is a cat (the cleaner moved it), b.jpg was deleted, c and d stayed
    before = table(["/d/dog/a.jpg", "/d/dog/b.jpg", "/d/cat/c.jpg", "/d/dog/d.jpg", "/d/cat/e.jpg"],
                   [1, 1, 0, 1, 0], [0, 1, 0, 0, 0])
    moved = {Path("/d/dog/a.jpg"): {"action": "relabel", "now": Path("/d/cat/a.jpg")},
             Path("/d/dog/b.jpg"): {"action": "delete", "now": Path("/d/.trash/b.jpg")}}
    # after: its validation side holds a (now cat), c, d and a new f; e went to the training side
    after = table(["/d/cat/a.jpg", "/d/cat/c.jpg", "/d/dog/d.jpg", "/d/cat/f.jpg"], [0, 0, 1, 0], [0, 0, 1, 1])
    result = before_after(before, after, moved)
    assert result.n_images == 3 and result.n_valid_before == 4  # a, c, d; b is gone
    assert result.error_before == 1 / 3  # d predicted cat; a's "cat" is right against its label now
    assert result.error_after == 0.0
    assert result.confusion_before.tolist() == [[2, 0], [1, 0]]
    assert result.confusion_after.tolist() == [[2, 0], [0, 1]]


def test_nothing_to_compare_is_none():
    before = table(["/d/cat/x.jpg"], [0], [0])
    after = table(["/d/cat/y.jpg"], [0], [0])
    assert before_after(before, after, {}) is None
