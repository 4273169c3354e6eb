"""Schedule building blocks on TensorIR (`tvm.s_tir.Schedule`) shared by the CPU templates.

A kernel starts as the generic lowering's PrimFunc: one block per TE compute, each in its own
loop nest. Templates call these helpers to inline the injective blocks into their neighbours,
then tile, parallelise and vectorise what is left.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import tvm.s_tir as s_tir
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.s_tir.schedule.schedule import ScheduleError
from tvm.tirx import IndexMap, IntImm

from ..template import CodegenError
from .typed import block_of, fuse, loop_of, reorder

REDUCE = 2
"""IterVar.iter_type of a reduction axis (CommReduce)."""


def root_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    """The top-level blocks of the function, in program order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def block_name(sch: s_tir.Schedule, block: SBlockRV) -> str:
    """The name a block was given (its TE compute's name)."""
    return block_of(sch, block).name_hint


def is_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when the block has a reduction axis."""
    return any(int(iv.iter_type) == REDUCE for iv in block_of(sch, block).iter_vars)


def spatial_count(sch: s_tir.Schedule, block: SBlockRV) -> int:
    """How many of the block's (leading) axes are spatial."""
    return sum(int(iv.iter_type) != REDUCE for iv in block_of(sch, block).iter_vars)


def static_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    """A loop's extent if it is a constant."""
    extent = loop_of(sch, loop).extent
    return int(extent) if isinstance(extent, IntImm) else None


def inline_injective(sch: s_tir.Schedule, keep: Iterable[str] = ()) -> None:
    """Inline every injective, non-output block into its consumers (or, failing that, into
    its producer), to a fixpoint. Blocks named in `keep` and reductions stay."""
    keep = set(keep)
    changed = True
    while changed:
        changed = False
        outputs = {block_name(sch, b) for b in sch.get_output_blocks(sch.get_sblock("root"))}
        for block in root_blocks(sch):
            name = block_name(sch, block)
            if name in keep or is_reduction(sch, block):
                continue
            for inline in ((sch.reverse_compute_inline,) if name in outputs
                           else (sch.compute_inline, sch.reverse_compute_inline)):
                try:
                    inline(block)
                except ScheduleError:
                    continue
                changed = True
                break
            if changed:
                break


def parallel_vectorize(sch: s_tir.Schedule, block: SBlockRV, *, lanes: int, min_parallel: int,
                       cores: int, vectorize: bool = True, vector_factor: int = 4) -> None:
    """Default schedule of one block: vectorise its innermost spatial loop (when it has a
    static extent that lanes divide and no reduction inside it), up to `vector_factor`
    vectors at a time, and run its outer spatial loops in parallel when the block has at
    least `min_parallel` output elements."""
    # a reduction's work is its whole loop nest (counted before its lanes are split off)
    work_loops = sch.get_loops(block)[spatial_count(sch, block):]
    reduction_work = math.prod(static_extent(sch, lp) or 64 for lp in work_loops)
    if vectorize and lanes > 1:
        block = vector_reduce(sch, block, lanes)
    loops = sch.get_loops(block)
    n_spatial = spatial_count(sch, block)
    spatial = list(loops[:n_spatial])
    if not spatial:
        return
    extents = [static_extent(sch, loop) for loop in spatial]
    if vectorize and n_spatial == len(loops) and extents[-1] is not None and lanes > 1:
        inner = math.gcd(extents[-1], lanes * vector_factor)
        if inner >= lanes:
            if inner < extents[-1]:
                spatial[-1:] = sch.split(spatial[-1], [None, inner])
            sch.vectorize(spatial[-1])
            spatial.pop()
            extents = [static_extent(sch, loop) for loop in spatial]
    if cores <= 1 or not spatial:
        return
    total = math.prod(e if e is not None else 64 for e in extents)
    if n_spatial == len(loops):
        total *= lanes
    else:
        total *= reduction_work
    if total < min_parallel:
        return
    count = 1  # fuse outer loops until there are enough chunks for every core
    work = extents[0] if extents[0] is not None else 64
    while count < len(spatial) and work < 4 * cores:
        extent = extents[count]
        work *= extent if extent is not None else 64
        count += 1
    outer = fuse(sch, *spatial[:count]) if count > 1 else spatial[0]
    sch.parallel(outer)


def _extent(iv: object) -> int | None:
    extent = getattr(getattr(iv, "dom", None), "extent", None)
    return int(extent) if isinstance(extent, IntImm) else None


def vector_reduce(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> SBlockRV:
    """A reduction over one long innermost axis (a row's sum in a norm or softmax) summed in
    `lanes` independent partial sums, one vector: the axis split by `lanes` and rfactor'd, the
    partial sums (a per-row vector, computed under the row's loop) vectorised, then added up.
    A serial sum is one dependent add per element (latency-bound: 4 cycles each); this is one
    vector add per `lanes` elements. Returns the block that now writes the result (the block
    itself when the reduction does not qualify or TensorIR refuses)."""
    loops = sch.get_loops(block)
    n_spatial = spatial_count(sch, block)
    if n_spatial == 0 or len(loops) != n_spatial + 1 or not is_reduction(sch, block):
        return block
    reduce_vars = [iv for iv in block_of(sch, block).iter_vars if int(iv.iter_type) == REDUCE]
    if len(reduce_vars) != 1 or static_extent(sch, loops[-1]) != _extent(reduce_vars[0]):
        return block  # the innermost loop must be the one reduction axis, whole
    extent = static_extent(sch, loops[-1])
    if extent is None or extent % lanes or extent < 4 * lanes:
        return block
    trial = sch.copy()
    try:
        _rfactor_lanes(trial, block, lanes)
    except (ScheduleError, ValueError, RuntimeError):
        return block
    _rfactor_lanes(sch, block, lanes)
    return block


def _rfactor_lanes(sch: s_tir.Schedule, block: SBlockRV, lanes: int) -> None:
    loops = sch.get_loops(block)
    _, inner = sch.split(loops[-1], [None, lanes])
    partial = sch.rfactor(inner, 0)
    sch.compute_at(partial, sch.get_loops(block)[-2])  # the row's loop
    sch.set_scope(partial, 0, "local")
    lane, step = sch.get_loops(partial)[-2:]  # compute_at puts the lanes first
    reorder(sch, step, lane)
    sch.vectorize(lane)


def auto_schedule(sch: s_tir.Schedule, *, lanes: int, cores: int,
                  min_parallel: int = 16384, keep: Iterable[str] = (),
                  vector_factor: int = 4) -> None:
    """Inline injective blocks, then give every remaining block the default schedule.

    A function that is not made of blocks (TVM's scan and extern ops: cumsum, sort) is left as
    TVM lowered it."""
    try:
        sch.get_sblock("root")
    except ScheduleError:
        return
    inline_injective(sch, keep)
    for block in root_blocks(sch):
        if block_name(sch, block) in keep:
            continue
        parallel_vectorize(sch, block, lanes=lanes, min_parallel=min_parallel, cores=cores,
                           vector_factor=vector_factor)


def register_tile(sch: s_tir.Schedule, compute: SBlockRV, out: SBlockRV | None, *, rows: int,
                  mr: int, nr: int, kc: int, order: str, parallel: bool, lanes: int) -> None:
    """The CPU GEMM micro-kernel: `compute` (spatial axes ..., n; reduction axes) accumulates an
    mr x nr tile in registers (the tile's rows unrolled, its nr columns vectorised), the
    reduction outermost inside the tile; `out` (its elementwise consumer with the same spatial
    axes, or None) writes the tile out. Of `out`'s loops the last is the column axis, the
    `rows` before it are fused into the row axis, and any before those are outer loops, fused
    with the tile loops into one (parallel) loop."""
    if out is None:  # accumulate in a tile, then copy it out
        out = sch.cache_write(compute, 0, "local")
    else:
        sch.set_scope(compute, 0, "local")
    loops = sch.get_loops(out)
    if len(loops) < rows + 1:
        raise CodegenError(f"register tile: expected at least {rows + 1} loops, got "
                           f"{len(loops)}")
    prefix = list(loops[:len(loops) - rows - 1])
    row_loops = loops[len(loops) - rows - 1:-1]
    row = fuse(sch, *row_loops) if rows > 1 else row_loops[0]
    col = loops[-1]
    io, ii = sch.split(row, [None, mr])
    jo, ji = sch.split(col, [None, nr])
    tiles = (io, jo) if order == "mn" else (jo, io)
    reorder(sch, *prefix, *tiles, ii, ji)
    outer = fuse(sch, *prefix, *tiles)
    if parallel:
        sch.parallel(outer)
    sch.compute_at(compute, outer, preserve_unit_loops=True)
    if nr % lanes == 0:
        try_vectorize(sch, ji)
    cloops = sch.get_loops(compute)
    n_spatial = spatial_count(sch, compute)
    tile = cloops[1:1 + n_spatial]
    reduce = cloops[1 + n_spatial:]
    if len(reduce) == 1 and kc:
        reduce = list(sch.split(reduce[0], [None, kc]))
    reorder(sch, *reduce, *tile)
    for loop in tile[:-1]:
        sch.unroll(loop)
    vector = nr % lanes == 0 or nr < lanes
    if vector and try_vectorize(sch, tile[-1]):
        sch.decompose_reduction(compute, reduce[0])
        return
    # TensorIR refuses some tiles (a partial one, say) until the init is split off
    init = sch.decompose_reduction(compute, reduce[0])
    for block in (init, compute):
        columns = sch.get_loops(block)[-1]
        if not (vector and try_vectorize(sch, columns)):
            sch.unroll(columns)


def panel_gemm(sch: s_tir.Schedule, compute: SBlockRV, consumers: Sequence[SBlockRV], *,
               columns: int, mr: int, nr: int, kc: int, mc: int, order: str, parallel: bool,
               lanes: int, cores: int) -> None:
    """The cache-blocked CPU GEMM (GotoBLAS's loop nest over pre-packed column panels).

    `compute` is a contraction with loops (rows, columns, reduction) whose rows are padded to a
    whole number of `mr`-row tiles and whose columns to whole `nr`-wide panels. Work items are
    (panel, block of `mc` row tiles) pairs, fused in `order` ("nm": panels outermost, so a
    core's consecutive items share a panel; "mn": row blocks outermost) into one (parallel)
    loop; inside an item, the reduction is split into `kc`-long slices (0: one slice), each
    swept over the item's row tiles, so the panel's slice stays in L1 while the rows stream.
    A tile's mr x nr accumulators live in vector registers over a slice (the tile's rows and
    vectors unrolled, one vector of `lanes` innermost). The consumers (the epilogue) run per
    work item, over the rows and panel it computed, while they are still in cache; one that
    cannot follow stays after the loop with the default schedule. `columns`: the
    contraction's column count before padding."""
    loops = sch.get_loops(compute)
    if len(loops) < 3 or (kc and len(loops) != 3):
        raise CodegenError(f"panel GEMM: expected (rows, columns, reduction...) loops (one "
                           f"reduction with a slice), got {len(loops)}")
    m, j, *reduction = loops
    io, ii = sch.split(m, [None, mr])
    jo, ji = sch.split(j, [None, nr])
    ko, ki = sch.split(reduction[0], [None, kc]) if kc else (None, reduction[0])
    deeper = reduction[1:]  # a convolution's window and channel loops
    outer = [jo]
    if mc:
        mo, io = sch.split(io, [None, mc])
        outer = [jo, mo] if order == "nm" else [mo, jo]
    vectors = nr // lanes if nr % lanes == 0 and nr > lanes else 1
    jv, jl = sch.split(ji, [vectors, None]) if vectors > 1 else (None, ji)
    inner = [x for x in (ko, io, ki, *deeper, ii, jv, jl) if x is not None]
    reorder(sch, *outer, *inner)
    item = fuse(sch, *outer) if len(outer) > 1 else outer[0]
    if parallel and cores > 1:
        sch.parallel(item)
    sch.unroll(ii)
    if jv is not None:
        sch.unroll(jv)
    vector = try_vectorize(sch, jl) if nr % lanes == 0 or nr < lanes else False
    if not vector:
        sch.unroll(jl)
    init = sch.decompose_reduction(compute, ko if ko is not None else ki)
    for loop in sch.get_loops(init)[-1:]:
        if not try_vectorize(sch, loop):
            sch.unroll(loop)
    for block in consumers:
        if not _epilogue_at(sch, block, item, columns=columns):
            parallel_vectorize(sch, block, lanes=lanes, min_parallel=1 << 14, cores=cores)
            continue
        loop = sch.get_loops(block)[-1]
        extent = static_extent(sch, loop)
        if extent is not None and extent % lanes == 0:
            try_vectorize(sch, loop)


def _epilogue_at(sch: s_tir.Schedule, block: SBlockRV, item: LoopRV, *, columns: int) -> bool:
    """Move an epilogue block under a GEMM work item, if it is safe: its loops must be (rows
    ..., columns) with the contraction's column count last. Its iteration space is first made
    2-d (row, column), so that the rows it reads are one affine range: TVM's region analysis
    covers a padded row range split into (sample, row) with a wrong box, leaving rows unwritten.
    Anything else stays after the loop."""
    loops = sch.get_loops(block)
    extents = [static_extent(sch, lp) for lp in loops]
    if len(loops) < 2 or extents[-1] != columns or any(e is None for e in extents[1:]):
        return False
    inner = [int(e) for e in extents[1:-1] if e is not None]

    def flat(*ivs: object) -> list:
        row = ivs[0]
        for iv, extent in zip(ivs[1:-1], inner, strict=True):
            row = row * extent + iv  # pyright: ignore[reportOperatorIssue] - PrimExpr algebra
        return [row, ivs[-1]]
    layout = IndexMap.from_func(flat, ndim=len(loops))
    trial = sch.copy()
    try:
        if len(loops) > 2:
            trial.transform_block_layout(block, layout)
        trial.reverse_compute_at(block, item)
    except (ScheduleError, ValueError, RuntimeError):
        return False
    if len(loops) > 2:
        sch.transform_block_layout(block, layout)
    sch.reverse_compute_at(block, item)
    return True


def try_vectorize(sch: s_tir.Schedule, loop: LoopRV) -> bool:
    """Vectorise `loop` if TensorIR allows it here (it refuses, for one, a loop whose blocks
    carry a predicate from a partial tile); the loop stays scalar otherwise."""
    try:
        sch.vectorize(loop)
    except ScheduleError:
        return False
    return True


def tile_contraction(sch: s_tir.Schedule, compute: SBlockRV, consumers: Sequence[SBlockRV],
                     fits: bool, *, rows: int, mr: int, nr: int, kc: int, order: str,
                     parallel: bool, lanes: int, cores: int) -> None:
    """Register-tile a contraction. When it `fits` (one elementwise consumer with the same
    loops), the tile is computed where that consumer writes it out; otherwise the contraction
    is materialised and every consumer gets the default schedule."""
    register_tile(sch, compute, consumers[0] if fits else None, rows=rows if fits else 1,
                  mr=mr, nr=nr, kc=kc, order=order, parallel=parallel, lanes=lanes)
    if not fits:
        for block in consumers:
            parallel_vectorize(sch, block, lanes=lanes, min_parallel=1 << 14, cores=cores)
