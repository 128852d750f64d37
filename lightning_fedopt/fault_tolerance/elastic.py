"""Running under PyTorch's elastic agent (``torchrun``): the pieces a user's script needs.

A replica strategy with ``elastic=True`` writes a checkpoint at every synchronisation point and
resumes from the latest one whenever ``torchrun`` (re)starts the workers, at whatever world size
the agents' rendezvous formed (see :mod:`lightning_fedopt.fault_tolerance.faults`)::

    # train.py
    trainer = L.Trainer(
        accelerator="gpu", devices=8, num_nodes=lf.elastic.num_nodes(devices=8),
        strategy=lf.DiLoCoStrategy(sync_every=500, elastic=True, sync_timeout=60),
        default_root_dir="/shared/run42", max_steps=100_000,
    )
    trainer.fit(model, datamodule)

    # every site, with the rendezvous store on a host that outlives the sites:
    #   python -m lightning_fedopt.fault_tolerance.elastic store --port 29400        (on that host)
    #   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=2:4 --nproc-per-node=8 --max-restarts=100 --rdzv-backend=c10d \\
    #       --rdzv-endpoint=<host>:29400 --rdzv-id=run42 --rdzv-conf is_host=false train.py
"""

from __future__ import annotations

import argparse
import os
import time

from lightning_fedopt.fault_tolerance.faults import elastic_num_nodes
from lightning_fedopt.fault_tolerance.liveness import ReplicaLostError

__all__ = ["ReplicaLostError", "main", "num_nodes"]


def num_nodes(devices: int | None = None) -> int:
    """``Trainer(num_nodes=...)`` for the world ``torchrun`` formed this time: ``WORLD_SIZE`` over
    the processes per node (``devices``, default ``LOCAL_WORLD_SIZE``); 1 outside ``torchrun``."""
    if devices is None:
        return elastic_num_nodes()
    return max(int(os.environ.get("WORLD_SIZE", str(devices))) // devices, 1)


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_fedopt.fault_tolerance.elastic store --host H --port P``: host a rendezvous store for
    ``torchrun --rdzv-backend=c10d --rdzv-endpoint=H:P --rdzv-conf is_host=false`` on a machine that
    outlives the training nodes (torch's ``TCPStore``; the agents keep their state in it)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_fedopt.fault_tolerance.elastic", description=main.__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    store = sub.add_parser("store", help="host the rendezvous store until killed")
    store.add_argument("--host", default="127.0.0.1", help="the address the agents use to reach the store")
    store.add_argument("--port", type=int, default=29400)
    args = parser.parse_args(argv)
    from lightning_fedopt.comm import host_store

    print(
        "note: torch's TCPStore listens on every interface of this machine whatever --host says, and has no "
        "authentication: anyone who reaches this port can read and write the run's keys (stop it, or pose as "
        "a rank). Keep the port behind a firewall or on a private network (a VPN)",
        flush=True,
    )
    server = host_store(args.host, args.port)
    print(f"rendezvous store on {args.host}:{args.port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        del server


if __name__ == "__main__":
    main()
