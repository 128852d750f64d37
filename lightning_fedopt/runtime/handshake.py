"""The start-up handshake: every rank must run the same algorithm with the same settings on a model
of the same structure, or none of them trains.

Ranks configured differently (``sync_every`` 4 on one and 8 on another, another outer learning
rate, another strategy class, a hidden layer of 32 units against 33, another compressor) pair
their collectives across different steps or different sizes: a run then hangs, aborts inside gloo
with no Python traceback, or ends "successfully" with replicas that never agreed.
:func:`check_agreement` compares, before the first step, a description of each rank's
configuration (:func:`agreement_fields`): one all-gather of a 32-byte SHA-256 of all fields; only
when those differ, a second all-gather of the fields themselves (plain strings, as JSON in a
tensor) so that every rank raises the same :class:`ValueError` naming the fields and the ranks that
differ. Weights may differ (``initial_sync`` makes them equal); their names, shapes and dtypes may
not.

A strategy describes its agreed configuration with an optional method
``agreement_fields() -> dict[str, str]``; without one, :func:`agreement_fields` derives it from the
strategy object: its class, its public attributes (``schedule``, ``sync_every``, an outer optimizer
factory, a compressor, a topology, ``group_size``, ``round_seconds``, ...; object addresses
removed from their ``repr``) and the names, shapes and dtypes of the module's parameters and
buffers.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch

from lightning_fedopt.comm import Communicator
from lightning_fedopt.errors import AgreementError

__all__ = ["AgreementError", "agreement_fields", "check_agreement", "default_agreement_fields"]

#: public strategy attributes that legitimately differ between ranks or describe no setting
_PER_RANK = frozenset(
    {
        "accelerator",
        "checkpoint_io",
        "checkpoints",
        "cluster_environment",
        "comm",
        "comms",
        "consensus",
        "faults",
        "lightning_module",
        "lr_scheduler_configs",
        "meeting",
        "model",
        "optimizers",
        "parallel_devices",
        "patches",
        "precision_plugin",
        "run",
        "selection_history",
        "tracked",
        "validation",
    }
)
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")
#: longest value shown in an error (the comparison uses the whole value's digest)
_SHOWN = 200
#: fields shown in an error
_SHOWN_FIELDS = 8


def describe(value: Any) -> str:
    """A process-independent text for ``value``: its ``repr`` without object addresses."""
    return _ADDRESS.sub("", repr(value))


def default_agreement_fields(strategy: Any) -> dict[str, str]:
    """The fields every rank must agree on, derived from ``strategy`` itself (see the module doc)."""
    cls = type(strategy)
    fields = {"strategy": f"{cls.__module__}.{cls.__qualname__}"}
    for name, value in sorted(vars(strategy).items()):
        if name.startswith("_") or name in _PER_RANK:
            continue
        fields[name] = describe(value)
    precision = getattr(getattr(strategy, "precision_plugin", None), "precision", None)
    if precision is not None:
        fields["precision"] = str(precision)
    module = getattr(strategy, "lightning_module", None)
    if module is not None:
        named = [*module.named_parameters(), *module.named_buffers()]
        fields["module tensors"] = str(len(named))
        for name, t in named:
            fields[f"tensor {name}"] = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
    return fields


def agreement_fields(strategy: Any) -> dict[str, str]:
    """``strategy.agreement_fields()`` when the strategy defines it, else :func:`default_agreement_fields`."""
    hook = getattr(strategy, "agreement_fields", None)
    fields = hook() if callable(hook) else default_agreement_fields(strategy)
    return {str(k): str(v) for k, v in fields.items()}


def _digest(fields: dict[str, str]) -> torch.Tensor:
    h = hashlib.sha256()
    for k in sorted(fields):
        for part in (k, fields[k]):
            data = part.encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def check_agreement(
    comm: Communicator, fields: dict[str, str], *, device: torch.device | None = None
) -> None:
    """Raise :class:`AgreementError` on every rank when some rank's ``fields`` differ (a collective).

    One all-gather of 32 bytes when the ranks agree (purpose ``"setup"``); when they do not, a
    second all-gather of every rank's fields (plain strings) names what differs. ``device``: where
    the digest travels (NCCL needs a CUDA tensor).
    """
    if not comm.available or comm.world_size <= 1:
        return
    digest = _digest(fields)
    digests = comm.all_gather(digest if device is None else digest.to(device), purpose="setup").wait()
    if all(torch.equal(d, digests[0]) for d in digests):
        return
    everyone = comm.all_gather_object(fields, purpose="setup")
    keys = sorted(
        {k for f in everyone for k in f}, key=lambda k: (k != "strategy", k.startswith("tensor "), k)
    )
    lines = []
    for key in keys:
        values = [f.get(key) if isinstance(f, dict) else None for f in everyone]
        if len(set(values)) == 1:
            continue
        by_value: dict[str | None, list[int]] = {}
        for r, v in enumerate(values):
            by_value.setdefault(v, []).append(r)
        shown = "; ".join(
            f"rank(s) {ranks}: {'(absent)' if v is None else v[:_SHOWN]}" for v, ranks in by_value.items()
        )
        lines.append(f"{key} differs: {shown}")
    more = f" (and {len(lines) - _SHOWN_FIELDS} more)" if len(lines) > _SHOWN_FIELDS else ""
    raise AgreementError(
        "lightning_fedopt: the ranks are not configured alike, so none of them trains (checked before "
        "the first step; every rank must build the same strategy with the same arguments and the same "
        "model): " + " | ".join(lines[:_SHOWN_FIELDS]) + more
    )
