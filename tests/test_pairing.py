"""KL pairing and the step schedule: the data-time decisions that make z0 honest and
training independent of the worker count."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.formats import DataError
from pipeline.data.pairing import KLPairer, build_schedule, kl_partners


@pytest.mark.parametrize("block_size", [2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("num_rows", [2, 3, 5, 8, 9, 15, 16, 17, 31, 100])
def test_no_self_pairs_and_partners_stay_in_their_block(block_size, num_rows):
    partners = kl_partners(num_rows, block_size)
    rows = np.arange(num_rows)
    assert (partners != rows).all()
    assert sorted(partners) == list(rows)  # every completion is used exactly once as a KL completion
    full_blocks = max(num_rows // block_size, 1)
    last_start = (full_blocks - 1) * block_size
    for i in range(num_rows):
        block_start = min(i // block_size * block_size, last_start)
        assert partners[i] >= block_start and (partners[i] < block_start + block_size or block_start == last_start)


def test_rule_is_next_row_of_the_block_with_short_last_block_folded():
    # 10 rows, blocks of 4: [0..3], then [4..9] (the 2 leftover rows join the previous block)
    assert kl_partners(10, 4).tolist() == [1, 2, 3, 0, 5, 6, 7, 8, 9, 4]
    assert kl_partners(3, 8).tolist() == [1, 2, 0]


def test_side_by_side_pairs_rotate_by_two_and_keep_both_labels_in_z0():
    """Paired rows (A chosen, A rejected, B chosen, ...): the old rule gave all 16 rows a chosen
    answer, each used twice; a rotation by 2 gives each row the same side of the next pair."""
    prompts = np.repeat(np.arange(8), 2)
    partners = kl_partners(16, 8, prompts)
    assert partners.tolist() == [2, 3, 4, 5, 6, 7, 0, 1, 10, 11, 12, 13, 14, 15, 8, 9]
    chosen = np.arange(16) % 2 == 0
    assert (prompts[partners] != prompts).all() and (chosen[partners] == chosen).all()
    assert sorted(partners) == list(range(16))  # a permutation: each completion once


def test_blocks_without_a_clean_rotation_fall_back_row_by_row():
    from pipeline.data.pairing import block_partners

    keys = np.array([[7, 7, 8, 9],  # a rotation by 2 works
                     [7, 7, 7, 9],  # one prompt holds more than half: the next row with another prompt
                     [5, 5, 5, 5]])  # one prompt only: the next row, a same-prompt pair
    assert block_partners(keys).tolist() == [[2, 3, 0, 1], [3, 3, 3, 0], [1, 2, 3, 0]]


def test_the_pairer_counts_same_prompt_rows_and_undesirable_kl_completions():
    keys = np.array([1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])  # blocks of 4: pairs, then two one-prompt blocks
    labels = np.arange(12) % 2 == 0
    table = pa.table({"prompt_ids": [[1]] * 12, "completion_ids": [[i] for i in range(12)], "label": labels,
                      "prompt_hash": keys})
    pairer = KLPairer(4, max_length=8, emit=lambda table: None)
    pairer.add(table)
    pairer.finish()
    assert pairer.same_prompt_rows == 8
    assert pairer.undesirable_kl_completions == 6  # a permutation within each block keeps the label balance


def test_block_below_two_and_single_row_are_refused():
    with pytest.raises(ValueError):
        kl_partners(10, 1)
    with pytest.raises(DataError):
        kl_partners(1, 4)


def test_schedule_covers_each_epoch_once_and_does_not_depend_on_workers():
    schedule = build_schedule(num_rows=10, global_batch_size=4, num_train_epochs=2, max_steps=-1, seed=3)
    steps, slots, rows = (schedule.column(c).to_numpy() for c in ("step", "slot", "row_index"))
    assert steps.max() + 1 == 6  # 3 steps an epoch, the last one partial
    for epoch_steps in ((0, 1, 2), (3, 4, 5)):
        assert sorted(rows[np.isin(steps, epoch_steps)]) == list(range(10))
    assert (slots[steps == 2] == [0, 1]).all()
    again = build_schedule(num_rows=10, global_batch_size=4, num_train_epochs=2, max_steps=-1, seed=3)
    assert again.equals(schedule)
    assert build_schedule(10, 4, 1, max_steps=7, seed=3).column("step").to_numpy().max() == 6
    in_order = build_schedule(10, 4, num_train_epochs=1, max_steps=-1, seed=3, shuffle=False)
    assert in_order.column("row_index").to_pylist() == list(range(10))


@pytest.mark.parametrize("seed", range(6))
def test_pairing_on_the_stream_equals_pairing_the_whole_set(seed):
    """KLPairer, fed chunks of any size, gives each row the partner kl_partners gives it
    over the whole set (same-prompt rows skipped), and cuts KL completions to max_length."""
    rng = np.random.default_rng(seed)
    n, block = int(rng.integers(2, 120)), int(rng.integers(2, 12))
    keys = rng.integers(0, 4, n)  # few distinct prompts: the skip rule is exercised
    table = pa.table({"prompt_ids": [[int(k)] * 2 for k in keys], "completion_ids": [[i, i, i] for i in range(n)],
                      "label": rng.random(n) < 0.5, "prompt_hash": keys})
    emitted = []
    pairer = KLPairer(block, max_length=4, emit=emitted.append)
    start = 0
    while start < n:
        size = int(rng.integers(0, 3 * block))
        pairer.add(table.slice(start, size))
        start += size
    pairer.finish()
    result = pa.concat_tables(emitted)
    assert result.column("row_index").to_pylist() == list(range(n))
    partners = kl_partners(n, block, keys)
    assert result.column("kl_completion_ids").to_pylist() == [[int(p)] * 2 for p in partners]  # 4 - 2 prompt tokens
    differs = [keys[p] != keys[i] for i, p in enumerate(partners)]
    for start in range(0, n, block):  # wherever a block holds another prompt, a row's partner has one
        if len(set(keys[start:start + block])) > 1 and start + 2 * block <= n:
            assert all(differs[start:start + block])


def test_a_pairwise_schedule_keeps_each_pair_in_neighbouring_slots_of_one_step():
    schedule = build_schedule(num_rows=10, global_batch_size=4, num_train_epochs=2, max_steps=-1, seed=3, pairs=True)
    steps, slots, rows = (schedule.column(c).to_numpy() for c in ("step", "slot", "row_index"))
    assert steps.max() + 1 == 6  # 5 pairs, 2 a step: 3 steps an epoch, the last one a single pair
    assert (rows[0::2] % 2 == 0).all() and (rows[1::2] == rows[0::2] + 1).all()  # chosen, then its rejected
    assert (steps[0::2] == steps[1::2]).all() and (slots[0::2] % 2 == 0).all() and (slots[1::2] == slots[0::2] + 1).all()
    for epoch_steps in ((0, 1, 2), (3, 4, 5)):
        assert sorted(rows[np.isin(steps, epoch_steps)]) == list(range(10))
    assert len(set(rows[0::2][:5].tolist())) == 5 and rows[0::2][:5].tolist() != [0, 2, 4, 6, 8]  # shuffled pairs


def test_rows_without_their_other_half_are_counted_and_refused_for_kto_pairwise():
    """The stream of kept rows, cut anywhere: pair b lost its rejected half, pair d its chosen half."""
    from pipeline.config import load_config
    from pipeline.data.checks import check_counts
    from pipeline.data.stage import DataSettings, Tally

    pair_ids = ["a", "a", "b", "c", "c", "d", "e", "e"]
    labels = [True, False, True, True, False, False, True, False]
    table = pa.table({"pair_id": pair_ids, "kto_label": labels, "prompt_tokens": [3] * 8,
                      "completion_tokens": [2] * 8, "prompt_ids": [[1, 2, 3]] * 8, "completion_ids": [[4, 5]] * 8})
    settings = DataSettings(tokenizer_path="unused", max_length=16, max_prompt_length=8, kl_block_size=2)
    for cut in (0, 3, 4, 5):
        tally = Tally()
        tally.add(table.slice(0, cut), settings)
        tally.add(table.slice(cut), settings)
        assert tally.unpaired_rows + (tally.open_half is not None) == 2, cut
    counts = {"read": 8, "kept": 8, "rejected": 0, "rejected_by_reason": {}, "unpaired_rows": 2}
    pairwise = load_config(None, ("kto.loss_type=kto_pairwise",))
    with pytest.raises(DataError, match="2 of 8 kept rows have no other half"):
        check_counts(pairwise, counts, "feedback.parquet")
    check_counts(pairwise, {**counts, "unpaired_rows": 0}, "feedback.parquet")
    check_counts(load_config(None), counts, "feedback.parquet")  # kto needs no pairs
