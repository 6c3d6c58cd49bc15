"""Data: microscope files -> TFRecord shards + manifest.json -> tf.data pipelines (readers, records,
normalisation, pipeline, synthetic fields).

The first step: imports only the top-level modules (``config``, ``errors``, ``utils``), never a later step.
"""
