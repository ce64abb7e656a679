"""Eagle3 draft vocabularies (issue 16, item 1): the most frequent supervised tokens of a
prepared dataset, and the d2t / t2d mappings in the engines' convention."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megaspark.data.draft_vocab import DraftVocab, select_draft_vocab, supervised_token_counts


def test_most_frequent_tokens_in_target_order():
    counts = np.array([0, 5, 1, 9, 5, 0, 2, 7])
    v = select_draft_vocab(counts, 4)
    # 3 (9), 7 (7), then the tie 1/4 (5): both; sorted by target id
    assert v.draft_to_target.tolist() == [1, 3, 4, 7]
    assert v.d2t.tolist() == [1, 2, 2, 4]  # target = draft + d2t[draft]
    assert (torch.arange(4) + v.d2t).tolist() == [1, 3, 4, 7]
    assert v.t2d.tolist() == [False, True, False, True, True, False, False, True]
    tie = select_draft_vocab(np.array([0, 5, 0, 9, 5]), 2)  # tie at 5: the smaller id wins
    assert tie.draft_to_target.tolist() == [1, 3]


def test_fewer_distinct_tokens_than_the_size_fill_with_small_ids():
    v = select_draft_vocab(np.array([0, 0, 3, 0, 1, 0]), 4)
    assert v.draft_to_target.tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match=r"\[1, 6\]"):
        select_draft_vocab(np.zeros(6), 7)


def test_d2t_round_trip_and_bad_mappings():
    v = select_draft_vocab(np.arange(50) % 7, 10)
    back = DraftVocab.from_d2t(v.d2t, 50)
    assert torch.equal(back.draft_to_target, v.draft_to_target) and torch.equal(back.t2d, v.t2d)
    with pytest.raises(ValueError, match="increasing"):
        DraftVocab.from_d2t(torch.tensor([0, -1]), 50)  # two draft ids on target 0
    with pytest.raises(ValueError, match="increasing"):
        DraftVocab.from_d2t(torch.tensor([0, 60]), 50)


def test_counts_are_the_supervised_tokens_of_the_prepared_data(tmp_path):
    from megaspark.data import indexed
    from megaspark.data.dataset import PreparedDataset

    rng = np.random.default_rng(0)
    records = []
    for _ in range(40):
        n = int(rng.integers(5, 30))
        ids = rng.integers(0, 97, n).tolist()
        mask = (rng.random(n) < 0.6).astype(int).tolist()
        records.append((ids, mask))
    info = indexed.write_split(tmp_path, "train", records, vocab_size=97)
    meta = {"tokenizer_vocab_size": 97, "model_vocab_size": 97, "pad_token_id": 0, "eos_token_id": 1,
            "storage": indexed.storage_meta({"train": info})}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    want = np.zeros(97, dtype=np.int64)
    ds = PreparedDataset(tmp_path, "train")
    for i in range(len(ds)):
        s = ds[i]
        ids, m = np.asarray(s["input_ids"]), np.asarray(s["loss_mask"], dtype=bool)
        np.add.at(want, ids[m], 1)
    got = supervised_token_counts(tmp_path, 97, chunk=17)  # chunks cut samples anywhere
    assert np.array_equal(got, want) and got.sum() == sum(sum(m) for _, m in records)
