#!/usr/bin/env bash
# Sets up a fresh Debian machine and runs all checks: ruff, mypy --strict, the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
python3 -m ruff check weft tests bench
python3 -m mypy
python3 -m pytest -q -p no:cacheprovider "$@"
