"""Export: a run's SavedModel packaged for other tools - TF Serving's ``MODEL_BASE/<name>/<version>/``
(``serving.py``), a Triton model repository (``triton.py``), a BioImage Model Zoo package (``bioimageio.py`` +
``bioimageio_files.py``); ``command.py`` is ``islkeras export --format ...``.

May import ``data``, ``models`` (the SavedModel format) and ``training`` (the run folder); never ``inference``
or later steps.
"""
