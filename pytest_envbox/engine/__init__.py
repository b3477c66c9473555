"""The engine: ``Environment`` and ``ServiceHandle``, the supervisor's client, readiness, reports.

Usable without pytest (the ``envbox`` command uses it too).
"""
