"""Plan before renting the GPUs: how often (and how compressed) the replicas should talk.

A cost model of the library's strategies and compressors, without torch: given the model's size
(a parameter count or a module), the number of replicas, the link (rate, latency) and the compute
time of a step (measured, or ``6 * params * tokens / FLOP/s``), it gives per strategy and
compressor the bytes a replica sends per round, the seconds a round takes, the share of wall time
spent waiting for it at a given ``H``, and the smallest ``H`` within a budget (e.g. 5%).

* :func:`plan` -> :class:`Plan` (rows, :meth:`Plan.table`, :meth:`Plan.to_dict`), also on the
  command line: ``python -m lightning_fedopt.plan --params 1e9 --replicas 8 --link 1gbit
  --latency 20ms --step-time 0.5`` (``--json`` for JSON);
* :func:`choose_sync_every`: the pure function that ``sync_every="auto"`` calls with measured
  step and round times;
* the formulas: :mod:`lightning_fedopt.plan.cost` (:class:`Spec`, :func:`bytes_per_round`,
  :func:`round_seconds`, :func:`exposed_seconds`, :func:`predict`) and
  :mod:`lightning_fedopt.plan.codecs` (:class:`Codec`, :func:`wire_bytes`: the exact bytes of the
  library's compressed all-reduce).

How to use it and what it leaves out: ``docs/planning.md``.

Example:
    >>> from lightning_fedopt.plan import plan
    >>> p = plan("124672", 4, "100mbit", "31ms", strategies=["ddp", "diloco"], compressors=["none"])
    >>> p.row("diloco").every, round(p.row("ddp").exposed_share, 2)
    (37, 0.66)
"""

from lightning_fedopt.plan.codecs import (
    CODECS,
    TOPOLOGY_DEGREES,
    Codec,
    gossip_degree,
    message_bytes,
    parse_codec,
    wire_bytes,
)
from lightning_fedopt.plan.cost import (
    FP32,
    INT4,
    INT8,
    KINDS,
    Link,
    Prediction,
    Spec,
    bytes_per_round,
    choose_sync_every,
    compute_seconds,
    exposed_seconds,
    exposed_share,
    fit_overhead,
    hops,
    parse_count,
    parse_rate,
    parse_seconds,
    predict,
    round_seconds,
    smallest_every,
)
from lightning_fedopt.plan.planner import (
    DEFAULT_COMPRESSORS,
    STRATEGIES,
    ModelSize,
    Plan,
    Row,
    model_size,
    plan,
)

__all__ = [
    "CODECS",
    "DEFAULT_COMPRESSORS",
    "FP32",
    "INT4",
    "INT8",
    "KINDS",
    "STRATEGIES",
    "TOPOLOGY_DEGREES",
    "Codec",
    "Link",
    "ModelSize",
    "Plan",
    "Prediction",
    "Row",
    "Spec",
    "bytes_per_round",
    "choose_sync_every",
    "compute_seconds",
    "exposed_seconds",
    "exposed_share",
    "fit_overhead",
    "gossip_degree",
    "hops",
    "message_bytes",
    "model_size",
    "parse_codec",
    "parse_count",
    "parse_rate",
    "parse_seconds",
    "plan",
    "predict",
    "round_seconds",
    "smallest_every",
    "wire_bytes",
]
