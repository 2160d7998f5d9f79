"""The benchmark's sections, one module each, run in order by benchmarks.runner.

Each module has `run(ctx, ...)`, which measures its section and stores the result under its
key in ctx.details; common.py holds what they share.
"""
