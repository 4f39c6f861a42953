#!/usr/bin/env bash
# The step of action.yml: run the broker's lean client (broker/client/github_action.py) from
# the action's own checkout. It needs Python 3.11+ and httpx; when INPUT_PYTHON lacks httpx, a
# venv in RUNNER_TEMP gets it (a stock runner's system Python refuses pip installs, PEP 668).
# Nothing here prints a secret: there is none before the client runs, and it masks each one
# before printing anything else.
set -euo pipefail
py="${INPUT_PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "::error title=model-broker::$py is not Python 3.11 or later: add actions/setup-python first, or set the python input"
  exit 1
fi
if ! "$py" -c 'import httpx' 2>/dev/null; then
  venv="${RUNNER_TEMP:?RUNNER_TEMP is not set}/model-broker-action"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'httpx>=0.27,<1'
  fi
  py="$venv/bin/python"
fi
PYTHONPATH="$BROKER_ACTION_PATH${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m broker.client.github_action
