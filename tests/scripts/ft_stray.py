"""A stray client of a fault-tolerant run's lighthouse: it joins the quorum as replica group 99 and
sends a huge pseudo-gradient of the run's shape for a few rounds, then leaves.

    FTS_LIGHTHOUSE=http://127.0.0.1:<port> FTS_NUMEL=98 FTS_ROUNDS=3 python tests/scripts/ft_stray.py
"""

import os

import torch

from lightning_fedopt.fault_tolerance import _torchft as ft


def main() -> None:
    env = ft.ReplicaGroupEnv(lighthouse=os.environ["FTS_LIGHTHOUSE"], replica_id=99)
    comm = ft.ManagedCommunicator.from_env(env=env, timeout=10.0, quorum_timeout=20.0, connect_timeout=5.0)
    try:
        for _ in range(int(os.environ["FTS_ROUNDS"])):
            info = comm.start_round()
            poison = torch.full((int(os.environ["FTS_NUMEL"]),), 1e6)  # deltas, and a count of 1e6
            comm.all_reduce([poison], "sum").wait()
            comm.commit()
            print(f"stray: round with {info.participants} groups", flush=True)
    finally:
        comm.close()


if __name__ == "__main__":
    main()
