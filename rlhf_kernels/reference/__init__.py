"""Eager PyTorch references: the test oracle and the ``torch`` backend.

Written for clarity, not speed. They compute in the dtype they are given, so tests
call them on float64 inputs to get the exact answer.
"""
