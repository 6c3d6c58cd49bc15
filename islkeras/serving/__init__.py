"""Serving: the HTTP server for exported SavedModels (TF Serving REST routes) and its model repository.

May import ``export`` and ``inference`` and the top-level modules; nothing imports ``serving``.
"""
