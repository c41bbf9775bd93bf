"""The merge loop of byte-level BPE for one pre-token: the adjacent pair of lowest rank merges, again
and again, until no adjacent pair is a token; among equal ranks the leftmost pair first, as tiktoken.

Four exact implementations: three chosen by the pre-token's length (``bpe_merge``):
- a list loop, O(n^2) but fast for the short pieces of natural text;
- ``_merge_heap``: a doubly linked list of parts and a min-heap of adjacent pairs, O(n log n), for a
  long run of letters, digits or punctuation (minified code, base64, DNA, 1 MB of "a");
- ``_merge_rounds``: whole rounds of equal-rank merges in NumPy first, for very long pieces, applied
  only while a round is provably what one-at-a-time merging would do; the heap finishes;
and ``bpe_merge_batch`` for many short pre-tokens at once (the new words of a block of text): the
list loop's steps, one merge per word per step, as NumPy operations over all the words together.
"""
import heapq
import itertools

import numpy as np

__all__ = ["bpe_merge", "bpe_merge_batch", "bpe_merge_spans", "span_table", "pair_table", "SHORT_PIECE", "ROUNDS_PIECE"]

_NO_PAIR = 1 << 62               # the rank of a pair that is not a token (above every rank)
_MISSING = (1 << 31) - 1          # the same in bpe_merge_spans, where ranks must fit in 31 bits
SHORT_PIECE = 128                 # longer pre-tokens merge by heap, see bpe_merge
ROUNDS_PIECE = 4096               # and longer still by NumPy rounds first
SMALL_ROUNDS = 8
SPAN_BYTES = 7                    # bpe_merge_batch finds tokens this short by binary search
BATCH_TAIL = 128                  # bpe_merge_batch hands fewer live pieces to the list loop
_BYTES = [bytes([b]) for b in range(256)]


def bpe_merge(piece, ranks, pair_table=None):
    """Token ids of one pre-token ``piece`` (bytes) under ``ranks`` (bytes -> id), lowest rank first.

    Among equal ranks (the same token twice) the leftmost pair merges first, as in tiktoken. A short
    piece uses the list loop below, O(n^2) but fast in C for small n; a long one (a minified file,
    base64, 1 MB of "a") uses ``_merge_heap``, O(n log n), after ``_merge_rounds`` when a
    ``pair_table`` (from ``pair_table(ranks)``) is given. All three give the same ids.

    ``pair_ranks[i]`` is the rank of parts[i] + parts[i+1] (inf if that is not a token); a merge
    changes only the two pairs touching the merged part."""
    if len(piece) > SHORT_PIECE:
        if pair_table is not None and len(piece) > ROUNDS_PIECE:
            return _merge_rounds(piece, ranks, pair_table)
        return _merge_heap(piece, ranks, list(range(len(piece))), [ranks[b] for b in map(_BYTES.__getitem__, piece)])
    return _merge_list([_BYTES[c] for c in piece], ranks)


def _merge_list(parts, ranks):
    """The list loop of ``bpe_merge`` from ``parts`` (a list of tokens, bytes); returns their ids."""
    if len(parts) < 2:
        return [ranks[p] for p in parts]
    get = ranks.get
    pair_ranks = [get(a + b, _NO_PAIR) for a, b in zip(parts, parts[1:])]
    best = min(pair_ranks)
    while best != _NO_PAIR:                          # (ints only: comparing with a float costs more)
        i = pair_ranks.index(best)
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], _NO_PAIR)
        if i:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], _NO_PAIR)
        if not pair_ranks:
            break
        best = min(pair_ranks)
    return [ranks[p] for p in parts]


def span_table(ranks):
    """For ``bpe_merge_spans``: the id of each byte (256,); every token of at most ``SPAN_BYTES``
    bytes as a sorted integer key (its bytes read as a big-endian number, shifted left by 3 bits,
    plus its length: distinct tokens, distinct keys) with the token's rank beside it; and the rank
    of each two-byte token at ``256 * first byte + second`` (65536,; ``_NO_PAIR`` if not a token)."""
    byte_ids = np.array([ranks[b] for b in _BYTES], np.int64)
    tokens = list(ranks)
    values = np.fromiter(ranks.values(), np.int64, len(tokens))
    lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
    padded = np.array(tokens, f"S{SPAN_BYTES}").view(np.uint8).reshape(-1, SPAN_BYTES)   # (V, SPAN_BYTES)
    number = np.zeros(len(tokens), np.int64)
    for k in range(SPAN_BYTES):                      # (longer tokens are cut here, and dropped below)
        number = number << 8 | padded[:, k]
    short = lengths <= SPAN_BYTES
    keys = number[short] >> (8 * (SPAN_BYTES - lengths[short])) << 3 | lengths[short]
    order = np.argsort(keys)
    pairs = np.full(1 << 16, _NO_PAIR, np.int64)
    two = lengths == 2
    pairs[padded[two, 0].astype(np.int64) << 8 | padded[two, 1]] = values[two]
    return byte_ids, keys[order], values[short][order], pairs


def _span_ranks(starts, ends, windows, joined, ranks, table, missing=_NO_PAIR):
    """The rank of each byte span [starts, ends) of ``joined`` (``missing`` if not a token): spans of
    up to SPAN_BYTES bytes by binary search of their keys (from ``windows``: the SPAN_BYTES bytes at
    each offset as one number), longer ones by dict lookups."""
    keys, key_ranks = table[1], table[2]
    lengths = ends - starts
    short = lengths <= SPAN_BYTES
    out = np.full(len(starts), missing, np.int64)
    q = windows[starts[short]] >> (8 * (SPAN_BYTES - lengths[short])) << 3 | lengths[short]
    at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    out[short] = np.where(keys[at] == q, key_ranks[at], missing)
    if not short.all():
        get, long = ranks.get, np.flatnonzero(~short)
        spans = zip(starts[long].tolist(), ends[long].tolist())
        out[long] = [get(joined[s:e], missing) for s, e in spans]
    return out


def bpe_merge_batch(pieces, ranks, table):
    """``[bpe_merge(p, ranks) for p in pieces]`` for many short pieces (bytes, 1+ each), in NumPy steps
    (``bpe_merge_spans``, as lists)."""
    ids, starts, counts = bpe_merge_spans(pieces, ranks, table)
    ids = ids.tolist()
    return [ids[s:s + n] for s, n in zip(starts.tolist(), counts.tolist())]


def bpe_merge_spans(pieces, ranks, table):
    """The ids of many short pieces (bytes, 1+ each) as spans of one array: piece i's ids are
    ``ids[starts[i]:starts[i] + counts[i]]``, equal to ``bpe_merge(pieces[i], ranks)``. ``table``:
    ``span_table(ranks)``.

    The list loop's steps for all pieces at once. Piece i with n parts holds n + 1 slots of flat
    arrays: its parts, then an end slot. Slot s has ``bounds[s]``, the offset of its part in the
    joined pieces (the end slot's: the piece's end, so a part's bytes are bounds[s]:bounds[s + 1]),
    ``ids[s]``, and ``pair_ranks[s]``, the rank of the pair of parts s, s + 1 (``_MISSING`` if not a
    token or s + 1 is the end slot). A step:
    1. keys ``pair_rank << 32 | s`` make one ``minimum.reduceat`` per piece give both its lowest
       rank and the leftmost slot holding it (ties go left, as in the list loop);
    2. pieces with no pair left retire: their parts' ids, contiguous, join the output as they are;
    3. every other piece merges its pair: slot s takes the pair's rank as its id, slot s + 1 goes;
    4. only the two pairs touching a merged part are looked up again (``_span_ranks``: vectorized
       up to SPAN_BYTES bytes, the first step's two-byte pairs in a 65536-entry table).
    Pieces finish in as many steps as their longest needs merges; the last few live pieces finish
    in the list loop (a NumPy step costs more then)."""
    if table[2].size and table[2].max() >= _MISSING:             # (keys need ranks below 2**31 - 1)
        merged = [_merge_list([_BYTES[c] for c in p], ranks) for p in pieces]
        counts = np.fromiter(map(len, merged), np.int64, len(merged))
        return (np.fromiter(itertools.chain.from_iterable(merged), np.int64, int(counts.sum())),
                np.cumsum(counts) - counts, counts)
    joined = b"".join(pieces)
    data = np.frombuffer(joined + bytes(SPAN_BYTES), np.uint8).astype(np.int64)
    windows = np.zeros(len(joined), np.int64)        # the SPAN_BYTES bytes from each offset, big-endian
    for k in range(SPAN_BYTES):
        windows = windows << 8 | data[k:k + len(joined)]
    counts = np.fromiter(map(len, pieces), np.int64, len(pieces))      # parts of each live piece
    first = np.cumsum(counts + 1) - counts - 1       # each live piece's first slot
    bounds = np.arange(len(joined) + len(pieces)) - np.repeat(np.arange(len(pieces)), counts + 1)
    ids = table[0][data[bounds]]
    pair_ranks = np.minimum(table[3][data[bounds] << 8 | data[bounds + 1]], _MISSING)
    pair_ranks[first + counts - 1] = _MISSING        # the last part's and the end slot's
    pair_ranks[first + counts] = _MISSING
    live = np.arange(len(pieces))                    # index in ``pieces`` of each live piece
    out, out_starts, out_counts, size = [], np.zeros(len(pieces), np.int64), np.zeros(len(pieces), np.int64), 0
    while True:
        lowest = np.minimum.reduceat(pair_ranks << 32 | np.arange(len(pair_ranks)), first)   # 1.
        best, at = lowest >> 32, lowest & 0xFFFFFFFF
        done = best == _MISSING
        if done.any():                               # 2.
            keep = np.repeat(~done, counts + 1)
            part = np.ones(len(ids), bool)
            part[first + counts] = False
            out.append(ids[~keep & part])
            out_starts[live[done]] = size + np.cumsum(counts[done]) - counts[done]
            out_counts[live[done]] = counts[done]
            size += len(out[-1])
            if done.all():
                return np.concatenate(out), out_starts, out_counts
            ids, bounds, pair_ranks = ids[keep], bounds[keep], pair_ranks[keep]
            at, best, live, counts = at[~done], best[~done], live[~done], counts[~done]
            new_first = np.cumsum(counts + 1) - counts - 1
            at += new_first - first[~done]
            first = new_first
        if len(live) < BATCH_TAIL:                   # the list loop finishes
            parts = joined_parts(joined, bounds, first, counts)
            tail = [_merge_list(p, ranks) for p in parts]
            tail_counts = np.fromiter(map(len, tail), np.int64, len(tail))
            out.append(np.fromiter(itertools.chain.from_iterable(tail), np.int64, int(tail_counts.sum())))
            out_starts[live] = size + np.cumsum(tail_counts) - tail_counts
            out_counts[live] = tail_counts
            return np.concatenate(out), out_starts, out_counts
        ids[at] = best                               # 3.
        keep = np.ones(len(ids), bool)
        keep[at + 1] = False
        ids, bounds, pair_ranks = ids[keep], bounds[keep], pair_ranks[keep]
        shift = np.arange(len(at))                   # (each piece before lost one slot)
        at -= shift
        first -= shift
        counts -= 1
        right = at + 1 < first + counts              # part at has a right neighbour
        pair_ranks[at[~right]] = _MISSING
        touched = np.concatenate((at[right], at[at > first] - 1))   # 4. pairs (at, at+1), (at-1, at)
        pair_ranks[touched] = _span_ranks(bounds[touched], bounds[touched + 2], windows, joined, ranks, table,
                                          _MISSING)


def joined_parts(joined, bounds, first, counts):
    """Each piece's parts (lists of bytes) from the slot layout of ``bpe_merge_spans``."""
    cuts = bounds.tolist()
    return [[joined[cuts[s]:cuts[s + 1]] for s in range(f, f + n)] for f, n in zip(first.tolist(), counts.tolist())]


def _merge_heap(piece, ranks, starts, part_ids):
    """BPE of ``piece`` from the parts starting at byte offsets ``starts`` with ids ``part_ids``:
    a doubly linked list of parts and a min-heap of (rank, part index) of adjacent pairs.

    A heap key is ``rank << shift | i``, so keys order by rank, then position (leftmost first: a
    part keeps the index of its left end). A merge pushes the two new pairs around the merged part;
    an old key whose pair has since changed is skipped when popped (``pair_rank[i] != rank``)."""
    m, get = len(starts), ranks.get
    starts = starts + [len(piece)]                   # part m: the end
    nxt, prv = list(range(1, m + 2)), list(range(-1, m))
    shift = m.bit_length()
    mask = (1 << shift) - 1
    pair_rank = [get(piece[starts[i]:starts[i + 2]], -1) for i in range(m - 1)] + [-1]
    heap = [r << shift | i for i, r in enumerate(pair_rank) if r >= 0]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        key = pop(heap)
        rank, i = key >> shift, key & mask
        if pair_rank[i] != rank:                     # stale: this pair was merged or changed
            continue
        j = nxt[i]                                   # merge parts i and j into i
        k = nxt[j]
        part_ids[i] = rank
        nxt[i], prv[k], pair_rank[j] = k, i, -1
        r = get(piece[starts[i]:starts[nxt[k]]], -1) if k < m else -1
        pair_rank[i] = r
        if r >= 0:
            push(heap, r << shift | i)
        p = prv[i]
        if p >= 0:
            r = pair_rank[p] = get(piece[starts[p]:starts[k]], -1)
            if r >= 0:
                push(heap, r << shift | p)
    out, i = [], 0
    while i < m:
        out.append(part_ids[i])
        i = nxt[i]
    return out


def pair_table(ranks):
    """For ``_merge_rounds``: every pair of tokens whose concatenation is a token, as sorted keys
    ``left * V + right`` and the ranks they merge to, plus single-byte ranks and token lengths.
    None when two tokens share a rank (then only ``_merge_heap`` is exact)."""
    values = np.fromiter(ranks.values(), np.int64, len(ranks))
    if len(np.unique(values)) != len(values):
        return None
    V, get = int(values.max()) + 1, ranks.get
    keys, merged = [], []
    for token, r in ranks.items():
        for k in range(1, len(token)):
            a = get(token[:k])
            b = get(token[k:]) if a is not None else None
            if b is not None:
                keys.append(a * V + b)
                merged.append(r)
    keys, merged = np.array(keys, np.int64), np.array(merged, np.int64)
    order = np.argsort(keys)
    lengths = np.zeros(V, np.int64)
    lengths[values] = [len(t) for t in ranks]
    byte_ids = np.array([ranks[b] for b in _BYTES], np.int64)
    return keys[order], merged[order], V, lengths, byte_ids


def _merge_rounds(piece, ranks, table):
    """BPE of a long ``piece`` in NumPy rounds, then ``_merge_heap`` for what is left.

    A round takes the lowest pair rank r and merges all its pairs at once, left to right, skipping
    a pair that overlaps the one merged just before it. That is what one-at-a-time merging does
    when every pair the round makes (final, or briefly between two of its merges) ranks above r:
    then the rank-r pairs stay the lowest until all are merged (a pair holding r's bytes and more
    is never r again). A round that would make a lower pair is not applied: the heap finishes from
    the state before it. Rounds pay off while each merges many pairs (1 MB of "a": aa, then aaaa);
    after ``SMALL_ROUNDS`` rounds that merge few, the heap takes over."""
    keys, merged, V, lengths, byte_ids = table

    def lookup(left, right):                         # rank of each pair, _NO_PAIR if none
        q = left * V + right
        at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[at] == q, merged[at], _NO_PAIR)

    ids = byte_ids[np.frombuffer(piece, np.uint8)]
    pair_ranks = lookup(ids[:-1], ids[1:])
    small = 0
    while len(pair_ranks):
        r = pair_ranks.min()
        if r == _NO_PAIR:
            return ids.tolist()
        at = np.flatnonzero(pair_ranks == r)
        if len(at) * 64 < len(ids):
            small += 1
            if small > SMALL_ROUNDS:
                break
        if len(at) > 1:                              # in a run of adjacent pairs keep the 1st, 3rd, ...
            n = np.arange(len(at))
            run_start = np.maximum.accumulate(np.where(np.diff(at, prepend=-2) != 1, n, 0))
            at = at[(n - run_start) % 2 == 0]
        chained = at[:-1][np.diff(at) == 2]          # merged, and so is the pair two parts on
        if len(chained) and lookup(np.full(len(chained), r), ids[chained + 2]).min() < r:
            break                                    # a brief pair (r's token, next part) ranks below r
        new_ids = np.delete(ids, at + 1)
        new_ids[at - np.arange(len(at))] = r
        new_pair_ranks = np.delete(pair_ranks, at)   # the pair after each merged one moves into its place
        new = at - np.arange(len(at))                # merged parts' new indices
        touched = np.concatenate((new - 1, new))
        touched = touched[(touched >= 0) & (touched < len(new_pair_ranks))]
        changed = lookup(new_ids[touched], new_ids[touched + 1])
        if len(changed) and changed.min() < r:
            break                                    # a new pair ranks below r: not one round
        new_pair_ranks[touched] = changed
        ids, pair_ranks = new_ids, new_pair_ranks
    starts = np.concatenate(([0], np.cumsum(lengths[ids])[:-1]))
    return _merge_heap(piece, ranks, starts.tolist(), ids.tolist())
