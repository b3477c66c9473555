#!/bin/sh
# The project's tests in a throwaway container, as root in it, with every feature (limits too).
# Run from the project's directory; use docker instead of podman if that is what you have.
set -eu
podman run --rm --privileged -v "$PWD:/src" -w /src python:3.12-bookworm sh -c '
    python -m pip install -q -e ".[test]" && envbox doctor && python -m pytest -rs'
