"""``sfm bench``: sfm over each driver against baselines, measured in one run.

Every measurement runs between two processes on loopback: the receiving or echoing side is a
child process started with ``python -m sfm_core.bench.peer``, so the numbers include what a
real deployment pays (two interpreters, two GILs, the kernel in between).
"""
