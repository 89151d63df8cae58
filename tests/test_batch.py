import numpy as np
import pytest

from kvcells.batch import Batch


def test_add_and_split_keep_batch_order():
    b = Batch()
    for i in range(7):
        b.add(100 + i, i, [0, 1] if i % 2 else 0, logits=i in (2, 6))
    assert len(b) == 7 and b.n_outputs == 2
    parts = list(b.split(3))
    assert [len(t) for t, _, _, _ in parts] == [3, 3, 1]
    tokens = np.concatenate([t for t, _, _, _ in parts])
    np.testing.assert_array_equal(tokens, np.arange(100, 107))
    assert [rows.tolist() for _, _, _, rows in parts] == [[2], [], [0]]
    assert parts[0][2] == [[0], [0, 1], [0]]


@pytest.mark.parametrize("token,pos,seqs", [(-1, 0, 0), (1, -1, 0), (1.5, 0, 0),
                                            (1, 0, []), (1, 0, [0, 0]), (1, 0, ["a"]),
                                            (True, 0, 0), (1, False, 0), (1, 0, True),
                                            (1, 0, [0, True]), (np.True_, 0, 0)])
def test_bad_tokens_are_refused_and_leave_the_batch_alone(token, pos, seqs):
    b = Batch()
    b.add(1, 0, 0)
    with pytest.raises(ValueError):
        b.add(token, pos, seqs)
    assert len(b) == 1 and b.seq_ids == [[0]]
