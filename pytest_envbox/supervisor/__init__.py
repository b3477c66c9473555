"""The supervisor layer: the helper process that owns every sandbox resource, and its protocol.

Empty on purpose: the test process imports :mod:`.protocol` (and :mod:`.records`, for the CLI)
alone, and the supervisor's lean interpreter imports only what it runs.
"""

__all__: list[str] = []
