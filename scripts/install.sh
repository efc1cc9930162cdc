#!/usr/bin/env bash
# Install what is missing: CPU torch, DeepSpeed, and raysft (editable, from this folder) with its test tools.
# DeepSpeed is built without build isolation because its setup imports torch; with isolation pip would fetch a
# second (CUDA) torch just to build it. A second run finds everything there and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# -I: this folder is not on sys.path, so `raysft` is found only where it is installed
if command -v raysft > /dev/null && python3 -I - "$(pwd)" <<'PY'
import importlib.util, os, sys
needed = ["torch", "deepspeed", "ray", "transformers", "trl", "peft", "datasets", "pytest", "hypothesis", "ruff",
          "jsonschema", "tokenizers", "mlflow", "wandb"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if not os.path.exists(os.path.expanduser("~/.cache/raysft/mlflow-server/bin/mlflow")):
    missing.append("the tests' MLflow server (~/.cache/raysft/mlflow-server)")
spec = importlib.util.find_spec("raysft")
here = os.path.realpath(os.path.join(sys.argv[1], "raysft"))
if spec is None or os.path.realpath(os.path.dirname(spec.origin)) != here:
    missing.append("raysft (editable, from this folder)")
if missing:
    print("install: missing " + ", ".join(missing))
sys.exit(1 if missing else 0)
PY
then
    echo "install: everything is installed (raysft from $(pwd))"
    exit 0
fi
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
python3 -m pip install -q --no-build-isolation "deepspeed>=0.19.8"
python3 -m pip install -q -e ".[dev,lora,mlflow,wandb]"
# The tests' MLflow tracking server, in a venv of its own as a real server is: the full mlflow package (the server)
# pins pyarrow below what Ray Data uses; the training side needs only mlflow-skinny, the client.
SERVER=~/.cache/raysft/mlflow-server
if [ ! -x "$SERVER/bin/mlflow" ]; then
    rm -rf "$SERVER"
    python3 -m venv "$SERVER"
    "$SERVER/bin/pip" install -q "mlflow==3.17.2"
fi
