"""The Python toolchain: the python3 this machine already has, with the repo's pip dependencies installed.

Bazel would otherwise pick whatever `python3` is first on the sandboxed test PATH (often /usr/bin/python3,
without jax). This repository rule runs once per PATH / MM_PYTHON value, asks that interpreter for its real
path (`sys.executable` resolves pyenv shims and virtualenv wrappers) and declares it as the py_runtime.
Third-party packages therefore come from that interpreter's site-packages; they are not Bazel targets.
"""

_MIN_VERSION = (3, 10)

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

# Found at fetch time from {source}; `bazel sync --configure` (or a new PATH / MM_PYTHON) finds it again.
py_runtime(
    name = "py3_runtime",
    interpreter_path = "{path}",
    python_version = "PY3",
    stub_shebang = "#!{path}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _local_python_impl(rctx):
    requested = rctx.os.environ.get("MM_PYTHON", "")
    if requested:
        python, source = requested, "$MM_PYTHON"
    else:
        python, source = rctx.which("python3"), "python3 on PATH"
        if not python:
            fail("local_python: no python3 on PATH; install Python >= 3.10 or set MM_PYTHON=/path/to/python3")
    result = rctx.execute([python, "-c", "import sys; print(sys.executable); print(*sys.version_info[:2])"])
    if result.return_code != 0:
        fail("local_python: %s (%s) does not run: %s" % (python, source, result.stderr))
    lines = result.stdout.strip().split("\n")
    path, version = lines[0], tuple([int(v) for v in lines[1].split(" ")])
    if version < _MIN_VERSION:
        fail("local_python: %s (%s) is Python %d.%d; the repo needs >= %d.%d" %
             ((path, source) + version + _MIN_VERSION))
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", _BUILD.format(path = path, source = source))

local_python = repository_rule(
    implementation = _local_python_impl,
    environ = ["MM_PYTHON", "PATH"],
    local = True,
    configure = True,
)
