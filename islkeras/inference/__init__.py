"""Inference: whole-field tiled prediction of an exported model and the readers/writers of fields.

May import ``data``, ``export``, ``training.run`` (the run folder) and the top-level modules; never a later step.
"""
