"""`pytest_test`: a py_test that runs pytest on one test module (the BUILD files call it; see tools/bazel_deps.py)."""

def pytest_test(name, src, deps = [], markers = "fast", data = [], size = "large", **kwargs):
    """One test module as one Bazel test, run by tools/pytest_main.py under the repo's pytest config.

    Args:
      name: target name (the module's stem; `<stem>_slow` for its `slow`-marked tests).
      src: the test module, e.g. "test_sharding.py".
      deps: py_library targets of the repo modules it imports (and of the conftest.py files pytest loads).
      markers: "fast" runs `-m "not slow"`, "slow" runs `-m slow`, "all" runs every test.
      data: extra runfiles.
      size: Bazel test size; "large" (15 min timeout) because the CPU is shared and jax compiles are slow.
      **kwargs: passed to py_test (tags, ...).
    """
    native.py_test(
        name = name,
        srcs = [src, "//tools:pytest_main.py"],
        main = "//tools:pytest_main.py",
        args = ["--markers=" + markers, "$(rootpath %s)" % src],
        data = ["//:pyproject.toml"] + data,
        deps = deps,
        python_version = "PY3",
        srcs_version = "PY3",
        legacy_create_init = False,
        size = size,
        **kwargs
    )
