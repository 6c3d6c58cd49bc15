"""Segmentation: nucleus masks (classical, cellpose), segmentation metrics, transfer from an ISL model
and the few-image experiment.

May import ``data``, ``models``, ``training``, ``export``, ``inference``; never ``evaluation`` or ``serving``.
"""
