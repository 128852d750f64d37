"""Tests that start real processes (forked/spawned Trainers, subprocess scripts): every test here is
marked ``multiprocess`` by tests/conftest.py."""
