"""Gradient buckets: the flat gradient cut into a few contiguous ranges, each reduced by one collective
that starts as soon as backward has finished every gradient in it (PyTorch DDP's buckets, Li et al.
2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training").

Layout. The flat buffer (``optim.flat.FlatParameters``) holds parameter i at [offset_i, offset_i +
size_i). Walking from its end, a bucket closes once it holds ``bucket_elements``; its lower edge is
a parameter's start rounded down to a multiple of N (the number of ranks), so every bucket but the
one ending at the buffer's end splits into N equal chunks (ZeRO's reduce-scatter, ``comm.py`` (C2)).
For a bucket [lo, hi) with c = floor((hi - lo) / N):

    chunk of rank r:  [lo + r c, lo + (r + 1) c)          reduce-scattered, then all-gathered
    tail:             [lo + N c, hi)   (< N elements)     all-reduced, updated by every rank

Readiness. A parameter's gradient is complete once the *last* node that uses it has run its backward.
The engine walks the graph in reverse topological order, so that node is the user that comes
*first* in ``loss.topological_order()``. ``GradientReadiness.arm(loss)`` wraps that node's
``_backward`` to count the parameter done; a bucket whose parameters are all done is launched,
buckets strictly in launch order (the last bucket of the buffer first), so every rank issues the
same collectives in the same order. ``flush`` launches what is left (parameters no node used).
"""
__all__ = ["BucketPlan", "GradientReadiness", "BUCKET_BYTES"]

BUCKET_BYTES = 25 * 2**20      # PyTorch DDP's default bucket_cap_mb=25


class BucketPlan:
    """``buckets``: [(lo, hi), ...] in launch order (highest addresses first), covering [0, total);
    ``chunk(b)`` = c of bucket b; ``members[b]``: indices of the parameters that overlap bucket b.

    ``offsets``, ``sizes``: the flat layout of the parameters; ``world_size``: N; ``bucket_elements``:
    the size at which a bucket closes. E.g. BucketPlan([0, 6, 10], [6, 4, 5], 15, 2, 8).buckets ==
    [(6, 15), (0, 6)]: walking down from 15, the bucket closes at parameter 1's start (15 - 6 >= 8)."""

    def __init__(self, offsets, sizes, total, world_size, bucket_elements):
        self.total, self.world_size = int(total), int(world_size)
        cuts, hi = [], self.total
        for off in reversed(offsets[1:]):                      # every parameter start but the first
            if hi - off >= bucket_elements:
                cut = off - off % self.world_size              # a multiple of N
                if 0 < cut < hi:
                    cuts.append((cut, hi))
                    hi = cut
        cuts.append((0, hi))
        self.buckets = [b for b in cuts if b[1] > b[0]]         # launch order: highest first
        self.members = [[i for i, (o, n) in enumerate(zip(offsets, sizes)) if n and o < hi and o + n > lo]
                        for lo, hi in self.buckets]

    def chunk(self, b):
        lo, hi = self.buckets[b]
        return (hi - lo) // self.world_size

    def own_chunks(self, rank):
        """[(lo, hi)] of rank ``rank``'s chunk in each bucket, in launch order (empty ones left out)."""
        out = []
        for b, (lo, _) in enumerate(self.buckets):
            c = self.chunk(b)
            if c:
                out.append((lo + rank * c, lo + (rank + 1) * c))
        return out

    def tails(self):
        """[(lo, hi)] of the buckets' tails (every rank updates them), in launch order."""
        out = []
        for b, (lo, hi) in enumerate(self.buckets):
            start = lo + self.world_size * self.chunk(b)
            if start < hi:
                out.append((start, hi))
        return out


class GradientReadiness:
    """Calls ``launch(b)`` for every bucket b of ``plan``, in order, as backward completes it.

    ``params``: the parameters in flat order (the plan's indices). ``arm(loss)`` before the backward
    that completes the gradients (the last micro-batch's); ``flush()`` after it."""

    def __init__(self, plan, params, launch):
        self.plan, self.params, self.launch = plan, list(params), launch
        self.buckets_of = [[] for _ in self.params]            # parameter -> the buckets it overlaps
        for b, members in enumerate(plan.members):
            for i in members:
                self.buckets_of[i].append(b)
        self.armed = False
        self.next_bucket = len(plan.buckets)                   # nothing to launch until armed

    def arm(self, loss):
        """Wrap, in ``loss``'s graph, the backward of each parameter's last user (see module doc)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        last_user = {}                                         # parameter index -> node
        for node in loss.topological_order():                  # inputs before their users
            if node._backward is None:
                continue
            for parent in node._prev:
                i = index.get(id(parent))
                if i is not None and i not in last_user:       # first user in order = last in backward
                    last_user[i] = node
        by_node = {}
        for i, node in last_user.items():
            by_node.setdefault(id(node), (node, []))[1].append(i)
        for node, done in by_node.values():
            node._backward = self._signalling(node._backward, done)
        self.missing = [len(m) for m in self.plan.members]     # per bucket: parameters not yet done
        self.next_bucket, self.armed = 0, True

    def _signalling(self, backward, done):
        def backward_then_signal(grad):
            backward(grad)
            self._done(done)
        return backward_then_signal

    def _done(self, indices):
        for i in indices:
            for b in self.buckets_of[i]:
                self.missing[b] -= 1
        while self.next_bucket < len(self.plan.buckets) and self.missing[self.next_bucket] <= 0:
            self.next_bucket += 1
            self.launch(self.next_bucket - 1)

    def flush(self):
        """Launch every bucket not launched yet (all of them when ``arm`` was not called)."""
        start = self.next_bucket if self.armed else 0
        for b in range(start, len(self.plan.buckets)):
            self.launch(b)
        self.next_bucket, self.armed = len(self.plan.buckets), False
