#!/usr/bin/env bash
# Submit `raysft train CONFIG [key=value ...]` to a running Ray cluster with `ray job submit`, and follow it.
#
#   cluster/submit.sh [--address http://HEAD:8265] CONFIG [key=value ...]
#
# - address: --address, else RAY_ADDRESS.
# - auth: Ray 2.60 token auth; the ray CLI reads RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
#   ~/.ray/auth_token, with RAY_AUTH_MODE=token (set here unless you set it). Use the cluster's token.
# - upload: this repository as the job's working directory, without .git, runs/, virtual environments and
#   caches. Ray caps the zipped upload at 512 MiB (and warns from 256 MiB): keep data out of the repository,
#   on storage every node sees.
# - submission id: raysft-{run_name}. A run that is still going is not submitted twice; a finished or failed
#   one is deleted from the job list and submitted again under the same id, and resumes from its last
#   checkpoint (the run name is what makes it resume; it comes from the config).
# - exit status: that of the job (0 when it succeeded), 2 for a bad command line, 3 if the run is in progress.
set -euo pipefail
ADDRESS="${RAY_ADDRESS:-}"
if [ "${1:-}" = "--address" ]; then ADDRESS="$2"; shift 2; fi
if [ -z "$ADDRESS" ] || [ $# -lt 1 ]; then
  echo "usage: cluster/submit.sh [--address http://HEAD:8265] CONFIG [key=value ...] (or set RAY_ADDRESS)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
CONFIG="$1"; shift
# Validates the config here, before anything reaches the cluster, and gives the run name.
RUN_NAME=$(raysft config show "$CONFIG" "$@" | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["run_name"])')
SUBMISSION_ID="raysft-$(printf '%s' "$RUN_NAME" | tr -c 'A-Za-z0-9_-' '-')"
# `ray job status` says "Job 'ID' succeeded|failed|was stopped", or "Status for job 'ID': PENDING|RUNNING"
# (on stderr); an unknown id gives an error that names neither
STATUS=$(ray job status --address "$ADDRESS" "$SUBMISSION_ID" 2>&1 \
  | grep -oE "Job '$SUBMISSION_ID' (succeeded|failed|was stopped)|Status for job '$SUBMISSION_ID': [A-Z]+" \
  | tail -n 1 | grep -oE "[A-Za-z]+$" | tr '[:lower:]' '[:upper:]' || true)
case "$STATUS" in
  PENDING|RUNNING)
    echo "submit.sh: $SUBMISSION_ID is $STATUS; follow it with: ray job logs --address $ADDRESS -f $SUBMISSION_ID" >&2
    exit 3 ;;
  STOPPED|SUCCEEDED|FAILED)
    echo "submit.sh: $SUBMISSION_ID was $STATUS before; submitting it again (it resumes from its last checkpoint)"
    ray job delete --address "$ADDRESS" "$SUBMISSION_ID" >/dev/null ;;
esac
RUNTIME_ENV='{"excludes": [".git", "runs", "outputs", ".venv", "venv", "**/__pycache__", "*.egg-info", ".pytest_cache", "bench/out", ".whl", ".gl"], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}'
exec ray job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --working-dir . \
  --runtime-env-json "$RUNTIME_ENV" -- raysft train "$CONFIG" "$@"
