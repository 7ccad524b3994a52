"""The multi-domain training corpus: preparation (tokenizer + token shards) and packed batches.

Layout of a prepared corpus directory::

    tokenizer.json                 byte-level BPE (HuggingFace ``tokenizers``), "<|endoftext|>" = id 0
    <domain>.train.npy             uint16 token ids, documents joined with the end-of-text id
    <domain>.heldout.npy
    manifest.json                  written last: its presence means the corpus is complete

:class:`PackedDataset` streams shuffled windows of ``seq_len + 1`` tokens (inputs and shifted
targets) with the domain of each window, deterministic in (seed, position), resumable exactly from
:meth:`PackedDataset.state_dict`, and split across data-parallel ranks from one global order, so the
same global batch is seen whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dsl.errors import TrainingError
from runtime.train.sources import Document

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
SPLITS = ("train", "heldout")
FORMAT_VERSION = 1


def default_data_dir() -> Path:
    """``$KDSL_CACHE_DIR/data`` if set, else the user cache directory of kdsl plus ``/data``."""
    from dsl.paths import cache_root

    return cache_root("data", create=False)


# ------------------------------------------------------------------------------------- preparation

def split_documents(docs: Sequence[Document], heldout_fraction: float, seed: int, domain_index: int,
                    name: str = "") -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split: a seeded permutation of the key-sorted documents."""
    docs = sorted(docs, key=lambda d: d.key)
    if len(docs) < 2:
        raise TrainingError(f"domain '{name}' has {len(docs)} document(s); a train/held-out split needs at least 2")
    order = np.random.default_rng([seed, domain_index, 0x5EED]).permutation(len(docs))
    n_held = min(len(docs) - 1, max(1, round(heldout_fraction * len(docs))))
    held = sorted(order[:n_held].tolist())
    train = sorted(order[n_held:].tolist())
    return [docs[i] for i in train], [docs[i] for i in held]


def cap_documents(docs: Sequence[Document], max_bytes: int | None, seed: int, domain_index: int
                  ) -> list[Document]:
    """A seeded random subset of the documents whose UTF-8 size stays within ``max_bytes``."""
    docs = sorted(docs, key=lambda d: d.key)
    if max_bytes is None:
        return docs
    order = np.random.default_rng([seed, domain_index, 0xCA9]).permutation(len(docs))
    chosen, total = [], 0
    for i in order:
        size = len(docs[i].text.encode("utf-8"))
        if total + size > max_bytes and chosen:
            continue
        chosen.append(int(i))
        total += size
    return [docs[i] for i in sorted(chosen)]


def train_tokenizer(texts_by_domain: Mapping[str, Sequence[str]], vocab_size: int,
                    sample_bytes_per_domain: int | None = 2 << 20):
    """Byte-level BPE; each domain contributes at most ``sample_bytes_per_domain`` so none dominates the merges."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise TrainingError("the `tokenizers` package is needed to train the tokenizer: "
                            "pip install tokenizers (or pip install 'kdsl[train]')") from None
    if not 256 < vocab_size <= 65535:
        raise TrainingError(f"--vocab must be in 257..65535 (byte alphabet + merges, uint16 shards), got {vocab_size}")

    def sample() -> Iterator[str]:
        for texts in texts_by_domain.values():
            used = 0
            for text in texts:
                yield text
                used += len(text)
                if sample_bytes_per_domain is not None and used >= sample_bytes_per_domain:
                    break

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sample(), trainer=trainer)
    return tokenizer


def load_tokenizer(data_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(data_dir) / TOKENIZER
    if not path.is_file():
        raise TrainingError(f"no tokenizer at {path}; run `kdsl data prepare --out {data_dir}`")
    return Tokenizer.from_file(str(path))


def _encode(tokenizer, texts: Sequence[str], eos_id: int) -> np.ndarray:
    pieces = []
    for start in range(0, len(texts), 256):
        for enc in tokenizer.encode_batch(list(texts[start:start + 256])):
            pieces.append(np.asarray(enc.ids, dtype=np.uint16))
            pieces.append(np.asarray([eos_id], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then move into place: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_corpus(domains: Mapping[str, Sequence[Document]], out_dir: str | Path, *, vocab_size: int = 4096,
                 seed: int = 0, heldout_fraction: float = 0.05, max_bytes_per_domain: int | None = None,
                 tokenizer_sample_bytes: int | None = 2 << 20, sources: Mapping[str, str] | None = None,
                 log: Callable[[str], None] = lambda msg: None) -> dict:
    """Split, train the tokenizer on the train splits, write shards and the manifest; return the manifest."""
    if len(domains) < 1:
        raise TrainingError("no domains to build a corpus from")
    if not 0.0 < heldout_fraction < 1.0:
        raise TrainingError(f"held-out fraction must be in (0, 1), got {heldout_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the corpus is incomplete until the new manifest lands
    t0 = time.perf_counter()
    splits: dict[str, dict[str, list[Document]]] = {}
    for index, name in enumerate(sorted(domains)):
        docs = cap_documents(domains[name], max_bytes_per_domain, seed, index)
        train, held = split_documents(docs, heldout_fraction, seed, index, name)
        splits[name] = {"train": train, "heldout": held}
    log(f"split {len(splits)} domains in {time.perf_counter() - t0:.1f}s; training tokenizer")

    tokenizer = train_tokenizer({n: [d.text for d in s["train"]] for n, s in splits.items()}, vocab_size,
                                tokenizer_sample_bytes)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    atomic_write(out / TOKENIZER, lambda p: tokenizer.save(str(p)))

    manifest = {"format": FORMAT_VERSION, "vocab_size": tokenizer.get_vocab_size(), "eos_id": eos_id,
                "tokenizer": TOKENIZER, "seed": seed, "heldout_fraction": heldout_fraction,
                "max_bytes_per_domain": max_bytes_per_domain, "domains": {}}
    for name, parts in splits.items():
        entry = {"source": (sources or {}).get(name, ""), "splits": {}}
        for split, docs in parts.items():
            tokens = _encode(tokenizer, [d.text for d in docs], eos_id)
            fname = f"{name}.{split}.npy"

            def save(p: Path, arr=tokens) -> None:
                with open(p, "wb") as fh:
                    np.save(fh, arr)

            atomic_write(out / fname, save)
            entry["splits"][split] = {"file": fname, "tokens": int(tokens.size), "documents": len(docs),
                                      "bytes": sum(len(d.text.encode("utf-8")) for d in docs)}
        manifest["domains"][name] = entry
        log(f"{name}: {entry['splits']['train']['tokens']:,} train / "
            f"{entry['splits']['heldout']['tokens']:,} held-out tokens")
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def prepare(out_dir: str | Path | None = None, *, vocab_size: int = 4096, seed: int = 0,
            heldout_fraction: float = 0.05, max_bytes_per_domain: int | None = 8 << 20,
            doc_deb: str | Path | None = None, gensim_wheel: str | Path | None = None,
            lib_dir: str | Path | None = None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Collect the four offline domains (code, docs, news, wiki) and build the corpus in ``out_dir``."""
    from runtime.train import sources

    out = Path(out_dir) if out_dir is not None else default_data_dir()
    domains: dict[str, list[Document]] = {}
    t0 = time.perf_counter()
    domains.update(sources.collect_code(Path(lib_dir) if lib_dir else None))
    log(f"code: {len(domains['code'])} stdlib files ({time.perf_counter() - t0:.1f}s)")
    domains.update(sources.collect_docs(doc_deb))
    log(f"docs: {len(domains['docs'])} {sources.DOC_PACKAGE} source pages ({time.perf_counter() - t0:.1f}s)")
    domains.update(sources.collect_gensim(gensim_wheel))
    log(f"news: {len(domains['news'])} articles, wiki: {len(domains['wiki'])} pages "
        f"({time.perf_counter() - t0:.1f}s)")
    origin = {"code": f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library",
              "docs": f"Debian {sources.DOC_PACKAGE} (html/_sources)",
              "news": "gensim wheel test data: " + ", ".join(sources.NEWS_FILES),
              "wiki": "gensim wheel test data: " + ", ".join(sources.WIKI_FILES)}
    manifest = build_corpus(domains, out, vocab_size=vocab_size, seed=seed, heldout_fraction=heldout_fraction,
                            max_bytes_per_domain=max_bytes_per_domain, sources=origin, log=log)
    manifest["seconds"] = round(time.perf_counter() - t0, 2)  # including collection and downloads
    atomic_write(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise TrainingError(f"no prepared corpus at {data_dir} (missing {MANIFEST}); "
                            f"run `kdsl data prepare --out {data_dir}`")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_VERSION or not manifest.get("domains"):
            raise ValueError(f"unsupported format {manifest.get('format')!r}")
    except (OSError, ValueError) as exc:
        raise TrainingError(f"corrupt corpus manifest {path}: {exc}; rebuild with "
                            f"`kdsl data prepare --out {data_dir} --force`") from None
    return manifest


# ----------------------------------------------------------------------------------------- batches

@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor    # [B, seq_len + 1] int64
    domains: torch.Tensor   # [B] int64, index into PackedDataset.domains

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]


class PackedDataset:
    """Shuffled windows of ``seq_len + 1`` tokens over all domains of one split.

    Window ``i`` of a domain is ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (consecutive windows
    share one token, so every token is a target once). Windows never cross domains, so each sequence
    has one domain label. Epoch ``e`` visits all windows in the order of a permutation seeded by
    ``(seed, e)``; the position is (epoch, cursor) into that order. Each global batch is the next
    ``batch_size`` windows of the order; rank ``r`` of ``world_size`` gets the r-th contiguous slice.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", *, seq_len: int, batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, domains: Sequence[str] | None = None):
        if split not in SPLITS:
            raise TrainingError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
        if seq_len < 1 or batch_size < 1:
            raise TrainingError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise TrainingError(f"rank {rank} is not in a data-parallel group of size {world_size}")
        if batch_size % world_size:
            raise TrainingError(f"global batch size {batch_size} is not divisible by the {world_size} "
                                f"data-parallel ranks; use a multiple of {world_size}")
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        available = sorted(self.manifest["domains"])
        chosen = list(domains) if domains is not None else available
        unknown = [d for d in chosen if d not in available]
        if unknown:
            raise TrainingError(f"unknown domain(s) {', '.join(unknown)}; this corpus has {', '.join(available)}")
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.domains = chosen
        self._tokens: list[np.ndarray] = []
        counts = []
        for name in chosen:
            info = self.manifest["domains"][name]["splits"][split]
            path = self.data_dir / info["file"]
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise TrainingError(f"cannot read token shard {path}: {exc}; rebuild with "
                                    f"`kdsl data prepare --out {self.data_dir} --force`") from None
            if arr.dtype != np.uint16 or arr.ndim != 1 or arr.size != info["tokens"]:
                raise TrainingError(f"token shard {path} does not match the manifest; rebuild with "
                                    f"`kdsl data prepare --out {self.data_dir} --force`")
            self._tokens.append(arr)
            counts.append(max(0, (arr.size - 1) // seq_len))
        self.windows_per_domain = np.asarray(counts, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.windows_per_domain)])
        self.num_windows = int(self._offsets[-1])
        if self.num_windows == 0:
            raise TrainingError(f"the {split} split has fewer than seq_len+1 = {seq_len + 1} tokens in every domain")
        self.epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    # -- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "split": self.split, "domains": list(self.domains),
                "num_windows": self.num_windows}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("seed", "seq_len", "batch_size", "split", "domains", "num_windows"):
            mine = self.state_dict()[key]
            if key in state and (list(state[key]) if key == "domains" else state[key]) != mine:
                raise TrainingError(f"cannot resume the data position: saved {key}={state[key]!r} but this run "
                                    f"has {key}={mine!r}")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.num_windows:
            raise TrainingError(f"invalid data position epoch={epoch} cursor={cursor}")
        self.epoch, self.cursor = epoch, cursor

    # -- order ---------------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _window(self, gid: int) -> tuple[np.ndarray, int]:
        dom = int(np.searchsorted(self._offsets, gid, side="right") - 1)
        start = (gid - int(self._offsets[dom])) * self.seq_len
        return self._tokens[dom][start:start + self.seq_len + 1], dom

    def _take(self, ids: Sequence[int]) -> Batch:
        rows, doms = zip(*(self._window(int(g)) for g in ids)) if len(ids) else ((), ())
        tokens = np.stack(rows).astype(np.int64) if rows else np.zeros((0, self.seq_len + 1), dtype=np.int64)
        return Batch(torch.from_numpy(tokens), torch.as_tensor(doms, dtype=torch.int64))

    def next_global_ids(self) -> np.ndarray:
        """Window ids of the next global batch (all ranks), advancing the position."""
        ids = []
        while len(ids) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(ids), self.num_windows - self.cursor)
            ids.extend(order[self.cursor:self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return np.asarray(ids, dtype=np.int64)

    def batch_of(self, ids: Sequence[int]) -> Batch:
        """The windows ``ids`` (global window ids, as next_global_ids gives them) as one batch."""
        return self._take(ids)

    def next_batch(self) -> Batch:
        """This rank's share of the next global batch: ``batch_size // world_size`` windows."""
        ids = self.next_global_ids()
        per_rank = self.batch_size // self.world_size
        return self._take(ids[self.rank * per_rank:(self.rank + 1) * per_rank])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def eval_batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """One pass over every window in domain order, rank-strided, without touching the position."""
        batch_size = batch_size or self.batch_size // self.world_size
        mine = np.arange(self.rank, self.num_windows, self.world_size)
        for start in range(0, mine.size, batch_size):
            yield self._take(mine[start:start + batch_size])
