"""Evaluation: numpy image metrics, ``evaluate`` (per-image metrics of a run), figures and ``report``.

May import every earlier step (``data`` ... ``inference``, ``segmentation`` for mask metrics); never ``serving``.
"""
