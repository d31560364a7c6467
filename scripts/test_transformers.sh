#!/usr/bin/env bash
# The integration tests (pytest -m integration) on another transformers, in a throw-away virtual
# environment layered over the current one: the venv's own site-packages come first, then the current
# environment's (added by a .pth file, so this works from a venv too), and only transformers, with what
# that release needs, is installed into the venv.
#   scripts/test_transformers.sh oldest   # the lower bound pyproject.toml declares
#   scripts/test_transformers.sh latest   # the newest release pyproject.toml allows
#   scripts/test_transformers.sh 5.20.0   # any release
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
requirement=$($PYTHON -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('transformers')).split('#')[0].strip())")
case "${1:?usage: $0 oldest|latest|VERSION}" in
  oldest) spec="transformers==$($PYTHON -c "import re, sys; print(re.search(r'>=\s*([0-9.]+)', sys.argv[1]).group(1))" "$requirement")" ;;
  latest) spec="$requirement" ;;
  *) spec="transformers==$1" ;;
esac
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
$PYTHON -m venv "$root/venv"
$PYTHON - "$("$root/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'PY'
import site, sys
outer = [p for p in site.getsitepackages() + [site.getusersitepackages()]]
with open(f"{sys.argv[1]}/_outer_environment.pth", "w") as f:
    f.write(f"import site; list(map(site.addsitedir, {outer!r}))\n")
PY
# --ignore-installed: the release asked for lands in the venv even where the outer environment has it
"$root/venv/bin/python" -m pip install -q --disable-pip-version-check --ignore-installed --no-deps "$spec"
"$root/venv/bin/python" -m pip install -q --disable-pip-version-check "$spec"   # what that release needs
echo "== integration tests on $("$root/venv/bin/python" -c 'import transformers; print("transformers", transformers.__version__)') ($spec)"
"$root/venv/bin/python" -m pytest -q -n 2 -m integration -p no:cacheprovider tests
