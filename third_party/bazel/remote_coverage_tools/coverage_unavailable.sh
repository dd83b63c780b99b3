#!/bin/sh
# Stand-in for Bazel's coverage tools, which are a download this offline build does not have.
echo "bazel coverage is not supported here: @remote_coverage_tools is a local stand-in (use pytest --cov)." >&2
exit 1
