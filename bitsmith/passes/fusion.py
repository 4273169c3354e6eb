"""Operator fusion: group graph ops into `kernel.fused` regions, explaining every refusal.

Rules, in the order they are applied:
1. Attention: matmul(q, k) [-> scale] [-> + mask] -> softmax -> matmul(., v) (or a
   `graph.attention` op) is one kernel, with the reshapes/permutes that feed q, k, v or follow
   the output absorbed.
2. Greedily, in program order, an op joins the kernel of one of its producers when the kinds
   allow it (see `_refusal`): matmul/conv/pool kernels take elementwise epilogues; elementwise
   and injective chains merge; reductions take elementwise/injective prologues, elementwise
   epilogues and further reductions over the same rows; opaque ops and attention kernels stay
   alone; no kernel grows past `max-ops`; no join may create a cycle; an op that indexes
   (gather, embedding, index_select, index) never joins the kernel that computes its indices
   (beyond reshapes and widening int casts of them): the runtime checks indices against their
   range between kernels, so they must come from an input, a weight or another kernel.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx

from ..errors import PassError, PipelineError
from ..ir import Block, Module, Operation, Region, Trait, Value
from ..ir.dialects import graph
from ..ir.dialects.graph.shape import IndexingOp, index_source
from ..ir.dialects.kernel import FusedOp, YieldOp
from .canonicalize import INLINE_ELEMENTS, producer, splat_value
from .cleanup import erase_dead_ops
from .manager import ModulePass, PassContext, register_pass
from .op_kinds import OpKind, anchor_kind, classify, reduction_signature


@dataclass(eq=False)
class Group:
    """Ops that will become one kernel."""

    ops: list[Operation]
    kind: OpKind
    anchor: Operation | None = None
    closed: bool = False  # attention kernels take nothing more
    reductions: set = field(default_factory=set)

    @property
    def kernel_kind(self) -> str:
        """The `kind` attribute of the kernel this group becomes."""
        if self.closed:
            return "attention"
        if self.anchor is not None:
            return anchor_kind(self.anchor)
        return {OpKind.ELEMENTWISE: "elementwise", OpKind.BROADCAST: "elementwise",
                OpKind.INJECTIVE: "injective", OpKind.REDUCTION: "reduction"}.get(self.kind,
                                                                                    "opaque")

    def add(self, op: Operation, kind: OpKind) -> None:
        """Put `op` in the group."""
        self.ops.append(op)
        if kind == OpKind.REDUCTION:
            self.reductions.add(reduction_signature(op))
            if self.anchor is None:
                self.anchor = op
        if kind == OpKind.OUT_FUSABLE:
            self.anchor = op
        self.kind = max(self.kind, kind)


def describe(op: Operation) -> str:
    """`graph.linear [layers.0.query]` for remarks."""
    return f"{op.name} [{op.loc}]" if op.loc else op.name


def _is_inline_constant(value: Value) -> bool:
    op = producer(value)
    return (op is not None and isinstance(op, graph.ConstantOp) and op.value is not None
            and op.value.array.size <= INLINE_ELEMENTS)


def _single_user(value: Value) -> Operation | None:
    users = value.users
    return users[0] if len(users) == 1 else None


class _Fuser:
    """One run of the fusion algorithm over a module's top-level ops."""

    def __init__(self, module: Module, max_ops: int, ctx: PassContext) -> None:
        self.module, self.max_ops, self.ctx = module, max_ops, ctx
        self.ops = [op for op in module.body.ops if self._fusable(op)]
        self.position = {op: i for i, op in enumerate(module.body.ops)}
        self.group_of: dict[Operation, Group] = {}
        self.groups: list[Group] = []

    @staticmethod
    def _fusable(op: Operation) -> bool:
        return op.name.startswith(("graph.", "quant.", "kv.")) \
            and not isinstance(op, graph.ConstantOp)

    def run(self) -> list[Group]:
        """Form the groups: attention first, then greedy producer-consumer merging."""
        for op in self.ops:
            if isinstance(op, (graph.MatmulOp, graph.AttentionOp)) and op not in self.group_of:
                self._match_attention(op)
        for op in self.ops:
            if op not in self.group_of:
                self._place(op)
        return [g for g in self.groups if g.ops]

    # ---- attention ------------------------------------------------------------------------
    def _match_attention(self, root: Operation) -> None:
        core = [root] if isinstance(root, graph.AttentionOp) else self._attention_chain(root)
        if not core:
            return
        group = Group([], OpKind.OUT_FUSABLE, anchor=None, closed=True)
        members = list(core)
        inputs = [root.q, root.k, root.v] if isinstance(root, graph.AttentionOp) else [
            core[0].lhs, core[0].rhs, core[-1].rhs]
        if len(core) > self.max_ops:
            self.ctx.remark(f"separate attention at {describe(root)}: its {len(core)} ops "
                            f"exceed max-ops={self.max_ops}")
            return
        chains = [self._view_chain_back(v, set(members)) for v in inputs]
        chains.append(self._view_chain_forward(core[-1].result))
        for chain in chains:
            new = [op for op in chain if op not in members]  # q, k, v may share one view chain
            if len(members) + len(new) <= self.max_ops:
                members += new
        for op in sorted(members, key=self.position.__getitem__):
            group.add(op, classify(op))
            self.group_of[op] = group
        group.anchor = root if isinstance(root, graph.AttentionOp) else core[-1]
        group.kind = OpKind.OUT_FUSABLE
        self.groups.append(group)
        self.ctx.remark(f"attention kernel at {describe(group.anchor)}: "
                        f"{', '.join(op.name for op in group.ops)}")

    def _attention_chain(self, pv: Operation) -> list[Operation]:
        """[qk, scale/mask ops..., softmax, pv] when `pv` is the second matmul of attention."""
        soft = producer(pv.lhs)
        if soft is None or not isinstance(soft, graph.SoftmaxOp) or _single_user(pv.lhs) is not pv:
            return []
        if pv.transpose_lhs or soft.axis % soft.x.type.rank != soft.x.type.rank - 1:
            return []
        path = self._score_path(soft.x, soft, depth=3)
        return path + [soft, pv] if path else []

    def _score_path(self, value: Value, user: Operation, depth: int) -> list[Operation] | None:
        """The ops from the q.k matmul to `value` through scale and mask ops, or None."""
        op = producer(value)
        if op is None or op in self.group_of or _single_user(value) is not user:
            return None
        if isinstance(op, graph.MatmulOp):
            return None if op.transpose_lhs else [op]
        if depth == 0 or op.name not in ("graph.mul", "graph.div", "graph.add"):
            return None
        for scores, other in ((op.lhs, op.rhs), (op.rhs, op.lhs)):
            if op.name == "graph.div" and scores is op.rhs:
                continue
            if op.name != "graph.add" and splat_value(other, self.module) is None:
                continue  # a scale must be one number; an add is the mask
            if not scores.type.same_as(op.result.type):
                continue
            path = self._score_path(scores, op, depth - 1)
            if path is not None:
                return path + [op]
        return None

    def _view_chain_back(self, value: Value, members: set) -> list[Operation]:
        chain = []
        op = producer(value)
        while (op is not None and op.has(Trait.VIEW) and op not in self.group_of
               and all(u in members or u in chain for u in op.result.users)):
            chain.append(op)
            op = producer(op.x)
        return chain

    def _view_chain_forward(self, value: Value) -> list[Operation]:
        chain = []
        user = _single_user(value)
        while user is not None and user.has(Trait.VIEW) and user not in self.group_of and \
                value not in self.module.outputs:
            chain.append(user)
            value = user.result
            user = _single_user(value)
        return chain

    # ---- greedy placement -----------------------------------------------------------------
    def _place(self, op: Operation) -> None:
        kind = classify(op)
        tried: list[Group] = []
        for value in op.operands:
            src = producer(value)
            group = self.group_of.get(src) if src is not None else None
            if src is None or group is None or group in tried:
                continue
            tried.append(group)
            reason = self._refusal(group, op, kind, value)
            if reason is None:
                group.add(op, kind)
                self.group_of[op] = group
                self.ctx.remark(f"fused    {describe(src)} -> {describe(op)}")
                return
            self.ctx.remark(f"separate {describe(src)} -> {describe(op)}: {reason}")
        group = Group([], kind)
        group.add(op, kind)
        self.group_of[op] = group
        self.groups.append(group)

    def _refusal(self, group: Group, op: Operation, kind: OpKind, value: Value) -> str | None:
        """Why `op` may not join `group` through `value`, or None when it may."""
        if group.closed:
            return "an attention kernel takes no further ops"
        if len(group.ops) >= self.max_ops:
            return f"the kernel already has max-ops={self.max_ops} ops"
        if kind == OpKind.OPAQUE or group.kind == OpKind.OPAQUE:
            who = op.name if kind == OpKind.OPAQUE else "the producer kernel"
            return f"{who} is opaque and runs as its own kernel"
        reason = self._index_refusal(group, op) or self._kind_refusal(group, op, kind, value)
        if reason is None and self._creates_cycle(group, op):
            reason = "fusing would create a cycle through another kernel"
        return reason

    def _index_refusal(self, group: Group, op: Operation) -> str | None:
        """Indices that `group` computes may not be read by `op` inside it: the runtime checks
        them against their range before the kernel that reads them runs."""
        if not isinstance(op, IndexingOp):
            return None
        for bound in op.index_bounds():
            source = index_source(op.operands[bound.operand],
                                  lambda o: self.group_of.get(o) is group)
            src = producer(source)
            if src is not None and self.group_of.get(src) is group:
                return (f"its {bound.name} operand comes from {src.name} in that kernel, and "
                        "indices are range-checked before the kernel that reads them")
        return None

    def _is_padding_prologue(self, group: Group, op: Operation, value: Value) -> bool:
        """A pad feeding only a conv/pool's input: the kernel reads through the padding."""
        return (op.has(Trait.PAD_PROLOGUE) and value is op.operands[0] and len(value.users) == 1
                and value not in self.module.outputs
                and all(isinstance(o, graph.PadOp) for o in group.ops))

    def _kind_refusal(self, group: Group, op: Operation, kind: OpKind,
                      value: Value) -> str | None:
        if kind == OpKind.OUT_FUSABLE:
            if self._is_padding_prologue(group, op, value):
                return None
            return f"{op.name} does not absorb producers (it would recompute them per tile)"
        if group.kind == OpKind.OUT_FUSABLE:
            anchor = group.kernel_kind
            view = isinstance(op, graph.ReshapeOp)  # of a contiguous result: free, no data moves
            if kind > OpKind.BROADCAST and not view:
                return f"{op.name} ({kind}) does not join a {anchor} kernel (only " \
                       "elementwise epilogues and reshapes do)"
            if len(value.users) > 1 or value in self.module.outputs:
                src = producer(value)
                return f"the {src.name if src else 'input'} result is also used elsewhere, " \
                       f"and a {anchor} kernel has one output"
            # shapes only: a cast epilogue changes the dtype, not the tile
            if not view and not value.type.with_dtype(op.result.type.dtype).same_as(
                    op.result.type):
                return f"the epilogue would broadcast the {anchor} result"
            return None
        if group.kind == OpKind.REDUCTION:
            if kind == OpKind.REDUCTION and reduction_signature(op) not in group.reductions:
                return "it reduces other rows than the reduction kernel it would join"
            if kind == OpKind.INJECTIVE and not isinstance(op, graph.ReshapeOp):
                return f"{op.name} (injective) after a reduction starts a new kernel"
        return None

    def _creates_cycle(self, group: Group, op: Operation) -> bool:
        """Whether a producer of `op` outside `group` already depends on `group`.

        Checked between kernels, not ops: two groups that each feed the other are a cycle even
        when no op-level path leaves one group and comes back to it.
        """
        targets = {self._node(src) for src in map(producer, op.operands) if src is not None}
        targets.discard(group)
        if not targets:
            return False
        limit = self.position[op]
        seen: set[Group | Operation] = {group}
        stack: list[Group | Operation] = [group]
        while stack:
            node = stack.pop()
            for member in node.ops if isinstance(node, Group) else [node]:
                for user in (u for r in member.results for u in r.users):
                    after = self._node(user)
                    if after in targets:
                        return True
                    # an ungrouped op after `op` cannot lead back to a producer of `op`
                    if after not in seen and (isinstance(after, Group)
                                              or self.position.get(user, limit) < limit):
                        seen.add(after)
                        stack.append(after)
        return False

    def _node(self, op: Operation) -> Group | Operation:
        """The group `op` belongs to, or the op itself while it has none."""
        return self.group_of.get(op, op)


def build_kernel(module: Module, group: Group, name: str) -> FusedOp:
    """Move a group's ops into a new `kernel.fused` op; return it (placed, not yet sorted)."""
    members = set(group.ops)
    inputs: list[Value] = []
    for op in group.ops:
        for value in op.operands:
            if producer(value) not in members and not _is_inline_constant(value) \
                    and value not in inputs:
                inputs.append(value)
    outputs = [r for op in group.ops for r in op.results
               if any(u not in members for u in r.users)]
    block = Block([v.type for v in inputs])
    index = module.body.index(group.ops[0])
    for op in group.ops:
        module.body.ops.remove(op)
        op.parent = None
        block.append(op)
        for i, value in enumerate(op.operands):
            if value in inputs:
                op.set_operand(i, block.args[inputs.index(value)])
            elif (literal := producer(value)) not in members:  # a small literal: copied in
                if not isinstance(literal, graph.ConstantOp):
                    raise PassError(f"fuse: {op.name} reads {value.type} from outside its "
                                    "kernel that is neither an input nor a literal")
                copy = graph.ConstantOp.create(value=literal.value,
                                               result_types=[value.type], loc=op.loc)
                block.insert(block.index(op), copy)
                op.set_operand(i, copy.result)
    block.append(YieldOp.create(*outputs))
    kernel = FusedOp.create(*inputs, result_types=[v.type for v in outputs],
                            regions=[Region([block])], kind=group.kernel_kind, name=name,
                            loc=(group.anchor or group.ops[0]).loc)
    module.body.insert(index, kernel)
    for old, new in zip(outputs, kernel.results, strict=True):
        for user, i in list(old.uses):
            if user.parent is not block:
                user.set_operand(i, new)
    return kernel


def sort_block(block: Block) -> None:
    """Reorder a block's ops topologically, keeping the current order where it is free."""
    order = {op: i for i, op in enumerate(block.ops)}
    dag = nx.DiGraph()
    dag.add_nodes_from(block.ops)
    for op in block.ops:
        for value in op.operands:
            src = producer(value)
            if src in order:
                dag.add_edge(src, op)
    block.ops[:] = list(nx.lexicographical_topological_sort(dag, key=order.__getitem__))


def kernel_name(group: Group, index: int) -> str:
    """`k3_linear_gelu`: a number and the non-view ops it holds."""
    names = [op.name.split(".")[-1] for op in group.ops if not op.has(Trait.VIEW)]
    names = list(dict.fromkeys(names or [op.name.split(".")[-1] for op in group.ops]))
    return f"k{index}_{'_'.join(names[:4])}"


def _is_read(group: Group) -> bool:
    """Whether a result of the group is used outside it."""
    members = set(group.ops)
    return any(user not in members for op in group.ops for r in op.results for user in r.users)


def _first_free_index(module: Module) -> int:
    """Kernel numbers go on after those of kernels already in the module (a second run)."""
    found = (re.match(r"k(\d+)_", op.kernel_name) for op in module.body.ops
             if isinstance(op, FusedOp))
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


@register_pass("fuse")
@dataclass(frozen=True)
class FuseOps(ModulePass):
    """Group graph ops into `kernel.fused` regions (see the module docstring for the rules)."""

    max_ops: int = 64

    def __post_init__(self) -> None:
        if self.max_ops < 1:
            raise PipelineError(f"max-ops must be >= 1, got {self.max_ops}")

    def run(self, module: Module, ctx: PassContext) -> None:
        erase_dead_ops(module.body)  # a dead op in a group would keep its producers alive
        groups = [g for g in _Fuser(module, self.max_ops, ctx).run() if _is_read(g)]
        first = _first_free_index(module)
        for index, group in enumerate(groups, start=first):
            kernel = build_kernel(module, group, kernel_name(group, index))
            ctx.count("kernels-formed")
            ctx.count(f"kernels-{kernel.kind}")
            ctx.count("ops-fused", len(group.ops))
            ctx.remark(f"kernel   {kernel.kernel_name} ({kernel.kind}, {len(kernel.operands)} "
                       f"inputs, {len(kernel.results)} outputs): "
                       f"{', '.join(op.name.split('.', 1)[1] for op in group.ops)}")
        sort_block(module.body)
        erase_dead_ops(module.body)
