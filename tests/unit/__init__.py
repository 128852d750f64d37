"""Tests that start no process (the fast inner loop: ``pytest -m "not multiprocess"``)."""
