#!/usr/bin/env bash
# Set up smn from nothing on a machine that has only Python 3.10+:
# a virtual environment in .venv with the pinned dependencies and smn itself (editable).
# uv installs torch and torchvision together from the package index (it ignores pip's
# find-links, where a mismatched local torch wheel may sit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check uv
fi
UV="$("$PY" -c 'import shutil,sys,os; p=shutil.which("uv"); print(p or os.path.join(os.path.dirname(sys.executable),"uv"))')"
[ -x .venv/bin/python ] || "$UV" venv --quiet --python "$PY" .venv
"$UV" pip install --quiet --python .venv/bin/python -e ".[test]"
# Chromium for the report's headless-browser test (tests/test_report.py skips without it): installed from
# Debian's packages when this runs as root on a machine with apt-get; never fatal, quick when present.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && [ -z "${SMN_SKIP_CHROMIUM:-}" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "note: chromium not installed (apt-get failed); the browser test will skip"
fi
# Bytecode for every installed module and smn's own: where PYTHONDONTWRITEBYTECODE is set (this project's
# machines set it), Python would otherwise compile torch, Ray and pandas from source in every new process, each
# Ray worker and subprocess included (an import of torch + torchvision + pandas: 13 s -> 5 s on 2 cores).
# Up-to-date files are skipped, so a second setup is quick. Its exit status is not checked: torch ships a test
# helper written for a newer Python (torch/testing/_internal/py312_intrinsics.py), which no import here reaches.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages orchestrator smn_core tests benchmarks \
  >/dev/null 2>&1 || true
echo "smn is set up in .venv ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
# timm's model names, cached once per timm version (smn_core.model_names): a bad `timm/<name>` is refused
# without importing timm (seconds)
.venv/bin/python -c 'import timm; from smn_core.model_names import save_timm_names; save_timm_names(timm.list_models(), timm.__version__)' \
  || echo "note: timm's model names not cached; the first timm/<name> check caches them"
