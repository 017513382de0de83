#!/bin/sh
# cwlite's Python dependencies that Debian 12 ships too old (FastAPI, SQLAlchemy 2, pydantic 2, tpm2-pytss 2, ...)
# come with the package under /usr/lib/cwlite/python, first on the path; everything else is Debian's.
PYTHONPATH=/usr/lib/cwlite/python${PYTHONPATH:+:$PYTHONPATH} exec /usr/bin/python3 -m controlplane.cli "$@"
