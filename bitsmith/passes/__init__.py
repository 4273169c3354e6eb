"""Passes over the IR: pass manager and pipelines, rewrite driver, canonicalization, CSE/DCE,
fusion into `kernel.fused` regions, layout, and memory planning (an analysis)."""
from ..errors import PassError, PipelineError
from . import canonicalize, cleanup, fusion, layout, memory, quantize  # noqa: F401 - registers passes
from .manager import (
    PASS_REGISTRY,
    ModulePass,
    PassContext,
    PassManager,
    Pipeline,
    PipelineReport,
    default_pipeline,
    parse_pipeline,
    print_pipeline,
    register_pass,
    run,
)
from .memory import MemoryPlan, plan_memory
from .rewrite import Pattern, PatternRewriter, apply_patterns, pattern

__all__ = ["PassError", "PipelineError", "PASS_REGISTRY", "ModulePass", "PassContext",
           "PassManager", "Pipeline", "PipelineReport", "default_pipeline", "parse_pipeline",
           "print_pipeline", "register_pass", "run", "MemoryPlan", "plan_memory", "Pattern",
           "PatternRewriter", "apply_patterns", "pattern"]
