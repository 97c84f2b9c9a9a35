"""Inductor lowerings of the structured forward ops to Triton templates (design section 4).

Where Inductor emits Triton (CUDA tensors, and CPU tensors under ``cpu_backend="triton"``),
``padst::<structure>_linear`` lowers to a choice between Triton templates of its forward
kernel, one per tile configuration, and the opaque op (the tuned kernel of
:mod:`..triton.kernels`). Inductor's autotuner measures them. A template stores its output
through Inductor's own store, so an elementwise consumer (an activation, a residual add, a
cast) fuses into the kernel instead of re-reading the output from memory.

The backward ops keep the user-kernel decomposition of :mod:`.visibility` on CUDA: their
transposed structure is prepared by host code, which a template cannot hold. Elsewhere the
input-gradient ops, like the forward ops without templates, lower to an extern call that
writes into a buffer Inductor plans (and hands a freed one to a later layer), where a
fallback call would allocate its result anew on every call.

This uses Inductor's private lowering API. It is gated on the torch versions it was written
against, registered the first time a structured op is traced (importing Inductor's lowering
costs about a second that eager users should not pay), and falls back to the opaque op with
a warning wherever building the choices fails.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from padst_compiler.kernels.inductor import visibility

log = logging.getLogger(__name__)

# ----------------------------------------------------------------- template sources
#
# Jinja sources for Inductor's TritonTemplate. Each runs the forward body its launcher
# kernel runs (kernels/triton/bodies.py, imported by the generated module), so a template
# differs from the launcher only in how it stores: ``store_output`` is Inductor's store,
# where an epilogue fuses. ``def_kernel`` names the inputs, which differ by the optional
# bias and permutations; an absent one is passed as INDEX, which the body never reads
# through it. The column indices of the store come from OUT_POS, the inverse of out_index:
# a template writes each z row straight to its permuted output column.

_HEAD = """\
from padst_compiler.kernels.triton import bodies as padst_bodies
{%- set inputs = ["X", "VALUES", "INDEX"] + (["BIAS"] if HAS_BIAS else [])
    + (["IN_MAP"] if HAS_IN_MAP else []) + (["OUT_INDEX", "OUT_POS"] if HAS_OUT_POS else []) %}
{{def_kernel(*inputs)}}
    n_tokens = {{size("X", 0)}}
    in_features = {{size("X", 1)}}
    tokens, t_mask = padst_bodies.token_tile(BLOCK_T, n_tokens)
"""

# The arguments every body starts with: x, its strides, the structure and in_index.
_X_VALUES_INDEX = ('X, {{stride("X", 0)}}, {{stride("X", 1)}}, VALUES, INDEX, '
                   '{{"IN_MAP" if HAS_IN_MAP else "INDEX"}}, tokens, t_mask')


def _store(tile_rows: str) -> str:
    """Adds the bias, maps the z rows ``z_rows`` to their output columns and stores the
    ``[BLOCK_T, tile_rows]`` accumulator through Inductor (where an epilogue fuses)."""
    return """\
    acc, out_cols, out_ok = padst_bodies.bias_and_columns(
        acc, {{"BIAS" if HAS_BIAS else "INDEX"}}, {{"OUT_POS" if HAS_OUT_POS else "INDEX"}}, z_rows, z_mask, OUT,
        HAS_BIAS, HAS_OUT_POS)
    idx_t = tokens[:, None]
    idx_n = out_cols[None, :]
    mask = t_mask[:, None] & out_ok[None, :]
    {{store_output(("idx_t", "idx_n"), "acc", "mask", val_shape=("BLOCK_T", "TILE_ROWS"))}}
""".replace("TILE_ROWS", tile_rows)


BLOCK_SOURCE = _HEAD + """\
    block_row = tl.program_id(1)
    acc = padst_bodies.block_forward(
        """ + _X_VALUES_INDEX + """, block_row, in_features, KEPT,
        ROWS, COLS, ROWS_PAD, COLS_PAD, USE_DOT, DOT_PRECISION, HAS_IN_MAP, BLOCK_T)
    r = tl.arange(0, ROWS_PAD)
    z_rows = block_row * ROWS + r
    z_mask = r < ROWS
""" + _store("ROWS_PAD")

_ROWS_TILE = """\
    z_rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    z_mask = z_rows < OUT
"""

NM_SOURCE = _HEAD + _ROWS_TILE + """\
    acc = padst_bodies.nm_forward(
        """ + _X_VALUES_INDEX + """, z_rows, z_mask, in_features,
        NNZ, KEPT, GROUP, HAS_IN_MAP, BLOCK_T, BLOCK_O)
""" + _store("BLOCK_O")

DIAG_SOURCE = _HEAD + _ROWS_TILE + """\
    acc = padst_bodies.diag_forward(
        """ + _X_VALUES_INDEX + """, z_rows, z_mask,
        N_DIAG, LENGTH, OUT, IN, HAS_IN_MAP, BLOCK_T, BLOCK_O)
""" + _store("BLOCK_O")


# ------------------------------------------------------------------ structures


def _distinct_per_row(rows: int, choose: int, out_of: int) -> torch.Tensor:
    """``rows`` rows of ``choose`` distinct integers below ``out_of``: a valid index for
    the autotuner's timing runs, where random int64 data would read out of bounds."""
    return torch.rand(rows, out_of).argsort(dim=1)[:, :choose]


def _sizes(node) -> list[int]:
    """A weight-side node's sizes as integers: a layer's weight shapes are fixed, so where a
    dynamic compile made them symbolic the graph is specialised on them (a guard)."""
    from torch._inductor.virtualized import V

    return V.graph.sizevars.guard_int_seq(node.get_size())


class _Template(ABC):
    """What differs between the structures: the source, the compile-time constants, the
    launch grid, the tile configurations and a valid random index for benchmarking."""

    name: str
    source: str

    @abstractmethod
    def constants(self, values, index, in_features: int, out_features: int) -> dict:
        """The template's constexprs for this layer's shapes."""

    @abstractmethod
    def grid(self, tokens, out_features, meta, *, cdiv):
        """Programs along tokens, along output rows, and 1."""

    @abstractmethod
    def configs(self) -> list[dict]:
        """Tile configurations (meta-parameters and num_warps) to offer the autotuner: those
        of the launcher kernel of the same forward, fresh copies (the caller pops from them)."""

    @abstractmethod
    def random_index(self, values, index, in_features: int, out_features: int) -> torch.Tensor:
        """A valid index of this layer's shape, for the autotuner's timing runs."""


class _BlockTemplate(_Template):
    name, source = "block", BLOCK_SOURCE

    def constants(self, values, index, in_features, out_features):
        from padst_compiler.kernels.triton import kernels as triton_kernels

        _, kept, block_rows, block_cols = _sizes(values)
        return dict(KEPT=kept, OUT=out_features, **triton_kernels.block_tile(block_rows, block_cols))

    def grid(self, tokens, out_features, meta, *, cdiv):
        return cdiv(tokens, meta["BLOCK_T"]), out_features // meta["ROWS"], 1

    def configs(self):
        from padst_compiler.kernels.triton import kernels as triton_kernels

        return [dict(tile) for tile in triton_kernels.BLOCK_FORWARD_TILES]

    def random_index(self, values, index, in_features, out_features):
        n_rows, kept, _, block_cols = _sizes(values)
        return _distinct_per_row(n_rows, kept, in_features // block_cols)


class _RowsTemplate(_Template):
    """N:M and diagonal: a tile of z rows per program."""

    def grid(self, tokens, out_features, meta, *, cdiv):
        return cdiv(tokens, meta["BLOCK_T"]), cdiv(out_features, meta["BLOCK_O"]), 1

    def configs(self):
        from padst_compiler.kernels.triton import kernels as triton_kernels

        return [dict(tile) for tile in triton_kernels.ROWS_FORWARD_TILES]


class _NMTemplate(_RowsTemplate):
    name, source = "nm", NM_SOURCE

    def constants(self, values, index, in_features, out_features):
        _, groups, kept = _sizes(index)
        return dict(NNZ=groups * kept, KEPT=kept, GROUP=in_features // groups, OUT=out_features)

    def random_index(self, values, index, in_features, out_features):
        rows, groups, kept = _sizes(index)
        return _distinct_per_row(rows * groups, kept, in_features // groups).view(rows, groups, kept)


class _DiagonalTemplate(_RowsTemplate):
    name, source = "diag", DIAG_SOURCE

    def constants(self, values, index, in_features, out_features):
        n_diag, length = _sizes(values)
        return dict(N_DIAG=n_diag, LENGTH=length, OUT=out_features, IN=in_features)

    def random_index(self, values, index, in_features, out_features):
        (n_diag,) = _sizes(index)
        return _distinct_per_row(1, n_diag, min(in_features, out_features)).view(n_diag)


_TEMPLATES = {"block_linear": _BlockTemplate(), "nm_linear": _NMTemplate(), "diag_linear": _DiagonalTemplate()}


# ------------------------------------------------------------------ the lowering

_TEMPLATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# What the lowering offers the autotuner: the Triton templates, the opaque op, or both.
# Tests narrow it; under the Triton interpreter the opaque op always wins, since a
# template then runs as Python.
OFFER = ("template", "opaque")


def _emits_triton(x) -> bool:
    """Whether Inductor generates Triton for this input's device."""
    from torch._inductor import config

    device = x.get_device()
    return device is not None and (device.type == "cuda" or (device.type == "cpu" and config.cpu_backend == "triton"))


def _opaque_call(op, run):
    """The op as an extern kernel (Inductor's own choice where it emits no Triton, one of
    the autotuner's where it does): called with the choice's tensors, their argument names
    (``present``; for a forward op the inverse output permutation, which only the
    templates read, comes last and is not named) and the op's feature count. It runs the op
    through ``run`` (:mod:`..eager.dispatch`), which skips the dispatcher where nothing
    needs it and, for a forward op, replays the layer's native kernel call (at one token
    the dispatcher and the op's Python are most of a call), into ``out``, a buffer Inductor
    plans and reuses between layers (see :mod:`padst_compiler.kernels.result_buffers`)."""
    packet = op.overloadpacket
    arguments = [(argument.name, isinstance(argument.type, torch.IntType)) for argument in op._schema.arguments]

    def call(*tensors, features, present, out):
        named = dict(zip(present, tensors))
        run(packet, *(features if is_int else named.get(name) for name, is_int in arguments), out=out)

    call.__name__ = f"{op.__name__}_call"
    return call


def _inverse(out_index):
    """``permutation.inverse_permutation(out_index)`` in the graph: where each z row is stored."""
    from torch._inductor import lowering as L

    size = _sizes(out_index)[0]
    positions = L.iota(size, start=0, step=1, dtype=out_index.get_dtype(), device=out_index.get_device(),
                       requires_grad=False)
    return L.fallback_handler(torch.ops.aten.scatter.src, add_to_fallback_set=False)(
        out_index, 0, out_index, positions)


class _ExternInputs:
    """An op's tensors as an extern call takes them: the first flattened to 2-D, every tensor
    contiguous, the absent optional ones left out (``present`` names the others), and the
    ``[tokens, features]`` layout of the result."""

    def __init__(self, first, named: dict, features: int):
        from torch._inductor import ir
        from torch._inductor import lowering as L
        from torch._inductor.utils import sympy_product
        from torch._inductor.virtualized import V

        self.sizes = first.get_size()
        self.first_features = V.graph.sizevars.guard_int(self.sizes[-1])
        tokens = sympy_product(self.sizes[:-1])
        first = ir.ExternKernel.realize_input(L.view(first, [tokens, self.first_features]))
        self.present = tuple(name for name, node in named.items() if node is not None)
        self.nodes = [first, *(ir.ExternKernel.require_contiguous(named[name]) for name in self.present[1:])]
        self.features = features
        self.layout = ir.FixedLayout(first.get_device(), first.get_dtype(), [tokens, features])

    def opaque_choice(self) -> dict:
        """The keyword arguments of the opaque call's ``bind`` and ``maybe_append_choice``."""
        return dict(input_nodes=self.nodes, layout=self.layout, features=self.features, present=self.present)

    def result(self, flat):
        """The 2-D result ``flat`` in the shape of the op's result."""
        from torch._inductor import lowering as L

        return L.view(flat, [*self.sizes[:-1], self.features])


class _ExternLowering(ABC):
    """An op lowered to one extern call that writes into a buffer Inductor plans, or where
    building it fails, to the op called through the dispatcher."""

    def __init__(self, op_name: str, run):
        from torch._inductor.select_algorithm import ExternKernelChoice

        self.op = getattr(torch.ops.padst, op_name).default
        self.opaque = ExternKernelChoice(_opaque_call(self.op, run), name=f"padst_{op_name}_opaque")

    def __call__(self, *args, **kwargs):
        from torch._inductor.lowering import fallback_handler
        from torch._inductor.virtualized import V

        if not V.graph.cpp_wrapper:  # a C++ wrapper calls ops, not Python functions
            try:
                return self.lower(*args, **kwargs)
            except Exception:  # a torch whose private pieces differ: the op itself still works
                log.warning("padst: lowering %s failed; Inductor calls the op through the dispatcher",
                            self.op, exc_info=True)
        return fallback_handler(self.op, add_to_fallback_set=False)(*args, **kwargs)

    @abstractmethod
    def lower(self, *args, **kwargs):
        """The op's arguments (Inductor's nodes) -> its result node."""

    def extern_call(self, inputs: _ExternInputs):
        """The op as the opaque extern call alone."""
        return inputs.result(self.opaque.bind(**inputs.opaque_choice()).output_node())


class _GradInputLowering(_ExternLowering):
    """An input-gradient op: the extern call (its transposed structure is host code)."""

    def lower(self, grad, values, index, in_features, in_index=None, out_index=None):
        return self.extern_call(_ExternInputs(grad, dict(grad=grad, values=values, index=index, in_index=in_index,
                                                         out_index=out_index), in_features))


class _ForwardLowering(_ExternLowering):
    """The lowering of one forward op: Triton templates and the opaque op, measured by
    Inductor's autotuner where it emits Triton; elsewhere the opaque op alone, as an extern
    call that skips the dispatcher."""

    def __init__(self, op_name: str, run):
        from torch._inductor.select_algorithm import SymbolicGridFn, TritonTemplate

        super().__init__(op_name, run)
        self.structure = _TEMPLATES[op_name]
        self.template = TritonTemplate(name=f"padst_{op_name}", grid=SymbolicGridFn(self.structure.grid),
                                       source=self.structure.source)

    def lower(self, x, values, index, out_features, bias=None, in_index=None, out_index=None):
        from torch._inductor import ir
        from torch._inductor.select_algorithm import autotune_select_algorithm

        inputs = _ExternInputs(x, dict(x=x, values=values, index=index, bias=bias, in_index=in_index,
                                       out_index=out_index), out_features)
        if not ("template" in OFFER and _emits_triton(x) and x.get_dtype() in _TEMPLATE_DTYPES):
            return self.extern_call(inputs)

        nodes, in_features = list(inputs.nodes), inputs.first_features
        values, index = nodes[1], nodes[2]
        if out_index is not None:  # every choice is timed on the same inputs: the opaque call ignores this one
            nodes.append(ir.ExternKernel.require_contiguous(_inverse(nodes[-1])))
        choices = []
        if "opaque" in OFFER:
            self.opaque.maybe_append_choice(choices, **{**inputs.opaque_choice(), "input_nodes": nodes})
        constants = self.structure.constants(values, index, in_features, out_features)
        flags = dict(HAS_BIAS=bias is not None, HAS_IN_MAP=in_index is not None, HAS_OUT_POS=out_index is not None)
        precision = self._dot_precision(x.get_dtype())
        for config in self._configs() if "template" in OFFER else ():
            config = dict(config)
            error = self.template.maybe_append_choice(
                choices, input_nodes=nodes, layout=inputs.layout, num_stages=2, num_warps=config.pop("num_warps"),
                DOT_PRECISION=precision, **constants, **flags, **config)
            if error is not None:
                raise error
        out, _ = autotune_select_algorithm(f"padst_{self.structure.name}_linear", choices, nodes, inputs.layout,
                                           input_gen_fns=self._input_generators(nodes, inputs.present[3:],
                                                                                in_features, out_features))
        return inputs.result(out)

    def _configs(self) -> list[dict]:
        """Tile configurations to measure; the interpreter runs one (it would time Python)."""
        from padst_compiler.kernels.triton import kernels as triton_kernels

        configs = self.structure.configs()
        return configs[:1] if triton_kernels.INTERPRETED else configs

    @staticmethod
    def _dot_precision(dtype) -> str:
        from padst_compiler.kernels.triton import kernels as triton_kernels

        return repr(triton_kernels.dot_precision(dtype))

    def _input_generators(self, nodes, present, in_features, out_features) -> dict:
        """Valid index tensors for the timing runs: the structure index and permutations."""
        values, index = nodes[1], nodes[2]

        def on_device(make):
            return lambda node: make().to(device=node.get_device(), dtype=node.get_dtype())

        generators = {2: on_device(lambda: self.structure.random_index(values, index, in_features, out_features))}
        position = 3 + ("bias" in present)
        if "in_index" in present:
            generators[position] = on_device(lambda: torch.randperm(in_features))
            position += 1
        if "out_index" in present:
            generators[position] = generators[position + 1] = on_device(lambda: torch.randperm(out_features))
        return generators


# ------------------------------------------------------------------ registration

_registered = False
_lock = threading.Lock()


def supported() -> bool:
    """Whether this torch gets the template lowerings (the forward ops then skip the
    user-kernel decomposition, which would hide them from these lowerings)."""
    return visibility.torch_version_tested()


def ensure_registered() -> None:
    """Register the lowerings once; called when a structured op is traced, before Inductor
    lowers the graph that holds it."""
    global _registered
    if _registered or not supported():
        return
    with _lock:
        if _registered:
            return
        _registered = True
        try:
            from torch._inductor import lowering as L
            from torch._library.utils import get_layout_constraint_tag

            from padst_compiler.kernels.eager import dispatch  # (lazy: the registry imports this module)

            lowerings = [*(_ForwardLowering(name, dispatch.structured_linear) for name in _TEMPLATES),
                         *(_GradInputLowering(f"{name}_grad_input", dispatch.structured_grad_input)
                           for name in _TEMPLATES)]
            for lowering in lowerings:
                # The input layouts Inductor gives an op without a lowering of its own.
                constraint = L.tag_to_layout_constraint(get_layout_constraint_tag(lowering.op, with_default=True))
                if constraint is not None:
                    L.add_layout_constraint(lowering.op, constraint)
                L.register_lowering(lowering.op, type_promotion_kind=None)(lowering)
            _tag_compile_caches()
        except Exception:  # the opaque op still works everywhere
            log.warning("padst: the Triton template lowerings could not be registered", exc_info=True)


def _tag_compile_caches() -> None:
    """Inductor's on-disk caches do not see lowerings: a graph compiled without these (or
    with another version of them, or of the kernel bodies its templates import) would be
    loaded as it was compiled. The tag puts the sources of this module and of those bodies
    into every compile cache key of the process."""
    bodies = Path(__file__).parents[1] / "triton" / "bodies.py"
    sources = hashlib.sha256(Path(__file__).read_bytes() + bodies.read_bytes())
    tag = "padst-lowering-" + sources.hexdigest()[:16]
    current = torch.compiler.config.cache_key_tag
    if tag not in current:
        torch.compiler.config.cache_key_tag = f"{current}+{tag}" if current else tag
