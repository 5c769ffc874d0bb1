"""Exact fingerprints of tensors' raw bits, cheap enough to take at every training step.

A fingerprint is two sums over a tensor's bytes read as 64-bit words (zero-padded to a whole
word), both in int64 with wrap-around: the plain sum, and the sum of each word times ``2j + 1``
(``j`` its position). Integer sums do not depend on the order of addition, so the fingerprint is
itself deterministic on any device; one changed bit changes the first sum, two swapped words the
second. :func:`checksum` is the definition; :func:`checksums` computes the same numbers for many
tensors at once (a step trace fingerprints every parameter, gradient and buffer of a model):

- small tensors together: one concatenation per dtype, two prefix sums;
- large ones a cache-sized block at a time: the sums of the words at each offset of a block and
  each block's total give both sums (on the CPU; a ``(rows, 1024)`` matrix's row and column sums
  on a GPU), so each word is read once from memory and nothing the size of the tensor is allocated.

On the CPU both run in numpy (a third of torch's cost per call on small arrays); elsewhere in
torch on the tensor's device, without a host copy.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

__all__ = ["checksum", "checksums"]

Fingerprint = Tuple[str, Tuple[int, ...], int, int]

_SMALL = 1 << 15  # tensors of fewer 64-bit words are fingerprinted together, with prefix sums
_BATCH = 1 << 22  # the most words fingerprinted together (their int64 copies: 32 MiB at most)
_WIDTH = 1024  # words per row of the large-tensor matrix
_BLOCK = 1 << 15  # words per block on the CPU: 256 KiB, read twice while it is in cache
_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    """`value` modulo 2**64 as a signed 64-bit integer (the wrap-around of int64 arithmetic)."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


def _words(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as 64-bit words (zero-padded to a whole word)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 8
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(torch.int64)


def checksum(tensor: torch.Tensor) -> Fingerprint:
    """An exact fingerprint of a tensor's raw bits, computed on its device: (dtype, shape, sum of
    its 64-bit words, sum of the words weighted by ``2j + 1``), both sums in int64 with
    wrap-around. Any single changed bit changes the first sum, a swap of two words the second.

    >>> a = torch.tensor([1.0, 2.0])
    >>> checksum(a) == checksum(a.clone()), checksum(a) == checksum(torch.tensor([2.0, 1.0]))
    (True, False)
    """
    t = tensor.detach()
    head = (str(t.dtype), tuple(t.shape))
    if t.numel() == 0:
        return (*head, 0, 0)
    words = _words(t)
    weights = torch.arange(1, 2 * words.numel(), 2, device=words.device, dtype=torch.int64)
    return (*head, int(words.sum()), int((words * weights).sum()))


_PLANS: Dict[Tuple[Tuple[torch.dtype, int, torch.device], ...], "_Plan"] = {}
_COLUMN_WEIGHTS: Dict[torch.device, Tuple[torch.Tensor, np.ndarray]] = {}


def checksums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The two sums of :func:`checksum` for each of `tensors`, as an int64 tensor of shape
    ``(len(tensors), 2)`` on the first tensor's device.

    >>> a, b = torch.tensor([1.0, 2.0]), torch.arange(3, dtype=torch.int16)
    >>> [tuple(row) for row in checksums([a, b]).tolist()] == [checksum(a)[2:], checksum(b)[2:]]
    True
    """
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.int64)
    signature = tuple([(t.dtype, t.numel(), t.device) for t in tensors])
    plan = _PLANS.get(signature)
    if plan is None:
        if len(_PLANS) >= 16:
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[signature] = _Plan(signature)
    return plan(tensors)


def _column_weights(device: torch.device) -> Tuple[torch.Tensor, np.ndarray]:
    """The weights ``2b + 1`` of a row's columns, on `device` and in numpy, made once."""
    if device not in _COLUMN_WEIGHTS:
        w = torch.arange(1, 2 * _WIDTH, 2, dtype=torch.int64, device=device)
        _COLUMN_WEIGHTS[device] = (w, np.arange(1, 2 * _WIDTH, 2, dtype=np.int64))
    return _COLUMN_WEIGHTS[device]


def _large_numpy(words: np.ndarray) -> Tuple[int, int]:
    """(plain, weighted) of one large CPU tensor's words, a block of _BLOCK words at a time: each
    block is added into an accumulator (the sums of the words at each offset) and summed whole
    (its total) while it is in cache. Word ``K g + q`` weighs ``2 K g + (2q + 1)``."""
    n = words.size
    g_count = n // _BLOCK
    blocks = words[: g_count * _BLOCK].reshape(g_count, _BLOCK)
    offsets = np.zeros(_BLOCK, dtype=np.int64)
    totals = np.empty(g_count, dtype=np.int64)
    for g in range(g_count):
        block = blocks[g]
        np.add(offsets, block, out=offsets)
        totals[g] = np.add.reduce(block)
    tail = words[g_count * _BLOCK :]
    plain = int(totals.sum()) + int(tail.sum())
    weighted = (2 * _BLOCK * int(np.dot(totals, np.arange(g_count, dtype=np.int64)))
                + int(np.dot(offsets, _block_weights()))
                + int(np.dot(tail, np.arange(2 * g_count * _BLOCK + 1, 2 * n, 2, dtype=np.int64))))
    return _signed(plain), _signed(weighted)


@functools.cache
def _block_weights() -> np.ndarray:
    return np.arange(1, 2 * _BLOCK, 2, dtype=np.int64)


def _large_torch(words: torch.Tensor) -> torch.Tensor:
    """(plain, weighted) of one large tensor's words on its device, as a (1, 2) int64 tensor."""
    n = words.numel()
    m = n // _WIDTH
    matrix = words[: m * _WIDTH].view(m, _WIDTH)
    rows, columns = matrix.sum(1), matrix.sum(0)
    tail = words[m * _WIDTH :]
    index = torch.arange(m, dtype=torch.int64, device=words.device)
    tail_weights = torch.arange(2 * m * _WIDTH + 1, 2 * n, 2, dtype=torch.int64, device=words.device)
    plain = rows.sum() + tail.sum()
    weighted = 2 * _WIDTH * (rows * index).sum() + (columns * _column_weights(words.device)[0]).sum() + (tail * tail_weights).sum()
    return torch.stack([plain, weighted]).reshape(1, 2)


class _Plan:
    """How to fingerprint tensors of one signature (dtype, size, device of each): which go
    together, where each one's words start, and the index arrays, made once."""

    def __init__(self, signature: Tuple[Tuple[torch.dtype, int, torch.device], ...]) -> None:
        self.out_device = signature[0][2]
        self.parts: List[Tuple[str, Any]] = []  # ("batch", (members, index)) or ("large", i)
        order: List[int] = []
        words = [-(-numel * dtype.itemsize // 8) for dtype, numel, _ in signature]
        batches: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for i, (dtype, numel, device) in enumerate(signature):
            # on a GPU every launch costs more than the arithmetic: batch all but the largest
            if words[i] >= (_SMALL if device.type == "cpu" else _BATCH):
                self.parts.append(("large", i))
                order.append(i)
                continue
            members = batches.setdefault((device, dtype), [])
            if sum(words[j] for j in members) + words[i] > _BATCH:  # a batch's copies stay bounded
                self._add_batch(members, words, signature, order)
                members = batches[(device, dtype)] = []
            members.append(i)
        for members in batches.values():
            if members:
                self._add_batch(members, words, signature, order)
        self.inverse = None if order == list(range(len(order))) else torch.argsort(torch.tensor(order)).to(self.out_device)

    def _add_batch(self, members: List[int], words: List[int], signature: Any, order: List[int]) -> None:
        dtype, _, device = signature[members[0]]
        # a zero word first (so that every start has a word before it), each member padded to whole words
        lead = torch.zeros(max(1, 8 // dtype.itemsize), dtype=dtype, device=device)
        lead_words = lead.numel() * dtype.itemsize // 8
        pads = [(-signature[i][1] * dtype.itemsize) % 8 // dtype.itemsize for i in members]
        pieces: List[Any] = [lead]
        for i, pad in zip(members, pads):
            pieces.append(i)
            if pad:
                pieces.append(torch.zeros(pad, dtype=dtype, device=device))
        sizes = torch.tensor([words[i] for i in members], dtype=torch.int64)
        starts = lead_words + torch.cumsum(sizes, 0) - sizes
        ends = starts + sizes
        index = {
            "ends": torch.cat([ends - 1, starts - 1]).to(device),
            "shift": (2 * starts).to(device),
            "weights": torch.arange(1, 2 * int(ends[-1]), 2, dtype=torch.int64, device=device),
            "pieces": pieces,
        }
        if device.type == "cpu":
            total = len(index["weights"])
            index["numpy"] = (*(index[k].numpy() for k in ("ends", "shift", "weights")),
                              np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64))
        self.parts.append(("batch", (list(members), index)))
        order.extend(members)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        results = []
        with torch.no_grad():
            for kind, what in self.parts:
                if kind == "large":
                    t = tensors[what]
                    if t.device.type == "cpu":
                        results.append(torch.tensor([_large_numpy(_words(t).numpy())], dtype=torch.int64).to(self.out_device))
                    else:
                        results.append(_large_torch(_words(t)).to(self.out_device))
                    continue
                members, index = what
                flat = [tensors[p] if isinstance(p, int) else p for p in index["pieces"]]
                words = torch.cat([t.detach().reshape(-1) for t in flat]).view(torch.int64)
                if words.device.type == "cpu":
                    results.append(torch.from_numpy(_segments(words.numpy(), index["numpy"])).to(self.out_device))
                    continue
                n = len(members)
                plain = torch.cumsum(words, 0).index_select(0, index["ends"])
                seg_plain = plain[:n] - plain[n:]
                weighted = torch.cumsum(words * index["weights"], 0).index_select(0, index["ends"])
                # word j of a tensor starting at s has the global weight 2(s + j) + 1; checksum weighs it 2j + 1
                seg_weighted = weighted[:n] - weighted[n:] - index["shift"] * seg_plain
                results.append(torch.stack([seg_plain, seg_weighted], 1).to(self.out_device))
            sums = torch.cat(results) if len(results) > 1 else results[0]
            return sums if self.inverse is None else sums.index_select(0, self.inverse)


def _segments(words: np.ndarray, index: Tuple[np.ndarray, ...]) -> np.ndarray:
    """The batch path in numpy: prefix sums of the words and of the weighted words, differenced
    at each tensor's bounds, in buffers made once per plan. int64 arithmetic wraps as torch's."""
    ends, shift, weights, scratch, prefix = index
    n = len(shift)
    plain = np.cumsum(words, out=prefix)[ends]
    weighted = np.cumsum(np.multiply(words, weights, out=scratch), out=prefix)[ends]
    out = np.empty((n, 2), dtype=np.int64)
    np.subtract(plain[:n], plain[n:], out=out[:, 0])
    np.subtract(weighted[:n], weighted[n:], out=out[:, 1])
    out[:, 1] -= shift * out[:, 0]
    return out
