#!/usr/bin/env bash
# The device check (bench/device.py), e.g. bash bench/device.sh --size vith14 --out $OUT/device.json
cd "$(dirname "$0")/.." && PYTHONPATH=src exec "$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)" bench/device.py "$@"
