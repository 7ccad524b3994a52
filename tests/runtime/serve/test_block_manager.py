import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsl.errors import ServingError
from runtime.serve.block_manager import BlockManager
from runtime.serve.request import Request, SamplingParams


def req(rid, prompt, max_tokens=64):
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens))


def computed(r):
    """Pretend the whole request went through the model."""
    r.num_computed_tokens = r.num_tokens
    return r


def test_allocate_free_counts_and_invariants():
    bm = BlockManager(10, 4)
    a = req("a", range(10))            # 3 blocks
    assert bm.can_allocate(a)
    assert bm.allocate(a) == 0
    assert bm.num_free == 7 and bm.num_used_blocks == 3 and bm.usage == pytest.approx(0.3)
    assert len(bm.block_table("a")) == 3
    bm.check_invariants()
    assert bm.free(a) == 3
    assert bm.num_free == 10
    bm.check_invariants()
    assert bm.free(a) == 0             # freeing twice is harmless


def test_cannot_allocate_beyond_capacity():
    bm = BlockManager(2, 4)
    big = req("big", range(9))         # 3 blocks
    assert not bm.can_allocate(big)
    with pytest.raises(ServingError, match="needs 3 KV blocks"):
        bm.allocate(big)


def test_prefix_sharing_only_after_compute():
    bm = BlockManager(20, 4)
    prompt = list(range(100, 110))     # blocks [0..3] [4..7] full, [8,9] partial
    a = req("a", prompt)
    bm.allocate(a)
    b = req("b", prompt)
    assert bm.allocate(b) == 0         # a's KV is not computed yet: nothing to share
    bm.free(b)
    bm.mark_computed(computed(a))
    c = req("c", prompt + [5, 6])      # 12 tokens: shareable full blocks before the last token = 2
    assert bm.allocate(c) == 8
    ta, tc = bm.block_table("a"), bm.block_table("c")
    assert tc[:2] == ta[:2] and tc[2] != ta[2]
    assert [bm.ref_count(x) for x in ta[:2]] == [2, 2]
    bm.check_invariants()


def test_last_full_block_is_never_shared():
    bm = BlockManager(20, 4)
    a = req("a", range(8))             # exactly two full blocks
    bm.allocate(a)
    bm.mark_computed(computed(a))
    b = req("b", range(8))
    assert bm.allocate(b) == 4         # the block holding the last token is b's own
    assert bm.block_table("b")[0] == bm.block_table("a")[0]
    assert bm.block_table("b")[1] != bm.block_table("a")[1]


def test_prefix_hash_is_a_chain():
    bm = BlockManager(20, 4)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    bm.mark_computed(computed(a))
    # Same second block, different first block: no hit anywhere.
    b = req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(b) == 0


def test_freed_cached_blocks_are_reused_then_evicted():
    bm = BlockManager(4, 4)
    a = req("a", range(9))             # 3 blocks, 2 of them named once computed
    bm.allocate(a)
    bm.mark_computed(computed(a))
    bm.free(a)
    assert bm.num_free == 4            # cached blocks still count as free
    again = req("again", range(9))
    assert bm.allocate(again) == 8     # hit after release: recompute after preemption is cheap
    bm.free(again)
    other = req("other", range(1000, 1016))   # 4 blocks: must evict both named blocks
    assert bm.allocate(other) == 0
    bm.check_invariants()
    bm.free(other)
    assert bm.allocate(req("third", range(9))) == 0   # evicted: no stale hit


def test_append_slot_grows_at_block_boundary():
    bm = BlockManager(4, 4)
    r = req("r", range(4))
    bm.allocate(r)
    r.num_computed_tokens = 4
    r.append_token(7, 0.0)             # 5th token needs a second block
    assert bm.can_append_slot(r)
    assert bm.append_slot(r) == []
    assert len(bm.block_table("r")) == 2
    r.num_computed_tokens = 5
    r.append_token(8, 0.0)
    assert bm.append_slot(r) == [] and len(bm.block_table("r")) == 2
    bm.check_invariants()


def test_copy_on_write_after_fork():
    bm = BlockManager(8, 4)
    parent = req("p", range(6))        # 2 blocks, last one partial
    bm.allocate(parent)
    child = req("c", range(6))
    bm.fork(parent, child)
    last = bm.block_table("p")[-1]
    assert bm.ref_count(last) == 2
    child.num_computed_tokens = 6
    child.append_token(1, 0.0)         # writes position 6 of the shared partial block
    copies = bm.append_slot(child)
    assert len(copies) == 1 and copies[0][0] == last
    assert bm.block_table("c")[-1] == copies[0][1] != last
    assert bm.ref_count(last) == 1
    assert bm.block_table("c")[0] == bm.block_table("p")[0]   # the full block stays shared
    parent.append_token(2, 0.0)
    assert bm.append_slot(parent) == []                      # now the parent owns it alone
    bm.check_invariants()
    bm.free(parent)
    bm.free(child)
    assert bm.num_free == 8


def test_append_slot_needs_a_free_block():
    bm = BlockManager(1, 2)
    r = req("r", [1, 2])
    bm.allocate(r)
    r.append_token(3, 0.0)
    assert not bm.can_append_slot(r)
    with pytest.raises(ServingError, match="exhausted"):
        bm.append_slot(r)


def test_invariant_check_detects_corruption():
    bm = BlockManager(4, 4)
    bm.allocate(req("a", range(5)))
    bm._ref[0] += 1
    with pytest.raises(ServingError, match="invariant"):
        bm.check_invariants()


def test_bad_sizes_rejected():
    with pytest.raises(ServingError):
        BlockManager(0, 16)
    with pytest.raises(ServingError):
        BlockManager(4, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "grow", "fork", "free", "compute"]),
                          st.integers(0, 5), st.integers(1, 12), st.integers(0, 2)), max_size=40))
def test_random_operations_keep_invariants_and_leak_nothing(ops):
    bm = BlockManager(12, 4)
    live: dict[str, Request] = {}
    n = 0
    for op, pick, length, alphabet in ops:
        names = sorted(live)
        if op == "alloc":
            r = req(f"r{n}", [alphabet] * length)   # few distinct prompts: lots of sharing
            n += 1
            if bm.can_allocate(r):
                bm.allocate(r)
                live[r.request_id] = r
        elif names:
            r = live[names[pick % len(names)]]
            if op == "grow":
                r.num_computed_tokens = r.num_tokens
                bm.mark_computed(r)
                r.append_token(alphabet, 0.0)
                if bm.can_append_slot(r):
                    bm.append_slot(r)
                else:
                    bm.free(r)
                    del live[r.request_id]
            elif op == "fork":
                c = req(f"r{n}", r.prompt_token_ids)
                n += 1
                c.output_token_ids = list(r.output_token_ids)
                c.num_computed_tokens = r.num_computed_tokens
                bm.fork(r, c)
                live[c.request_id] = c
            elif op == "compute":
                r.num_computed_tokens = r.num_tokens
                bm.mark_computed(r)
            elif op == "free":
                bm.free(r)
                del live[r.request_id]
        bm.check_invariants()
        assert bm.num_used_blocks <= bm.num_blocks
    for r in list(live.values()):
        bm.free(r)
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks
