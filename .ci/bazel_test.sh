#!/usr/bin/env bash
# Bazel test of the fast targets (tag "fast", see tools/bazel_deps.py), offline with Debian's bazel-bootstrap.
# Called by .ci/run after `pip install -e '.[test]'`: the tests use that python3 (the first on PATH, or
# $MM_PYTHON) and its site-packages. Flags suit a 2-core machine. Extra arguments go to `bazel test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bazel >/dev/null 2>&1; then
  echo "== installing bazel-bootstrap (apt)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq bazel-bootstrap >/dev/null
fi

start=$(date +%s)
bazel test --config=fast --build_tests_only --jobs=2 --local_test_jobs=2 --test_output=errors "${@:-//...}"
echo "== bazel test (fast) finished in $(( $(date +%s) - start )) s"
