"""Block-sparse topology: hand-computed cases, the worst-case bound, jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_reference as ref
from pallas_kernels.topology import make_topology, max_block_rows


@functools.partial(jax.jit, static_argnums=(1, 2))
def _build(group_sizes, num_rows, block_size):
    """The topology and its derived row arrays, in one compiled call."""
    topo = make_topology(group_sizes, num_rows, block_size)
    return topo, {
        "row_expert": topo.row_expert(),
        "row_is_valid": topo.row_is_valid(),
        "bin_starts": topo.bin_starts,
        "padded_group_sizes": topo.padded_group_sizes,
    }


def _check_topology(built, *, group_sizes, offsets, block_row_expert, valid_rows, num_used):
    topo, rows = built
    chex.assert_trees_all_equal(
        (
            topo.group_sizes,
            topo.expert_block_offsets,
            topo.block_row_expert,
            topo.num_used_block_rows,
        ),
        (
            np.array(group_sizes, np.int32),
            np.array(offsets, np.int32),
            np.array(block_row_expert, np.int32),
            np.int32(num_used),
        ),
    )
    chex.assert_type(
        [
            topo.group_sizes,
            topo.expert_block_offsets,
            topo.block_row_expert,
            topo.num_used_block_rows,
        ],
        jnp.int32,
    )
    valid = np.zeros(topo.padded_rows, bool)
    for start, stop in valid_rows:
        valid[start:stop] = True
    chex.assert_trees_all_equal(rows["row_is_valid"], valid)


def test_hand_computed_block_32():
    # Bins: expert 0 one block (3 rows), expert 1 empty, expert 2 three blocks
    # (70 rows), expert 3 one block (5 rows). Worst case for 80 rows over 4
    # experts: (80 + 4 * 31) // 32 = 6 block rows, the last one padding.
    topo, rows = built = _build(jnp.array([3, 0, 70, 5]), 80, 32)
    assert (topo.num_experts, topo.num_block_rows, topo.padded_rows) == (4, 6, 192)
    _check_topology(
        built,
        group_sizes=[3, 0, 70, 5],
        offsets=[0, 1, 1, 4, 5],
        block_row_expert=[0, 2, 2, 2, 3, 4],
        valid_rows=[(0, 3), (32, 102), (128, 133)],
        num_used=5,
    )
    chex.assert_trees_all_equal(
        (rows["bin_starts"], rows["padded_group_sizes"], rows["row_expert"]),
        (
            np.array([0, 32, 32, 128], np.int32),
            np.array([32, 0, 96, 32], np.int32),
            np.repeat(np.array([0, 2, 2, 2, 3, 4], np.int32), 32),
        ),
    )


def test_hand_computed_all_rows_to_one_expert():
    # (64 + 4 * 31) // 32 = 5 block rows; only 2 used, 3 padding (sentinel E=4).
    _check_topology(
        _build(jnp.array([0, 0, 64, 0]), 64, 32),
        group_sizes=[0, 0, 64, 0],
        offsets=[0, 0, 0, 2, 2],
        block_row_expert=[2, 2, 4, 4, 4],
        valid_rows=[(0, 64)],
        num_used=2,
    )


def test_hand_computed_ragged_block_1():
    # Block size 1: no padding inside bins; rows past sum(group_sizes) invalid.
    # int16 sizes are accepted and stored as int32.
    _check_topology(
        _build(jnp.array([2, 0, 1], jnp.int16), 4, 1),
        group_sizes=[2, 0, 1],
        offsets=[0, 2, 2, 3],
        block_row_expert=[0, 0, 2, 3],
        valid_rows=[(0, 3)],
        num_used=3,
    )


def test_hand_computed_full_blocks_and_empty_routing():
    # Exact multiples of the block: no padding rows; (96 + 2 * 31) // 32 = 4.
    _check_topology(
        _build(jnp.array([64, 32]), 96, 32),
        group_sizes=[64, 32],
        offsets=[0, 2, 3],
        block_row_expert=[0, 0, 1, 2],
        valid_rows=[(0, 96)],
        num_used=3,
    )
    # Nothing routed: all (5 + 3 * 63) // 64 = 3 block rows are padding.
    _check_topology(
        _build(jnp.zeros((3,), jnp.int32), 5, 64),
        group_sizes=[0, 0, 0],
        offsets=[0, 0, 0, 0],
        block_row_expert=[3, 3, 3],
        valid_rows=[],
        num_used=0,
    )


@pytest.mark.parametrize(
    "num_rows,num_experts,block_size,expected",
    [
        (1, 8, 128, 1),  # one row: one block
        (0, 4, 32, 1),  # never zero-sized
        (80, 4, 32, 6),
        (8192, 64, 128, 127),  # 64 + (8192 - 64) // 128
        (10, 64, 32, 10),  # fewer rows than experts: one block per row at most
        (100, 3, 1, 100),  # ragged layout: exactly the rows
    ],
)
def test_max_block_rows_hand_computed(num_rows, num_experts, block_size, expected):
    assert max_block_rows(num_rows, num_experts, block_size) == expected


def test_max_block_rows_is_the_exact_worst_case():
    """Exhaustive search over group sizes: the bound is reached and never exceeded."""
    for num_rows in range(0, 13):
        for num_experts in (1, 2, 3, 5):
            for block_size in (1, 2, 4, 8):
                worst = ref.worst_case_block_rows(num_rows, num_experts, block_size)
                assert max_block_rows(num_rows, num_experts, block_size) == max(worst, 1), (
                    num_rows,
                    num_experts,
                    block_size,
                )


def _adversarial_sizes(rng, num_rows, num_experts, block_size):
    """Group sizes that waste as much padding as possible: as many non-empty
    experts as rows allow, all but one holding ``1 mod block_size`` rows."""
    sizes = np.zeros(num_experts, np.int64)
    nonempty = rng.permutation(num_experts)[: min(num_experts, num_rows)]
    sizes[nonempty] = 1
    left = num_rows - sizes.sum()
    for e in nonempty:  # add whole blocks while they fit
        extra = rng.integers(0, left // block_size + 1) * block_size
        sizes[e] += extra
        left -= extra
    sizes[nonempty[0]] += left
    return sizes


def test_bound_never_exceeded_random_and_adversarial_routings():
    rng = np.random.default_rng(0)
    for trial in range(3000):
        num_rows = int(rng.integers(1, 600))
        num_experts = int(rng.integers(1, 70))
        block_size = int(rng.choice([1, 2, 16, 32, 64, 128]))
        kind = trial % 3
        if kind == 0:  # random routing of all rows
            sizes = np.bincount(rng.integers(0, num_experts, num_rows), minlength=num_experts)
        elif kind == 1:  # skewed routing, some rows unrouted
            p = rng.dirichlet(np.full(num_experts, 0.1))
            sizes = rng.multinomial(int(rng.integers(0, num_rows + 1)), p)
        else:
            sizes = _adversarial_sizes(rng, num_rows, num_experts, block_size)
        assert sizes.sum() <= num_rows
        needed = sum(-(-int(s) // block_size) for s in sizes)
        assert needed <= max_block_rows(num_rows, num_experts, block_size), (
            num_rows,
            num_experts,
            block_size,
            sizes,
        )


@pytest.mark.parametrize("num_rows,num_experts,block_size", [(37, 5, 8), (64, 16, 32), (9, 3, 1)])
def test_topology_matches_numpy_layout_under_jit(num_rows, num_experts, block_size):
    rng = np.random.default_rng(num_rows)
    for trial in range(12):
        if trial % 2:
            sizes = _adversarial_sizes(rng, num_rows, num_experts, block_size)
        else:
            sizes = np.bincount(
                rng.integers(0, num_experts, int(rng.integers(0, num_rows + 1))),
                minlength=num_experts,
            )
        topo, rows = _build(jnp.asarray(sizes, jnp.int32), num_rows, block_size)
        assert topo.block_size == block_size
        assert topo.num_block_rows == max_block_rows(num_rows, num_experts, block_size)
        row_expert, valid = ref.layout(sizes, block_size, topo.padded_rows)
        blocks = [-(-int(s) // block_size) for s in sizes]
        chex.assert_trees_all_equal(
            (
                rows["row_expert"],
                rows["row_is_valid"],
                topo.expert_block_offsets,
                topo.num_used_block_rows,
            ),
            (
                row_expert.astype(np.int32),
                valid,
                np.cumsum([0] + blocks).astype(np.int32),
                np.int32(sum(blocks)),
            ),
        )
    # Outside jit, the same arrays.
    chex.assert_trees_all_equal(topo, make_topology(jnp.asarray(sizes), num_rows, block_size))
