#!/usr/bin/env bash
# A real MLflow tracking server for the integration tier, installed once into its own virtualenv and
# cached in ~/.cache/kubetune (keyed on the version). Prints the virtualenv's python on stdout.
#
# Why its own virtualenv: the server (`mlflow`, with SQLAlchemy, alembic, Flask, scikit-learn,
# pyarrow<26, ...) does not install beside the project's pinned stack (pyarrow 26); the project
# itself depends on the client only (mlflow-skinny, same version). 3.17.2 is the newest release
# whose mlflow-skinny is on PyPI here (mlflow 3.18.0 needs mlflow-skinny 3.18.0, which is not).
set -euo pipefail
VERSION=3.17.2
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
ROOT=$CACHE/mlflow-server-$VERSION
if [ -f "$ROOT/.complete" ]; then echo "$ROOT/bin/python"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$ROOT.lock"
flock 9
if [ -f "$ROOT/.complete" ]; then echo "$ROOT/bin/python"; exit 0; fi
rm -rf "$ROOT.tmp"
python3 -m venv "$ROOT.tmp"
"$ROOT.tmp/bin/pip" install -q --disable-pip-version-check "mlflow==$VERSION" >&2
rm -rf "$ROOT"
# Moved after the build: the server is run as `<venv>/bin/python -m mlflow`, which does not depend
# on the scripts' shebang paths.
mv "$ROOT.tmp" "$ROOT"
touch "$ROOT/.complete"
echo "$ROOT/bin/python"
