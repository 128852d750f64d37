"""Fault tolerance: deadlines, preemption, elastic restarts and in-process recovery."""
