"""Paged KV cache bookkeeping: which physical blocks hold which request's tokens.

A block holds ``block_size`` consecutive token positions of one sequence. Blocks are reference
counted so that requests with the same prompt prefix share the blocks of that prefix, and a fork
(parallel sampling) shares everything until one side writes: then the written block is copied first.

Prefix sharing: a *full* block is named by a hash chain over the token ids of all blocks up to and
including it, so equal names mean equal prefixes. A block gets its name only once its KV has been
computed (``mark_computed``), so a request that hits the cache never reads KV that no one wrote.
A released named block stays cached (evictable, least recently released first) until its memory is
needed, which also makes recompute after preemption cheap when the memory was not reused.
The last token of a request is never placed in a shared block, so decode never writes shared
memory except after a fork, where copy-on-write handles it.
"""

from __future__ import annotations

import collections
import hashlib

from dsl.errors import ServingError
from runtime.serve.request import Request


def _chain_hash(parent: bytes, tokens: bytes) -> bytes:
    return hashlib.blake2b(parent + tokens, digest_size=16).digest()


class BlockManager:
    """Allocation, sharing and release of KV cache blocks (no tensors: the executor owns memory)."""

    def __init__(self, num_blocks: int, block_size: int = 16, *, enable_prefix_caching: bool = True):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ServingError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ServingError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._name: list[bytes | None] = [None] * num_blocks    # hash of a computed full block
        self._by_name: dict[bytes, int] = {}
        self._free_blank: collections.deque[int] = collections.deque(range(num_blocks))
        self._free_named: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._tables: dict[str, list[int]] = {}
        self._named_upto: dict[str, int] = {}   # per request: full blocks already offered to the cache
        self.num_cache_hit_blocks = 0             # statistics for reports

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached-but-unreferenced blocks count: they are evictable)."""
        return len(self._free_blank) + len(self._free_named)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def holds(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_table(self, request_id: str) -> list[int]:
        if request_id not in self._tables:
            raise ServingError(f"request {request_id} holds no KV blocks")
        return list(self._tables[request_id])

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    # --- prefix hashes -----------------------------------------------------------------------
    def _hashes(self, request: Request, count: int) -> list[bytes]:
        """The first ``count`` full-block hashes of the request (memoised on the request)."""
        chain = request.block_hashes
        bs = self.block_size
        while len(chain) < count:
            i = len(chain)
            parent = chain[-1] if chain else b""
            chain.append(_chain_hash(parent, request.token_ids(i * bs, (i + 1) * bs).tobytes()))
        return chain[:count]

    def _prefix_hits(self, request: Request) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        # Only blocks strictly before the last token may be shared: the last token gets written.
        shareable = (request.num_tokens - 1) // self.block_size
        hits = []
        for h in self._hashes(request, shareable):
            block = self._by_name.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # --- allocation --------------------------------------------------------------------------
    def _blocks_to_take(self, request: Request) -> tuple[list[int], int]:
        hits = self._prefix_hits(request)
        revived = sum(1 for b in hits if self._ref[b] == 0)   # cached but free: leaves the free pool
        fresh = self.blocks_for(request.num_tokens) - len(hits)
        return hits, fresh + revived

    def can_allocate(self, request: Request) -> bool:
        """Whether all of the request's current tokens (prompt, plus outputs after preemption) fit."""
        if request.request_id in self._tables:
            return False
        _, need = self._blocks_to_take(request)
        return need <= self.num_free

    def allocate(self, request: Request) -> int:
        """Give the request blocks for all its current tokens; returns how many leading tokens are
        already computed in shared blocks (the prefill may skip them)."""
        rid = request.request_id
        if rid in self._tables:
            raise ServingError(f"request {rid} already holds KV blocks")
        hits, need = self._blocks_to_take(request)
        if need > self.num_free:
            raise ServingError(f"request {rid}: needs {need} KV blocks, {self.num_free} free")
        table = []
        for block in hits:
            if self._ref[block] == 0:
                del self._free_named[block]
            self._ref[block] += 1
            table.append(block)
        for _ in range(self.blocks_for(request.num_tokens) - len(hits)):
            table.append(self._take_free())
        self._tables[rid] = table
        self._named_upto[rid] = len(hits)
        self.num_cache_hit_blocks += len(hits)
        return len(hits) * self.block_size

    def _take_free(self) -> int:
        if self._free_blank:
            block = self._free_blank.popleft()
        elif self._free_named:
            block, _ = self._free_named.popitem(last=False)   # evict the least recently released
            del self._by_name[self._name[block]]
            self._name[block] = None
        else:
            raise ServingError("KV cache exhausted: no free block (the scheduler must preempt first)")
        self._ref[block] = 1
        return block

    def can_append_slot(self, request: Request) -> bool:
        """Whether the KV of the request's newest token can be written (a new or copied block fits)."""
        table = self._tables.get(request.request_id)
        if table is None:
            raise ServingError(f"request {request.request_id} holds no KV blocks")
        needs_block = len(table) * self.block_size < request.num_tokens or self._ref[table[-1]] > 1
        return not needs_block or bool(self._free_blank) or bool(self._free_named)

    def append_slot(self, request: Request) -> list[tuple[int, int]]:
        """Make room for the newest token's KV; returns (source, destination) block copies the
        executor must perform first (copy-on-write of a shared last block)."""
        table = self._tables.get(request.request_id)
        if table is None:
            raise ServingError(f"request {request.request_id} holds no KV blocks")
        need = self.blocks_for(request.num_tokens)
        if len(table) + 1 < need:
            raise ServingError(f"request {request.request_id}: append_slot skipped a block "
                               f"({len(table)} blocks for {request.num_tokens} tokens)")
        if len(table) < need:
            table.append(self._take_free())
            return []
        last = table[-1]
        if self._ref[last] == 1:
            return []
        copy = self._take_free()
        self._release(last)
        table[-1] = copy
        return [(last, copy)]

    def fork(self, parent: Request, child: Request) -> None:
        """Let ``child`` share every block of ``parent`` (parallel sampling of one prompt)."""
        if parent.request_id not in self._tables:
            raise ServingError(f"request {parent.request_id} holds no KV blocks to fork")
        if child.request_id in self._tables:
            raise ServingError(f"request {child.request_id} already holds KV blocks")
        table = list(self._tables[parent.request_id])
        for block in table:
            self._ref[block] += 1
        self._tables[child.request_id] = table
        self._named_upto[child.request_id] = self._named_upto[parent.request_id]
        child.block_hashes = list(parent.block_hashes)

    def free(self, request: Request | str) -> int:
        """Release every block of the request (finish, cancel or preemption by recompute);
        returns how many blocks the request held."""
        rid = request if isinstance(request, str) else request.request_id
        table = self._tables.pop(rid, None)
        self._named_upto.pop(rid, None)
        if table is None:
            return 0
        # Release the tail first so the LRU evicts a sequence's deepest blocks before its prefix.
        for block in reversed(table):
            self._release(block)
        return len(table)

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] > 0:
            return
        if self._name[block] is not None:
            self._free_named[block] = None
        else:
            self._free_blank.append(block)

    def mark_computed(self, request: Request) -> None:
        """Publish the request's full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables.get(rid)
        if table is None:
            return
        full = min(request.num_computed_tokens // self.block_size, len(table))
        start = self._named_upto.get(rid, 0)
        if full <= start:
            return
        hashes = self._hashes(request, full)
        for i in range(start, full):
            block, h = table[i], hashes[i]
            if self._name[block] is None and h not in self._by_name:
                self._name[block] = h
                self._by_name[h] = block
        self._named_upto[rid] = full

    # --- checking ----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise ServingError if the bookkeeping is inconsistent (used by tests and debug runs)."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                counts[block] += 1
        problems = []
        for block, (want, have) in enumerate(zip(counts, self._ref)):
            if want != have:
                problems.append(f"block {block}: ref {have}, held by {want} tables")
        blank, named = set(self._free_blank), set(self._free_named)
        if len(blank) != len(self._free_blank):
            problems.append("a block is twice in the blank free list")
        if blank & named:
            problems.append(f"blocks {sorted(blank & named)} are in both free lists")
        free = blank | named
        zero = {b for b in range(self.num_blocks) if self._ref[b] == 0}
        if free != zero:
            problems.append(f"free lists {sorted(free ^ zero)[:8]} disagree with zero ref counts")
        for block in blank:
            if self._name[block] is not None:
                problems.append(f"blank free block {block} still has a name")
        for block in named:
            if self._name[block] is None:
                problems.append(f"named free block {block} has no name")
        for h, block in self._by_name.items():
            if self._name[block] != h:
                problems.append(f"cache entry points at block {block} whose name differs")
        if sum(1 for n in self._name if n is not None) != len(self._by_name):
            problems.append("named blocks and cache entries differ in number")
        if problems:
            raise ServingError("block manager invariant broken: " + "; ".join(problems[:5]))
