"""The data of examples/lm.py: Python's standard library source, split into held-out validation
files and one disjoint share of the training files per replica.

Every function here is a pure function of the file list and the seed, so every rank computes the
same split without talking to the others; each rank then reads only its own share (and the
validation files, the same for every rank).
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

#: directories never read: installed packages, byte code, and (unless asked) the test suites
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})

FileList = list[tuple[str, int]]  # (path relative to the root, size in bytes)


def list_files(root: str | os.PathLike, suffix: str = ".py", include_tests: bool = False) -> FileList:
    """Every ``*suffix`` file under ``root`` as ``(relative path, size)``, sorted by path.

    ``site-packages`` and ``__pycache__`` are never entered; test directories only with
    ``include_tests``.
    """
    root = Path(root)
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    out: FileList = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            if name.endswith(suffix):
                path = Path(here, name)
                out.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(out)


def _unit(seed: int, tag: str, path: str) -> float:
    """A uniform number in [0, 1) that is a pure function of (seed, tag, path), on any machine."""
    digest = hashlib.sha256(f"{seed}/{tag}/{path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _cap(files: FileList, max_bytes: int, seed: int, tag: str) -> FileList:
    """The files taken in seeded-hash order while their total stays within ``max_bytes``, re-sorted."""
    taken, total = [], 0
    for path, size in sorted(files, key=lambda f: _unit(seed, tag, f[0])):
        if total + size <= max_bytes:
            taken.append((path, size))
            total += size
    return sorted(taken)


def split_files(
    files: FileList,
    seed: int = 0,
    val_fraction: float = 0.05,
    max_bytes: int = 8 << 20,
    val_bytes: int = 256 << 10,
) -> tuple[FileList, FileList]:
    """Training and held-out validation files: a file is held out when a hash of (seed, path) falls
    below ``val_fraction``; each side is then capped (``max_bytes``, ``val_bytes``) by a second hash
    order. Deterministic, and a file's side does not depend on the other files."""
    val = [f for f in files if _unit(seed, "val", f[0]) < val_fraction]
    train = [f for f in files if _unit(seed, "val", f[0]) >= val_fraction]
    train, val = _cap(train, max_bytes, seed, "train"), _cap(val, val_bytes, seed, "val-cap")
    if not train or not val:
        raise ValueError(
            f"no {'training' if not train else 'validation'} files within the byte cap "
            f"(max_bytes={max_bytes}, val_bytes={val_bytes}, val_fraction={val_fraction})"
        )
    return train, val


def replica_shares(train: FileList, world: int, iid: bool = False, seed: int = 0) -> list[FileList]:
    """Deal the training files to ``world`` replicas, disjointly and with about equal bytes each.

    Non-IID (default): contiguous blocks of the sorted list, so each replica reads whole packages
    the others never see. ``iid``: the same on a seeded shuffle of the files.
    """
    order = sorted(train)
    if iid:
        random.Random(seed).shuffle(order)
    total = sum(size for _, size in order)
    shares: list[FileList] = [[] for _ in range(world)]
    start = 0
    for path, size in order:
        middle = start + size / 2
        shares[min(world - 1, int(middle * world / max(total, 1)))].append((path, size))
        start += size
    if any(not s for s in shares):
        raise ValueError(f"{len(order)} training files cannot give each of {world} replicas a share")
    return [sorted(s) for s in shares]


def read_bytes(root: str | os.PathLike, files: FileList) -> torch.Tensor:
    """The files' bytes, each followed by a NUL byte (a document separator), as one uint8 tensor."""
    buf = bytearray()
    for path, _ in files:
        buf += Path(root, path).read_bytes()
        buf += b"\x00"
    return torch.frombuffer(buf, dtype=torch.uint8).clone() if buf else torch.zeros(0, dtype=torch.uint8)


class Windows(Dataset):
    """Fixed-length windows of ``seq_len + 1`` tokens (input and the next-token targets) cut from a
    1-D token stream with stride ``seq_len``."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"{tokens.numel()} tokens are fewer than one window of seq_len + 1 = {seq_len + 1}"
            )
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()


class ShareSampler(DistributedSampler):
    """``length`` indices a round of seeded permutations of this replica's own ``n`` windows, new
    ones every epoch; every replica is given the same ``length`` so that they take the same number
    of steps per epoch. A ``DistributedSampler`` so that Lightning keeps it as it is instead of
    splitting the replica's share again across ranks."""

    def __init__(self, n: int, length: int, seed: int, rank: int) -> None:
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.n, self.length, self.site = n, length, rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.site) * 1_000_003 + self.epoch)
        out: list[int] = []
        while len(out) < self.length:
            out.extend(torch.randperm(self.n, generator=g).tolist())
        return iter(out[: self.length])

    def __len__(self) -> int:
        return self.length


class StdlibText(LightningDataModule):
    """The standard library's source, one disjoint share of the training files per replica.

    Args:
        batch_size: windows per batch, per replica.
        seq_len: tokens per window (linked to ``--model.seq_len`` on the command line).
        iid: deal a seeded shuffle of the files instead of contiguous blocks of the sorted list.
        seed: the train/validation split, the shuffle for ``iid`` and the sampling order.
        max_bytes: cap on the training text (all replicas together).
        val_bytes: cap on the held-out text.
        val_fraction: share of the files held out (by hash, before the caps).
        root: directory to read instead of the standard library.
        suffix: file name ending to read.
        include_tests: also read the standard library's test suites.
        tokenizer: a Hugging Face tokenizer name or path (needs ``transformers``); None: bytes.
        num_workers: DataLoader workers.
        share: ``(index, count)``: train on the share a rank of that index reads in a world of
            ``count`` (its files and sampling order), whatever Lightning's own rank and world size
            are (a replica group's id, a process that trains alone); None: Lightning's rank.
    """

    def __init__(
        self,
        batch_size: int = 32,
        seq_len: int = 256,
        iid: bool = False,
        seed: int = 0,
        max_bytes: int = 8 << 20,
        val_bytes: int = 256 << 10,
        val_fraction: float = 0.05,
        root: str | None = None,
        suffix: str = ".py",
        include_tests: bool = False,
        tokenizer: str | None = None,
        num_workers: int = 0,
        share: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("seq_len", seq_len, 1),
            ("max_bytes", max_bytes, 1),
            ("val_bytes", val_bytes, 1),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        if share is not None:
            index, count = share
            if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
                raise ValueError(f"`share` must be (index, count) with 0 <= index < count, got {share!r}")
        self.share = share
        self.batch_size, self.seq_len, self.iid, self.seed = batch_size, seq_len, iid, seed
        self.max_bytes, self.val_bytes, self.val_fraction = max_bytes, val_bytes, val_fraction
        self.root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        self.suffix, self.include_tests, self.tokenizer = suffix, include_tests, tokenizer
        self.num_workers = num_workers
        self.bytes_per_token = 1.0  # of the validation text; bits per byte = nats per token / ln 2 / this

    def _tokens(self, files: FileList) -> torch.Tensor:
        if self.tokenizer is None:
            return read_bytes(self.root, files)
        from transformers import AutoTokenizer  # optional: only for --data.tokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer)
        ids: list[int] = []
        for path, _ in files:
            ids += tok(Path(self.root, path).read_bytes().decode("utf-8", errors="replace"))["input_ids"]
            if tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
        return torch.tensor(ids, dtype=torch.long)

    def setup(self, stage: str) -> None:
        rank, world = self._rank_and_world()
        files = list_files(self.root, self.suffix, self.include_tests)
        train, val = split_files(files, self.seed, self.val_fraction, self.max_bytes, self.val_bytes)
        shares = replica_shares(train, world, self.iid, self.seed)
        self.train_files, self.val_files = shares[rank], val
        self.val_set = Windows(self._tokens(val), self.seq_len)
        if self.tokenizer is not None:
            self.bytes_per_token = (sum(s for _, s in val) + len(val)) / self.val_set.tokens.numel()
        if stage == "fit":
            self.train_set = Windows(self._tokens(self.train_files), self.seq_len)
            # every replica: as many windows per epoch as the smallest share holds (from the file
            # sizes, which every rank knows; ~4 bytes a token assumed for a tokenizer)
            unit = self.seq_len * (1 if self.tokenizer is None else 4)
            self.epoch_windows = max(
                1, min((sum(s for _, s in share) + len(share) - 1) // unit for share in shares)
            )

    def _rank_and_world(self) -> tuple[int, int]:
        """Whose share this replica trains on: ``share``, else Lightning's rank and world size."""
        if self.share is not None:
            return self.share
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        sampler = ShareSampler(len(self.train_set), self.epoch_windows, self.seed, self._rank_and_world()[0])
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
