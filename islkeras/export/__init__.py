"""Export: a run's SavedModel packaged for other tools (TF Serving's ``MODEL_BASE/<name>/<version>/``).

May import ``data``, ``models`` (the SavedModel format) and ``training`` (the run folder); never ``inference``
or later steps.
"""
