"""BPE training the slow, obvious way (minbpe's): after every merge, recount every pair of every
pre-token. It learns the same merges as the fast ``trainer.train_bpe``, which is tested against it.

    >>> train_bpe_reference({b"aaabdaaabac": 1}, 3)    # Wikipedia's example: aa -> 256, ab -> 257, ...
    [(97, 97), (97, 98), (256, 257)]
"""
import collections

__all__ = ["get_stats", "merge", "train_bpe_reference"]


def get_stats(ids, counts=None, weight=1):
    """Counts of consecutive pairs in ``ids``, each occurrence adding ``weight``, added into ``counts``
    (a new dict when None). Overlapping pairs count: (1, 1, 1) holds (1, 1) twice.

    >>> get_stats([1, 2, 3, 1, 2])
    {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge(ids, pair, new_id):
    """``ids`` with every occurrence of ``pair`` replaced by ``new_id``, left to right.

    >>> merge([1, 2, 3, 1, 2], (1, 2), 4)
    [4, 3, 4]
    >>> merge([1, 1, 1], (1, 1), 4)
    [4, 1]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe_reference(word_counts, num_merges):
    """Up to ``num_merges`` merges from {bytes pre-token: count}, as ``train_bpe``: merge k makes id
    256 + k; the most frequent pair wins, ties go to the smallest (left id, right id)."""
    words = {tuple(word): count for word, count in word_counts.items()}
    merges = []
    for k in range(num_merges):
        counts = {}
        for ids, count in words.items():
            get_stats(ids, counts, count)
        if not counts:
            break
        best = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best)
        merges.append(pair)
        merged = collections.Counter()
        for ids, count in words.items():
            merged[tuple(merge(ids, pair, 256 + k))] += count
        words = merged
    return merges
