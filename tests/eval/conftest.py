"""The harness tests (`eval` marker) need the `eval` extra, which conflicts with the `test` extra and is installed
in its own virtualenv by `.ci/run` ("eval tests"). Where a harness is not installed its test module is not
collected at all (the README command deselects `eval` anyway), so no run reports them as skipped; in the eval
virtualenv a missing harness leaves `pytest -m eval` with nothing to run, which fails that step."""

import importlib.util

HARNESS_TESTS = {"test_harness_lm": "lm_eval", "test_harness_lmms": "lmms_eval"}  # test module -> harness
collect_ignore = [f"{test}.py" for test, harness in HARNESS_TESTS.items() if importlib.util.find_spec(harness) is None]
