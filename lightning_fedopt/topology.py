"""With whom replicas talk: communication topologies and their mixing matrices.

A :class:`Topology` gives, for every gossip round ``t``, a mixing matrix ``W(t)`` (``N x N``,
non-negative, doubly stochastic): one gossip step is ``theta_i <- sum_j W_ij(t) theta_j``. Replica
``i`` receives from its *in-neighbours* ``{j != i : W_ij > 0}`` and sends to its *out-neighbours*
``{k != i : W_ki > 0}``, point-to-point.

* :func:`ring`, :func:`torus` — undirected graphs with Metropolis-Hastings weights
  ``W_ij = 1 / (max(d_i, d_j) + 1)``, ``W_ii = 1 - sum_j W_ij`` (symmetric; 1/3 on a ring).
* :func:`exponential` — each replica sends to ``i + 2^k`` (``k = 0..ceil(log2 N)-1``), uniform weights
  ``1/(tau + 1)`` (Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep
  Training", NeurIPS 2021; Assran et al., "Stochastic Gradient Push", ICML 2019). Doubly stochastic,
  not symmetric.
* :func:`one_peer_exponential` — round ``t`` uses the single offset ``2^(t mod tau)``,
  ``W = (I + P)/2`` (time-varying; exact averaging after ``tau`` rounds when N is a power of two).
* :func:`random_matching` — a random perfect matching drawn from a round-seeded RNG, ``W = (I + P)/2``.
* :func:`fully_connected` — ``W = 11^T / N``.
* :func:`from_matrix` — a user-supplied matrix (or a cycle of matrices), validated.

The :attr:`Topology.spectral_gap` ``1 - ||W - 11^T/N||_2`` (for a time-varying topology, per round
over one period: ``1 - ||prod_t W(t) - 11^T/N||_2^(1/P)``) measures how fast gossip mixes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_fedopt._validate import check_bool, check_int, check_seed, check_str

__all__ = [
    "TOPOLOGIES",
    "Topology",
    "check_mixing_matrix",
    "exponential",
    "from_matrix",
    "fully_connected",
    "make_topology",
    "metropolis_hastings",
    "one_peer_exponential",
    "random_matching",
    "ring",
    "torus",
]

_TOL = 1e-6


#: the most replicas a topology may have: mixing matrices are dense ``n x n`` float64 tensors
#: (128 MiB at this bound), so a larger ``n`` is refused rather than built
MAX_REPLICAS = 4096


def _check_n(n: object) -> int:
    """``n``, the number of replicas, as an ``int`` in ``[1, MAX_REPLICAS]`` (``ValueError`` naming ``n``
    otherwise)."""
    return check_int("n", n, low=1, high=MAX_REPLICAS)


def metropolis_hastings(adjacency: torch.Tensor) -> torch.Tensor:
    """Metropolis-Hastings weights of an undirected graph (a symmetric 0/1 adjacency, no self loops).

    ``W_ij = 1/(max(d_i, d_j) + 1)`` for each edge, ``W_ii = 1 - sum_{j != i} W_ij``: symmetric and
    doubly stochastic for any undirected graph.

    Example:
        >>> a = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
        >>> metropolis_hastings(a)
        tensor([[0.6667, 0.3333, 0.0000],
                [0.3333, 0.3333, 0.3333],
                [0.0000, 0.3333, 0.6667]], dtype=torch.float64)
    """
    try:
        a = torch.as_tensor(adjacency)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"`adjacency` must be a square 0/1 matrix, got {adjacency!r}") from None
    if a.is_complex() or (a.is_floating_point() and not bool(torch.isfinite(a).all())):
        raise ValueError("`adjacency` must be a square 0/1 matrix of finite numbers")
    a = (a != 0).to(torch.float64)
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"`adjacency` must be a square matrix, got shape {tuple(a.shape)}")
    a.fill_diagonal_(0)
    if not torch.equal(a, a.T):
        raise ValueError(
            "`adjacency` must be symmetric (an undirected graph) for Metropolis-Hastings weights"
        )
    deg = a.sum(1)
    w = a / (torch.maximum(deg[:, None], deg[None, :]) + 1)
    w += torch.diag(1 - w.sum(1))
    return w


def _strongly_connected(support: torch.Tensor) -> bool:
    """Whether the directed graph with edges ``j -> i`` where ``support[i, j]`` reaches every node from 0 and back."""
    n = support.shape[0]
    s = support.bool().clone()
    s.fill_diagonal_(True)
    for cols in (s.T.contiguous(), s):  # cols[j]: the nodes j reaches (then: the nodes reaching j)
        seen = torch.zeros(n, dtype=torch.bool)
        seen[0] = True
        frontier = seen.clone()
        while bool(frontier.any()):  # breadth-first: each node's column is read once, O(n^2) in all
            reach = cols[frontier].any(0)
            frontier = reach & ~seen
            seen |= reach
        if not bool(seen.all()):
            return False
    return True


def check_mixing_matrix(w: Any, *, name: str = "`w` (mixing matrix)", connected: bool = True) -> torch.Tensor:
    """Validate a gossip mixing matrix; returns it as float64.

    Raises:
        ValueError: if ``w`` is not square, has negative or non-finite entries, its rows or
            columns do not sum to 1 (within 1e-6), or (``connected=True``) its graph is not
            strongly connected.

    Example:
        >>> check_mixing_matrix([[0.5, 0.5], [0.5, 0.5]]).sum().item()
        2.0
        >>> check_mixing_matrix([[0.9, 0.2], [0.1, 0.8]])
        Traceback (most recent call last):
        ...
        ValueError: `w` (mixing matrix) is not doubly stochastic: column sums [1.0, 1.0] but row sums [1.1, 0.9] (all must be 1)
    """
    connected = check_bool("connected", connected)
    try:
        w = torch.as_tensor(w, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"{name} must be a square matrix of numbers, got {w!r}") from None
    if w.dim() != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must have finite, non-negative entries")
    rows, cols = w.sum(1), w.sum(0)
    if (rows - 1).abs().max() > _TOL or (cols - 1).abs().max() > _TOL:
        raise ValueError(
            f"{name} is not doubly stochastic: column sums {[round(float(c), 6) for c in cols]} but row sums "
            f"{[round(float(r), 6) for r in rows]} (all must be 1)"
        )
    if connected and not _strongly_connected(w > 0):
        raise ValueError(f"{name}: the graph is not connected (some replicas never exchange information)")
    return w


class Topology:
    """A (possibly time-varying) communication graph over ``n`` replicas.

    Args:
        n: number of replicas.
        matrix_fn: round -> mixing matrix (``n x n``, float64, doubly stochastic).
        name: a short description.
        period: the matrices repeat every ``period`` rounds (1 for a static topology; None when
            they never repeat, e.g. random matchings).
        symmetric: whether every ``W(t)`` is symmetric (undirected graph).

    Build topologies with :func:`ring`, :func:`torus`, :func:`exponential`,
    :func:`one_peer_exponential`, :func:`random_matching`, :func:`fully_connected`,
    :func:`from_matrix` or :func:`make_topology`.

    Example:
        >>> t = ring(4)
        >>> t.in_neighbors(0, 0)
        {1: 0.3333333333333333, 3: 0.3333333333333333}
        >>> round(t.spectral_gap, 4)
        0.6667
    """

    def __init__(
        self,
        n: int,
        matrix_fn: Callable[[int], torch.Tensor],
        name: str,
        period: int | None = 1,
        symmetric: bool = True,
    ) -> None:
        self.n = _check_n(n)
        if not callable(matrix_fn):
            raise ValueError(f"`matrix_fn` must be a callable round -> mixing matrix, got {matrix_fn!r}")
        self._matrix_fn = matrix_fn
        self.name = check_str("name", name)
        self.period = check_int("period", period, low=1, allow_none=True)
        self.symmetric = check_bool("symmetric", symmetric)
        self._cache: dict[int, torch.Tensor] = {}
        self._gap: float | None = None
        self._check_first_matrix()

    def _check_first_matrix(self) -> None:
        """Refuse a ``matrix_fn`` whose ``W(0)`` is not an ``n x n`` doubly stochastic matrix (later
        rounds are checked where they are used: the strategy checks each matrix it gossips with)."""
        try:
            w = check_mixing_matrix(self.matrix(0), name="`matrix_fn`(0)", connected=False)
        except ValueError:
            raise
        except Exception as err:  # the user's callable failed
            raise ValueError(f"`matrix_fn`(0) failed: {type(err).__name__}: {err}") from err
        if tuple(w.shape) != (self.n, self.n):
            raise ValueError(f"`matrix_fn`(0) must be `n` x `n` = {self.n} x {self.n}, got {tuple(w.shape)}")

    @property
    def time_varying(self) -> bool:
        return self.period != 1

    def matrix(self, round_index: int = 0) -> torch.Tensor:
        """``W(round_index)`` (float64, ``n x n``)."""
        key = round_index % self.period if self.period else round_index
        w = self._cache.get(key)
        if w is None:
            w = self._matrix_fn(key)
            if len(self._cache) < 64:
                self._cache[key] = w
        return w

    def in_neighbors(self, rank: int, round_index: int = 0) -> dict[int, float]:
        """Peers whose models ``rank`` receives in round ``round_index``, with their weights ``W[rank, j]``."""
        row = self.matrix(round_index)[rank]
        return {j: float(row[j]) for j in range(self.n) if j != rank and row[j] > 0}

    def out_neighbors(self, rank: int, round_index: int = 0) -> list[int]:
        """Peers that receive ``rank``'s model in round ``round_index``."""
        col = self.matrix(round_index)[:, rank]
        return [k for k in range(self.n) if k != rank and col[k] > 0]

    def self_weight(self, rank: int, round_index: int = 0) -> float:
        return float(self.matrix(round_index)[rank, rank])

    @property
    def spectral_gap(self) -> float:
        """``1 - ||W - J||_2`` (J = 11^T/n); per round over one period for a time-varying topology
        (over 16 rounds for random matchings). 1 means exact averaging in one round, 0 no mixing."""
        if self._gap is None:
            rounds = self.period or 16
            prod = torch.eye(self.n, dtype=torch.float64)
            for t in range(rounds):
                prod = self.matrix(t) @ prod
            j = torch.full((self.n, self.n), 1.0 / self.n, dtype=torch.float64)
            rho = float(torch.linalg.matrix_norm(prod - j, ord=2)) if self.n > 1 else 0.0
            self._gap = 1.0 - max(rho, 0.0) ** (1.0 / rounds)
        return self._gap

    def __repr__(self) -> str:
        return f"Topology({self.name}, n={self.n})"


def _undirected(n: int, edges: Sequence[tuple[int, int]], name: str) -> Topology:
    a = torch.zeros(n, n)
    for i, j in edges:
        if i != j:
            a[i, j] = a[j, i] = 1
    w = metropolis_hastings(a)
    check_mixing_matrix(w, name=name)
    return Topology(n, lambda t: w, name)


def ring(n: int) -> Topology:
    """A ring: each replica talks to ``i - 1`` and ``i + 1`` (weights 1/3 each for ``n >= 3``).

    Example:
        >>> [round(x, 4) for x in ring(3).matrix()[0].tolist()]
        [0.3333, 0.3333, 0.3333]
    """
    n = _check_n(n)
    return _undirected(n, [(i, (i + 1) % n) for i in range(n)], f"ring({n})")


def torus(n: int, rows: int | None = None) -> Topology:
    """A 2-D torus of ``rows x n/rows`` replicas (default: the most square factorisation).

    Example:
        >>> torus(9).in_neighbors(4)
        {1: 0.2, 3: 0.2, 5: 0.2, 7: 0.2}
    """
    n = _check_n(n)
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    rows = check_int("rows", rows, low=1)
    if n % rows:
        raise ValueError(f"`rows` must be a positive divisor of n={n}, got {rows!r}")
    cols = n // rows
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges.append((i, r * cols + (c + 1) % cols))
            edges.append((i, ((r + 1) % rows) * cols + c))
    return _undirected(n, edges, f"torus({rows}x{cols})")


def _offsets(n: int) -> list[int]:
    return [2**k for k in range(max(1, math.ceil(math.log2(n))))] if n > 1 else []


def exponential(n: int) -> Topology:
    """Static exponential graph: replica ``i`` sends to ``i + 2^k mod n`` for every ``2^k < n``, uniform weights.

    Example:
        >>> exponential(4).in_neighbors(0)
        {2: 0.3333333333333333, 3: 0.3333333333333333}
    """
    n = _check_n(n)
    offsets = sorted({o % n for o in _offsets(n)} - {0})
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        w[i, i] = 1.0
        for o in offsets:
            w[(i + o) % n, i] = 1.0  # i sends to i + o
    w /= len(offsets) + 1
    check_mixing_matrix(w, name="exponential graph")
    return Topology(n, lambda t: w, f"exponential({n})", symmetric=bool(torch.equal(w, w.T)))


def one_peer_exponential(n: int) -> Topology:
    """Time-varying one-peer exponential graph: in round ``t`` replica ``i`` sends to ``i + 2^(t mod tau)``.

    Example:
        >>> t = one_peer_exponential(8)
        >>> [t.out_neighbors(0, r) for r in range(4)]
        [[1], [2], [4], [1]]
        >>> t.spectral_gap  # exact averaging after log2(8) rounds
        1.0
    """
    n = _check_n(n)
    offsets = _offsets(n)

    def matrix(t: int) -> torch.Tensor:
        w = torch.eye(n, dtype=torch.float64) / 2
        if n == 1:
            return w * 2
        o = offsets[t % len(offsets)]
        for i in range(n):
            w[(i + o) % n, i] += 0.5
        return w

    return Topology(n, matrix, f"one_peer_exponential({n})", period=max(1, len(offsets)), symmetric=n <= 2)


def random_matching(n: int, seed: int = 0) -> Topology:
    """A random perfect matching per round from a round-seeded RNG, ``W = (I + P)/2`` (one replica idle if n is odd).

    Example:
        >>> t = random_matching(4, seed=1)
        >>> sorted(len(t.in_neighbors(i, 5)) for i in range(4))
        [1, 1, 1, 1]
    """
    n = _check_n(n)
    seed = check_seed("seed", seed)

    def matrix(t: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + int(t) * 7919 + 29) % 2**64)
        perm = torch.randperm(n, generator=gen).tolist()
        w = torch.eye(n, dtype=torch.float64)
        for a, b in zip(perm[0::2], perm[1::2]):
            w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        return w

    return Topology(n, matrix, f"random_matching({n}, seed={seed})", period=None)


def fully_connected(n: int) -> Topology:
    """Everyone with everyone: ``W = 11^T / n`` (one gossip step is exact averaging).

    Example:
        >>> fully_connected(4).spectral_gap
        1.0
    """
    n = _check_n(n)
    w = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return Topology(n, lambda t: w, f"fully_connected({n})")


def from_matrix(w: Any) -> Topology:
    """A topology from a user-supplied mixing matrix, or a sequence of them used in turn.

    Every matrix must be doubly stochastic; the union of their graphs must be connected.

    Example:
        >>> from_matrix([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]]).symmetric
        True
    """
    if isinstance(w, (list, tuple)) and w and isinstance(w[0], torch.Tensor):
        mats = [torch.as_tensor(m, dtype=torch.float64) for m in w]
    else:
        try:
            t = torch.as_tensor(w, dtype=torch.float64)
        except (ValueError, TypeError):  # a ragged list: matrices of different sizes
            raise ValueError("`topology` (from_matrix): the matrices must all be n x n for one n") from None
        mats = list(t) if t.dim() == 3 else [t]
    mats = [
        check_mixing_matrix(m, name=f"`topology` (mixing matrix {k})", connected=False)
        for k, m in enumerate(mats)
    ]
    if len({m.shape for m in mats}) != 1:
        raise ValueError("`topology` (from_matrix): the matrices must all be n x n for one n")
    support = torch.stack(mats).sum(0)
    if not _strongly_connected(support > 0):
        raise ValueError(
            "`topology` (mixing matrix): the graph is not connected (some replicas never exchange information)"
        )
    sym = all(torch.allclose(m, m.T, atol=_TOL) for m in mats)
    return Topology(
        mats[0].shape[0], lambda t: mats[t % len(mats)], "custom", period=len(mats), symmetric=sym
    )


#: name -> constructor taking ``n`` (and ``seed`` for ``random_matching``)
TOPOLOGIES: dict[str, Callable[..., Topology]] = {
    "ring": ring,
    "torus": torus,
    "exponential": exponential,
    "one_peer_exponential": one_peer_exponential,
    "random_matching": random_matching,
    "fully_connected": fully_connected,
    "full": fully_connected,
}


def make_topology(spec: str | Topology | Any, n: int, *, seed: int = 0) -> Topology:
    """Build the topology named ``spec`` for ``n`` replicas, or check a given one fits ``n``.

    ``spec`` is a name in :data:`TOPOLOGIES`, a :class:`Topology`, or a mixing matrix.

    Raises:
        ValueError: unknown name, or a topology/matrix for a different number of replicas.

    Example:
        >>> make_topology("ring", 5).name
        'ring(5)'
        >>> make_topology(ring(8), 4)
        Traceback (most recent call last):
        ...
        ValueError: `topology` ring(8) needs 8 replicas but there are 4
    """
    n = _check_n(n)
    seed = check_seed("seed", seed)
    if isinstance(spec, str):
        if spec not in TOPOLOGIES:
            raise ValueError(f"`topology` must be one of {sorted(TOPOLOGIES)} or a Topology, got {spec!r}")
        return TOPOLOGIES[spec](n, seed=seed) if spec == "random_matching" else TOPOLOGIES[spec](n)
    topo = spec if isinstance(spec, Topology) else from_matrix(spec)
    if topo.n != n:
        raise ValueError(f"`topology` {topo.name} needs {topo.n} replicas but there are {n}")
    return topo
