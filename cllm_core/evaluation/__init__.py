"""Evaluation: the interleaved decoding comparison, its summary and quality measures, the report, and the measured
choice of block size and precision.
"""
