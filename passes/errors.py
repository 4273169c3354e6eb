"""Errors raised by the pass manager, pipelines and passes."""
from __future__ import annotations


class PassError(Exception):
    """A pass failed, or left the IR invalid; says which pass and what went wrong."""


class PipelineError(PassError):
    """A pipeline string names an unknown pass or option, or an option value is bad."""
