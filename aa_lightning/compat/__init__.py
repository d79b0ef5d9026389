"""The only place where aa-lightning touches private names of the libraries it stands on.

One small module per library, each use with the reason no public way exists and the upstream issue,
and :func:`.versions.require_tested` run before the use: outside the versions it was tested with, the
use fails with one line naming the library and its version instead of computing a wrong result.
pyproject.toml bounds each library to that range too.
"""
