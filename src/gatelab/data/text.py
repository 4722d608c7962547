"""A two-domain byte-level text corpus built at run time from what Python itself ships.

Domains (``DOMAINS``, domain id = position in the tuple):

- ``"prose"``: the documentation topics of ``pydoc_data.topics.topics`` (what ``help("if")``
  prints), one document per topic: 79 documents, ~466 kB of UTF-8 on Python 3.11.
- ``"code"``: the standard library's own ``.py`` files, one document per file, read as raw
  bytes in sorted path order from ``sysconfig.get_paths()["stdlib"]``. By default only the
  top-level modules (``__future__.py`` ... ``zipimport.py``: 167 files, ~4.7 MB on 3.11) are
  read, except ``_sysconfigdata_*.py`` (this machine's build settings, not written code);
  ``code_packages=True`` also walks the packages, skipping ``site-packages``, test suites
  (``test``/``tests``/``idle_test`` directories and ``test_*.py``), ``pydoc_data`` (it holds the
  prose domain, which would leak into the code domain) and ``encodings`` (generated codec
  tables). Reading stops before the first file that would take the total past
  ``max_code_bytes``. The exact sizes depend on the Python version, so record
  :meth:`TextCorpus.stats` next to results.

Tokenisation is byte-level (:class:`ByteTokenizer`): ids 0..255 are bytes and one extra id,
``EOS = 256``, separates documents, so models need ``vocab_size = 257``. A split's token
stream is ``EOS doc EOS doc EOS ...``: the leading EOS makes the first byte of every
document a prediction target, and predicting the EOS that ends a document belongs to that
document's domain.

Train/validation are split *by document*, per domain, with a seeded permutation: documents
are visited in permuted order and each goes to validation if validation stays within
``val_fraction`` of the domain's bytes (at least one document each side). Bytes rather than
document counts, because topic sizes range from 0.2 kB to 62 kB.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .shard import shard_rows

DOMAINS = ("prose", "code")
EOS = 256
IGNORE_INDEX = -100
DEFAULT_MAX_CODE_BYTES = 8_000_000

_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "pydoc_data",
    "encodings",
}


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus ``eos_id = 256`` as the document separator.

    ``decode(encode(s)) == s`` for every ``str`` that UTF-8 can encode (all text but lone
    surrogates). ``decode`` drops EOS ids; bytes that are not valid UTF-8 (a window cut in
    the middle of a character, a model's sample) become U+FFFD with ``errors="replace"``.
    """

    vocab_size = 257
    eos_id = EOS

    def encode(
        self, text: str | bytes, *, add_eos: bool = False, dtype: torch.dtype = torch.long
    ) -> torch.Tensor:
        """Token ids [n] of ``text`` (UTF-8 for a str), with an EOS appended if ``add_eos``."""
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, bytes | bytearray | memoryview):
            data = bytes(text)
        else:
            raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
        if add_eos and dtype == torch.uint8:
            raise ValueError("EOS (id 256) does not fit uint8; use add_eos=False or a wider dtype")
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)
        ids = ids.to(dtype)
        if add_eos:
            ids = torch.cat([ids, torch.tensor([EOS], dtype=dtype)])
        return ids

    def decode(self, ids: torch.Tensor | Sequence[int] | bytes, *, errors: str = "replace") -> str:
        """Text of ``ids`` (any shape is flattened); EOS ids are dropped."""
        if isinstance(ids, bytes | bytearray):
            return bytes(ids).decode("utf-8", errors)
        values = torch.as_tensor(ids).reshape(-1).tolist()
        bad = [v for v in values if not 0 <= v <= EOS]
        if bad:
            raise ValueError(f"token ids must be in [0, {EOS}], got {bad[:5]}")
        return bytes(v for v in values if v != EOS).decode("utf-8", errors)


@dataclass(frozen=True)
class Document:
    """One document: a name (``pydoc:if``, ``stdlib:abc.py``), its domain and its bytes."""

    name: str
    domain: str
    data: bytes

    @property
    def domain_id(self) -> int:
        return DOMAINS.index(self.domain)


def prose_documents() -> list[Document]:
    """The ``pydoc_data`` documentation topics, sorted by topic name."""
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{k}", "prose", topics[k].encode("utf-8")) for k in sorted(topics)]


def _stdlib_files(packages: bool) -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = root.rglob("*.py") if packages else root.glob("*.py")
    found = []
    for path in paths:
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):  # build settings of this machine, not code
            continue
        if packages and rel.name.startswith("test_"):
            continue
        found.append((rel.as_posix(), path))
    return sorted(found)


def code_documents(
    max_bytes: int = DEFAULT_MAX_CODE_BYTES, *, packages: bool = False
) -> list[Document]:
    """The standard library's ``.py`` files in sorted path order, up to ``max_bytes`` in all.

    Files that are not valid UTF-8 are skipped (none are in CPython 3.10-3.13).
    """
    docs, total = [], 0
    for rel, path in _stdlib_files(packages):
        data = path.read_bytes()
        if total + len(data) > max_bytes:
            break
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        docs.append(Document(f"stdlib:{rel}", "code", data))
        total += len(data)
    if not docs:
        raise FileNotFoundError(
            f"no standard-library .py files found under {sysconfig.get_paths()['stdlib']!r} "
            f"within max_bytes={max_bytes}"
        )
    return docs


def _split_domain(
    docs: list[Document], val_fraction: float, gen: torch.Generator
) -> tuple[list[Document], list[Document]]:
    perm = torch.randperm(len(docs), generator=gen).tolist()
    if val_fraction == 0 or len(docs) < 2:
        return list(docs), []
    target = val_fraction * sum(len(d.data) for d in docs)
    val: list[int] = []
    taken = 0
    for i in perm[:-1]:  # the last document in the permutation always stays in train
        if taken + len(docs[i].data) <= target:
            val.append(i)
            taken += len(docs[i].data)
    if not val:
        val = [perm[0]]
    chosen = set(val)
    return [d for i, d in enumerate(docs) if i not in chosen], [docs[i] for i in sorted(val)]


class TextCorpus:
    """Documents of both domains, split into ``train`` and ``val`` by document.

    ``train`` is in a seeded shuffled order (domains interleaved), ``val`` in name order.
    Token streams per (split, domain) are built on first use and cached.
    """

    def __init__(self, train: Sequence[Document], val: Sequence[Document], seed: int):
        self.train = tuple(train)
        self.val = tuple(val)
        self.seed = seed
        self._streams: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]] = {}

    def documents(self, split: str = "train", domain: str | None = None) -> tuple[Document, ...]:
        """The documents of ``split`` ("train" or "val"), optionally of one domain."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if domain is not None and domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS} or None, got {domain!r}")
        docs = self.train if split == "train" else self.val
        return tuple(d for d in docs if domain is None or d.domain == domain)

    def stream(
        self, split: str = "train", domain: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int16 [N], domain ids int8 [N]) of ``EOS doc EOS doc ... EOS``.

        The domain id at position t is that of the document token t belongs to; a document's
        closing EOS belongs to it, the leading EOS to the first document.
        """
        key = (split, domain)
        if key not in self._streams:
            docs = self.documents(split, domain)
            if not docs:
                raise ValueError(f"split {split!r} has no documents of domain {domain!r}")
            n = 1 + sum(len(d.data) + 1 for d in docs)
            ids = np.empty(n, dtype=np.int16)
            doms = np.empty(n, dtype=np.int8)
            ids[0], doms[0] = EOS, docs[0].domain_id
            pos = 1
            for d in docs:
                end = pos + len(d.data)
                ids[pos:end] = np.frombuffer(d.data, dtype=np.uint8)
                ids[end] = EOS
                doms[pos : end + 1] = d.domain_id
                pos = end + 1
            self._streams[key] = (torch.from_numpy(ids), torch.from_numpy(doms))
        return self._streams[key]

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """{split: {domain: {"documents": n, "bytes": b}}}."""
        return {
            split: {
                dom: {
                    "documents": len(docs := self.documents(split, dom)),
                    "bytes": sum(len(d.data) for d in docs),
                }
                for dom in DOMAINS
            }
            for split in ("train", "val")
        }


@functools.lru_cache(maxsize=4)
def load_corpus(
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_code_bytes: int = DEFAULT_MAX_CODE_BYTES,
    code_packages: bool = False,
) -> TextCorpus:
    """Build (or return the cached) two-domain corpus; see the module docstring."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train: list[Document] = []
    val: list[Document] = []
    for docs in (prose_documents(), code_documents(max_code_bytes, packages=code_packages)):
        tr, va = _split_domain(docs, val_fraction, gen)
        train += tr
        val += va
    order = torch.randperm(len(train), generator=gen).tolist()
    return TextCorpus([train[i] for i in order], val, seed)


class LMBatch(NamedTuple):
    """inputs, targets, domains: int64 [B, S]; targets[t] = next token after inputs[t].

    ``domains`` is the domain id of each target; -1 (with target ``IGNORE_INDEX``) marks
    padding in evaluation batches.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    domains: torch.Tensor


def _mix(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class LMBatches:
    """Endless, resumable language-modelling batches from one split of a corpus.

    Each epoch cuts the split's stream into windows of ``seq_len + 1`` tokens at stride
    ``seq_len``, starting at a random offset in [0, seq_len), and visits them in a random
    order; both come from ``(seed, epoch)`` alone. Batches take the next ``batch_size``
    windows, running on into the next epoch. The position is ``(epoch, index)``:
    ``state_dict()`` is a small JSON-able dict, and an iterator given it by
    ``load_state_dict()`` yields exactly the batches the saved one would have yielded next.
    """

    def __init__(
        self,
        corpus: TextCorpus,
        split: str = "train",
        *,
        seq_len: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        domain: str | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        self.split, self.domain = split, domain
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.ids, self.doms = corpus.stream(split, domain)
        if (self.ids.numel() - seq_len) // seq_len < 1:
            raise ValueError(
                f"seq_len={seq_len} is too long for split {split!r} ({self.ids.numel()} tokens)"
            )
        self.epoch = 0
        self.index = 0
        self._order: tuple[int, torch.Tensor] | None = None
        self._span = torch.arange(seq_len + 1)

    def _starts(self, epoch: int) -> torch.Tensor:
        """Window starts of ``epoch`` in visiting order."""
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
            offset = int(torch.randint(self.seq_len, (1,), generator=gen))
            count = (self.ids.numel() - 1 - offset) // self.seq_len
            perm = torch.randperm(count, generator=gen)
            self._order = (epoch, offset + perm * self.seq_len)
        return self._order[1]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._starts(self.epoch))

    def __iter__(self) -> Iterator[LMBatch]:
        return self

    def __next__(self) -> LMBatch:
        return self._rows(self._take())

    def next_shard(self, rank: int, world: int) -> LMBatch:
        """Rows ``[rank B/W, (rank+1) B/W)`` of the next batch, reading only those windows;
        the position moves by the whole batch (:class:`~gatelab.data.ShardedBatches`)."""
        return self._rows(shard_rows(self._take(), rank, world))

    def _take(self) -> torch.Tensor:
        """The next batch's window starts; moves the position."""
        parts, need = [], self.batch_size
        while need:
            starts = self._starts(self.epoch)
            take = starts[self.index : self.index + need]
            parts.append(take)
            need -= len(take)
            self.index += len(take)
            if self.index >= len(starts):
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts)

    def _rows(self, starts: torch.Tensor) -> LMBatch:
        idx = starts[:, None] + self._span
        tokens = self.ids[idx].long()
        return LMBatch(tokens[:, :-1], tokens[:, 1:], self.doms[idx[:, 1:]].long())

    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "domain": self.domain,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_tokens": int(self.ids.numel()),
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the batch size may differ, the data and windows may not."""
        for key in ("split", "domain", "seq_len", "seed", "num_tokens"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(
                    f"cannot resume: saved {key}={state.get(key)!r} but this iterator has "
                    f"{key}={self.state_dict()[key]!r} (a different corpus or data config)"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class EvalBatches:
    """Every target of a split (optionally one domain) exactly once, in stream order.

    Windows of ``seq_len`` targets at stride ``seq_len``; the last is padded with
    ``IGNORE_INDEX`` targets and domain -1. Use ``cross_entropy(..., reduction="sum")``
    over targets != IGNORE_INDEX, grouped by ``domains``, then divide by the count and
    ln 2 for bits per byte (each document's closing EOS counts as one byte).
    """

    def __init__(
        self,
        corpus: TextCorpus,
        split: str = "val",
        *,
        seq_len: int = 256,
        batch_size: int = 16,
        domain: str | None = None,
        max_batches: int | None = None,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if max_batches is not None and max_batches < 1:  # no batch: NaN bits per byte
            raise ValueError(f"max_batches must be >= 1 (None: all), got {max_batches}")
        self.ids, self.doms = corpus.stream(split, domain)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_windows = math.ceil((self.ids.numel() - 1) / seq_len)
        batches = math.ceil(self.num_windows / batch_size)
        self.num_batches = batches if max_batches is None else min(batches, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[LMBatch]:
        s = self.seq_len
        ids = torch.cat([self.ids.long(), torch.zeros(s, dtype=torch.long)])
        tgt = torch.cat([self.ids[1:].long(), torch.full((s + 1,), IGNORE_INDEX)])
        dom = torch.cat([self.doms[1:].long(), torch.full((s + 1,), -1)])
        for b in range(self.num_batches):
            w = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.num_windows))
            idx = w[:, None] * s + torch.arange(s)
            yield LMBatch(ids[idx], tgt[idx], dom[idx])
