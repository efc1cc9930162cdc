#!/usr/bin/env bash
# Install raysft and its dependencies (CPU torch). DeepSpeed is built without build isolation because its
# setup imports torch; with isolation pip would fetch a second (CUDA) torch just to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install -q --no-build-isolation "deepspeed>=0.19.8"
python3 -m pip install -q -e ".[dev,lora]"
