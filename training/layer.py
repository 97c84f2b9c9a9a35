"""``PADSTLinear``: a linear layer with a structured sparse weight and one permutation.

    y = S · Π · x + b     (side="input")
    y = Π · (S · x + b)   (side="output")

``S`` is stored compressed (the ``values`` parameter and the ``index`` buffer) and
computed with the ``padst`` ops. How ``Π`` is found depends on ``permutation``:

- ``"learned"`` (default): the layer first trains dense (``dense_weight_proxy``, a short
  warm-up); hardening then picks the permutation under which the structure keeps the most
  of that dense weight, fits ``S`` to it and frees the dense copy. From then on training
  is sparse.
- ``"birkhoff"`` (the paper's recipe): a soft matrix ``M`` in the Birkhoff polytope,
  ``x @ M.T`` before the structured op, pushed to a vertex by the l1-l2 penalty and
  rounded by the assignment problem.
- ``"random"``: a fixed random permutation; ``"none"``: no permutation.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from padst_compiler.kernels.permutation import inverse_permutation
from padst_compiler.kernels.structures import Structure, check_sparsity
from padst_compiler.training import permutation as perm
from padst_compiler.training.sharding import assign, is_sharded, whole

PERMUTATION_MODES = ("learned", "birkhoff", "random", "none")
SIDES = ("input", "output", "auto")
WARMUP_TENSORS = ("dense_weight_proxy", "dense_weight_average")  # full while warming up, emptied after


def check_permutation_options(permutation: str, side: str, dense_warmup: bool | None,
                              name: str | None = None) -> bool:
    """Validate the permutation options; returns ``dense_warmup`` with its default filled in."""
    owner = name or "PADSTLinear"
    if permutation not in PERMUTATION_MODES:
        raise ValueError(f"{owner}: permutation must be one of {PERMUTATION_MODES}, got {permutation!r}")
    if side not in SIDES:
        raise ValueError(f"{owner}: side must be one of {SIDES}, got {side!r}")
    dense_warmup = permutation == "learned" if dense_warmup is None else dense_warmup
    if permutation == "learned" and not dense_warmup:
        raise ValueError(f"{owner}: permutation='learned' is chosen from the dense warm-up weight, so it needs "
                         "dense_warmup=True")
    if permutation == "birkhoff" and dense_warmup:
        raise ValueError(f"{owner}: permutation='birkhoff' learns its soft matrix on the sparse weight; "
                         "dense_warmup=True is for 'learned', 'random' and 'none'")
    return dense_warmup


RECORD_BYTES = 512  # one length for every layer and state: checkpointers that load in place need it


def encode_record(record: dict) -> torch.Tensor:
    """A JSON-able dict as a uint8 tensor of its JSON text, padded with spaces to RECORD_BYTES."""
    text = json.dumps(record, sort_keys=True).encode()
    if len(text) > RECORD_BYTES:
        raise ValueError(f"layer record of {len(text)} bytes exceeds {RECORD_BYTES}: {text[:80]!r}...")
    return torch.tensor(list(text.ljust(RECORD_BYTES)), dtype=torch.uint8)


def decode_record(value) -> dict | None:
    """The dict ``encode_record`` stored (or a dict as older checkpoints held it); None if
    ``value`` is neither."""
    if isinstance(value, dict):
        return value
    if not torch.is_tensor(value) or value.dtype != torch.uint8 or value.dim() != 1:
        return None
    try:
        record = json.loads(bytes(value.tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


class PADSTLinear(nn.Module):
    """Structured sparse linear layer with a learned, random or no permutation."""

    def __init__(self, in_features: int, out_features: int, structure: Structure, sparsity: float,
                 bias: bool = True, permutation: str = "learned", side: str = "auto",
                 name: str | None = None, soft_noise: float = 0.5, seed: int = 0,
                 dense_warmup: bool | None = None, device=None, dtype=None):
        super().__init__()
        dense_warmup = check_permutation_options(permutation, side, dense_warmup, name)
        self.in_features, self.out_features = in_features, out_features
        self.structure, self.sparsity = structure, check_sparsity(sparsity)
        self.name, self.seed = name, seed
        structure.kept_units(out_features, in_features, sparsity, layer=name)  # fail early, by name
        if side == "auto":
            side = "input" if in_features <= out_features else "output"
        self.side, self.permutation = side, permutation
        factory = {"device": device, "dtype": dtype}

        dense = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(dense, a=5 ** 0.5)  # nn.Linear's initialisation
        weight = structure.project(dense, sparsity, layer=name)
        self.values = nn.Parameter(weight.values)
        self.register_buffer("index", weight.index)
        if bias:
            bound = 1 / in_features ** 0.5
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

        self.capture_dense_grad = False  # set by the DST scheduler before a RigL update step
        self.dense_grad: torch.Tensor | None = None

        gen = torch.Generator().manual_seed(seed)
        size = self.permuted_features
        self.hard = not dense_warmup and permutation != "birkhoff"
        self.register_buffer("perm_index", None if permutation == "none" else
                             (perm.random_permutation(size, gen) if permutation == "random"
                              else torch.arange(size)).to(device))
        soft = perm.identity_like_soft(size, soft_noise, gen, dtype or torch.float32).to(device) \
            if permutation == "birkhoff" else None
        self.register_parameter("soft_perm", None if soft is None else nn.Parameter(soft))
        self.register_parameter("dense_weight_proxy", nn.Parameter(dense) if dense_warmup else None)
        # running mean of the warm-up weight over the warm-up's second half: the permutation is
        # chosen from it, so optimizer jitter around small weights does not decide it
        self.register_buffer("dense_weight_average", dense.clone() if dense_warmup else None)
        self.averaged_steps = 0
        self.dense_class: type[nn.Module] = nn.Linear  # what ``densify`` gives back (sparsify records it)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, structure: Structure,
                   sparsity: float, **options) -> PADSTLinear:
        """A layer whose structured weight is the projection of an existing dense ``[out, in]`` one."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, structure, sparsity, bias=bias is not None,
                    device=weight.device, dtype=weight.dtype, **options)
        # a permutation fixed from the start (``"random"``) is applied to the inputs (or outputs)
        # of the structured weight: project the dense weight in that order, so the layer keeps
        # the dense function as far as the structure allows
        fixed = layer.hard and layer.perm_index is not None
        projected = structure.project(layer._in_structure_order(weight) if fixed else weight, sparsity,
                                      layer=options.get("name"))
        with torch.no_grad():
            layer.values.copy_(projected.values)
            layer.index.copy_(projected.index)
            if layer.dense_weight_proxy is not None:
                layer.dense_weight_proxy.copy_(weight)
                layer.dense_weight_average.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def permuted_features(self) -> int:
        return self.in_features if self.side == "input" else self.out_features

    @property
    def warming_up(self) -> bool:
        """Whether the layer still trains its dense warm-up weight (before hardening)."""
        return self.soft and self.dense_weight_proxy is not None

    @property
    def frozen(self) -> bool:
        """Whether none of the layer's weights trains (``requires_grad_(False)``, as when
        fine-tuning part of a model): the DST scheduler then leaves the layer as it is."""
        weights = (self._parameters[name] for name in ("values", "dense_weight_proxy", "soft_perm"))  # no __getattr__
        return not any(p is not None and p.requires_grad for p in weights)

    @property
    def soft(self) -> bool:
        """Whether the permutation is still being learned (dense warm-up or soft matrix)."""
        return not self.hard

    # ----------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 0:  # (a Proxy under fx tracing)
            raise ValueError(f"{self.name or 'PADSTLinear'}: expected inputs with {self.in_features} features "
                             "in the last dimension, got a 0-d tensor")
        features = x.shape[-1]
        if isinstance(features, int) and features != self.in_features:  # (a Proxy under fx tracing)
            raise ValueError(f"{self.name or 'PADSTLinear'}: expected inputs with {self.in_features} features "
                             f"in the last dimension, got shape {tuple(x.shape)}")
        if self.warming_up:
            return F.linear(x, self.dense_weight_proxy, self.bias)
        in_index = out_index = None
        if self.soft and self.side == "input":
            x = x @ self.soft_perm.t()
        elif self.hard and self.perm_index is not None:
            in_index, out_index = (self.perm_index, None) if self.side == "input" else (None, self.perm_index)
        if self.capture_dense_grad and torch.is_grad_enabled():
            y = self._forward_capturing(x, in_index, out_index)
        else:
            y = self.structure.linear(x, self.values, self.index, self.out_features, self.bias, in_index, out_index)
        if self.soft and self.side == "output":
            y = y @ self.soft_perm.t()
        return y

    def _forward_capturing(self, x, in_index, out_index):
        """The same function, unfused, with a hook that adds ``dL/dS`` (dense) to ``dense_grad``:
        RigL grows where the dense gradient is largest, which the sparse backward never forms."""
        if in_index is not None:
            x = x.index_select(-1, in_index)
        z = self.structure.linear(x, self.values, self.index, self.out_features, self.bias)
        inputs = x.detach().reshape(-1, self.in_features)

        def accumulate(grad):
            dense = grad.reshape(-1, self.out_features).t() @ inputs
            self.dense_grad = dense if self.dense_grad is None else self.dense_grad + dense

        z.register_hook(accumulate)
        return z if out_index is None else z.index_select(-1, out_index)

    def dense_weight(self) -> torch.Tensor:
        """``S`` as a dense ``[out, in]`` matrix (permutation not applied)."""
        return self.structure.expand(whole(self.values), self.index, self.out_features, self.in_features)

    def effective_weight(self) -> torch.Tensor:
        """The dense matrix ``W`` with ``forward(x) == x @ W.T + b'`` (``b'`` permuted on the output side)."""
        if self.warming_up:
            return whole(self.dense_weight_proxy)
        weight = self.dense_weight()
        if self.perm_index is None:
            return weight
        if self.side == "input":
            return weight @ whole(self.soft_perm) if self.soft else weight[:, inverse_permutation(self.perm_index)]
        return whole(self.soft_perm) @ weight if self.soft else weight[self.perm_index]

    def effective_bias(self) -> torch.Tensor | None:
        """The bias ``b'`` of ``effective_weight``: permuted like the outputs on the output side."""
        bias = None if self.bias is None else whole(self.bias)
        if bias is None or self.warming_up or self.perm_index is None or self.side == "input":
            return bias
        return whole(self.soft_perm) @ bias if self.soft else bias[self.perm_index]

    # ------------------------------------------------------------------ permutation

    def penalty(self) -> torch.Tensor:
        """Normalised distance of the soft matrix from a permutation (0 once hard or without one)."""
        if not self.soft or self.soft_perm is None:
            return self.values.new_zeros(())
        return perm.permutation_penalty(whole(self.soft_perm))

    @torch.no_grad()
    def average_warmup_weight(self, count: int) -> None:
        """Fold the warm-up weight into its running mean as the ``count``-th sample (1: restart)."""
        if self.warming_up:
            self.dense_weight_average.lerp_(whole(self.dense_weight_proxy).detach(), 1 / count)
            self.averaged_steps = count

    @torch.no_grad()
    def reselect_permutation(self) -> None:
        """Re-choose a learned layer's permutation from its dense warm-up weight as it is now."""
        if self.warming_up and self.permutation == "learned":
            self.perm_index.copy_(self._selected_permutation())

    @torch.no_grad()
    def anneal_toward_structure(self, keep: float) -> None:
        """Scale the warm-up weights the structure would drop now (under the current
        permutation) by ``keep``: the scheduler lowers ``keep`` to 0 over the warm-up, so the
        dense weight flows into the structure and hardening changes the function little."""
        if not self.warming_up:
            return
        weight = whole(self.dense_weight_proxy)
        ordered = self._in_structure_order(weight).detach().float().square()
        kept = self.structure.kept_units(self.out_features, self.in_features, self.sparsity)
        mask = self.structure.units_to_dense(self.structure.best_units(ordered, kept), self.out_features,
                                             self.in_features)
        assign(self.dense_weight_proxy, weight * self._in_feature_order(torch.where(mask, 1.0, keep).to(weight.dtype)))

    def _in_structure_order(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of a dense ``[out, in]`` weight in the order the structure sees it."""
        if self.perm_index is None:
            return weight.clone()
        return weight[:, self.perm_index] if self.side == "input" else weight[inverse_permutation(self.perm_index)]

    def _in_feature_order(self, ordered: torch.Tensor) -> torch.Tensor:
        if self.perm_index is None:
            return ordered
        return ordered[:, inverse_permutation(self.perm_index)] if self.side == "input" else ordered[self.perm_index]

    def _selected_permutation(self) -> torch.Tensor:
        starts = [self.perm_index]
        if self.permuted_features <= 256:  # small layers: a second start is cheap and avoids local optima
            starts.append(perm.random_permutation(self.permuted_features, torch.Generator().manual_seed(self.seed)))
        source = self.dense_weight_average if self.averaged_steps else whole(self.dense_weight_proxy)
        return perm.select_permutation(source, self.structure, self.sparsity, self.side, starts)

    @torch.no_grad()
    def check_hardenable(self) -> None:
        """Refuse to harden a weight holding NaN or inf (a diverged run): the permutation
        search and the assignment problem cannot rank such entries."""
        if self.soft and not bool(torch.isfinite(self.effective_weight()).all()):
            raise ValueError(f"layer {self.name or 'PADSTLinear'!r}: its weight holds NaN or inf (did training "
                             "diverge?); it cannot be hardened, nothing was changed")

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the permutation and fit the structured weight to what the layer computes now.

        After a dense warm-up, ``S = project(W[:, p])`` and the dense copy is freed; ``p`` is,
        for ``"learned"``, the permutation under which the structure keeps the most of ``W``
        (started from the current order and, for small layers, a random one), and the fixed
        one (or none) otherwise. ``"birkhoff"``: the assignment problem on the soft matrix
        (grouped by the structure's interchangeable positions), then ``S`` re-fitted to
        ``W_eff = S M`` so the hard layer stays as close as the structure allows to what
        training found.
        """
        if not self.soft:
            return
        self.check_hardenable()
        weight, bias = self.effective_weight(), self.effective_bias()
        if self.warming_up and self.permutation != "learned":
            index = self.perm_index
        elif self.warming_up:
            index = self._selected_permutation()
        else:
            matrix = whole(self.soft_perm)
            soft = matrix if self.side == "input" else matrix.t()
            index = perm.harden(soft, self.structure.interchangeable(self.side))
            if self.side == "output":  # harden(M.T) gives the row order of S; p is its inverse
                index = inverse_permutation(index)
        if index is not None and self.side == "input":
            weight = weight[:, index]
        elif index is not None:
            inverse = inverse_permutation(index)
            weight = weight[inverse]
            bias = None if bias is None else bias[inverse]
        fitted = self.structure.project(weight, self.sparsity, layer=self.name)
        assign(self.values, fitted.values)
        self.index.copy_(fitted.index)
        if bias is not None:
            assign(self.bias, bias)
        if index is not None:
            self.perm_index.copy_(index)
        # the freed tensors keep requires_grad: which parameters train never changes, so an
        # optimizer built after loading a hardened checkpoint holds the same ones as before
        if self.soft_perm is not None:
            self.soft_perm.grad = None  # unused from now on: no last step on a stale gradient
        if self.dense_weight_proxy is not None:  # not needed any more: keep only the sparse weight
            self.dense_weight_proxy.grad = None  # a stale full-size gradient would break the next optimizer step
            # FSDP2 cannot resize a parameter it shards, and its checkpoints load in place: a
            # sharded layer keeps both warm-up tensors at full size, unused
            if not is_sharded(self.dense_weight_proxy):
                self.dense_weight_proxy.data = self.dense_weight_proxy.new_empty(0)
                self.dense_weight_average = self.dense_weight_average.new_empty(0)
        self.hard = True

    # ------------------------------------------------------------------- checkpoints

    def state_record(self) -> dict:
        """How the layer was built and where its training stands (its checkpoint extra state)."""
        return {"structure": repr(self.structure), "sparsity": self.sparsity, "permutation": self.permutation,
                "side": self.side, "dense_warmup": self.dense_weight_proxy is not None, "hard": self.hard,
                "seed": self.seed, "averaged_steps": self.averaged_steps}

    def get_extra_state(self) -> torch.Tensor:
        # a tensor (JSON bytes), not a dict: state dicts stay all-tensor, so safetensors-based
        # savers (Hugging Face ``save_pretrained``, the Trainer's checkpoints) can write them
        return encode_record(self.state_record())

    def set_extra_state(self, state) -> None:
        record = decode_record(state)
        if record is None or not isinstance(record.get("hard"), bool):
            raise ValueError(f"{self.name or 'PADSTLinear'}: unreadable checkpoint state {state!r}")
        state = record
        self.hard = bool(state["hard"])
        self.seed = int(state.get("seed", self.seed))  # hardening's random restarts follow the checkpoint
        self.averaged_steps = int(state.get("averaged_steps", 0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a hardened layer saves its dense warm-up weight (and its mean) emptied, a warming-up one in
        # full: take the checkpoint's (sparsify's checkpoint guard has checked it is one of the two)
        if self.dense_weight_proxy is not None:
            for name in WARMUP_TENSORS:
                theirs = state_dict.get(prefix + name)
                if torch.is_tensor(theirs):
                    getattr(self, name).data = getattr(self, name).new_empty(theirs.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "soft" if self.soft else "hard" if self.perm_index is not None else "none"
        return (f"{self.in_features} -> {self.out_features}, {self.structure}, sparsity={self.sparsity}, "
                f"permutation={self.permutation} ({state}, {self.side}), bias={self.bias is not None}")
