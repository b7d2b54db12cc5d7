"""Serving forms: the function of a trained model, with its memory traffic arranged for
inference (``afmrec export``).

- :class:`DCNServing`: DLRM-DCNv2's cross input assembled in one buffer; on CUDA its cross
  network may be fused: computed from an AFM model's codes
  (:class:`~afmrec.models.fused_cross.FusedCrossNet`), or each layer's ``up`` GEMM and
  update in one kernel (:class:`~afmrec.models.fused_cross.X0CrossNet`, any tables).
- :class:`LinearReLU`: every ``Linear -> ReLU`` of the MLPs (TorchRec ``Perceptron``\ s,
  their Linear plain or low-rank) as one GEMM with the ReLU in its epilogue, instead of a
  GEMM and a pass that reads and writes the whole (B, out) activation again.
- :class:`FlatLookup`: a quantised collection of one table group, its kernel called on
  the input's ids without TorchRec's split (which reads every feature's id count back to
  the host); in the AOTInductor artifact on CUDA, its rows may be pooled by our Triton
  kernel (:mod:`afmrec.models.kernels.lookup`) instead of FBGEMM's.

:func:`use_kernels_` switches a serving form between the two kernel sets, or each kind
apart: FBGEMM's and PyTorch's (which TorchScript can hold), or our Triton kernels (which
AOTInductor can); which is faster is measured per artifact
(:func:`afmrec.pipeline.kernel_choice.choose_kernels`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torchrec.models.dlrm import DLRM_DCN
from torchrec.modules.mlp import Perceptron
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .fused_cross import FusedCrossNet, X0CrossNet, unfusable_reason, x0_unfusable_reason
from .kernels.lookup import KernelRows, kernel_rows, pooled_lookup
from .lowrank import LowRankEmbeddingBagCollection, LowRankLinear


class DCNServing(nn.Module):
    """DLRM-DCNv2's forward with the cross network's input assembled in one buffer.

    TorchRec's ``DLRM_DCN`` concatenates the F pooled fields into (B, F, D), then puts the
    dense row in front: two copies of the model's widest activation, (B, (F + 1) D), per
    call. Here the dense arch's output and the fields are written into their slices of
    one (B, F + 1, D) buffer: the fields of full-width tables are copied once, and an AFM
    model's low-rank tables write their projections into it
    (:meth:`LowRankEmbeddingBagCollection.project_into`: in serving form,
    :meth:`~LowRankEmbeddingBagCollection.fuse_projections_`, one batched GEMM; with ranks
    that differ, one batched GEMM per rank and one copy per run of full-width tables), so
    its fields are never concatenated and copied again.

    With ``fuse_cross``, the interaction and the cross network are one
    :class:`~afmrec.models.fused_cross.FusedCrossNet` (AFM models, see
    :func:`~afmrec.models.fused_cross.unfusable_reason`): each layer is one GEMM whose
    epilogue forms the interaction from the codes and applies the layer's update. A model
    whose tables are not low-rank (the original) gets
    :class:`~afmrec.models.fused_cross.X0CrossNet` instead: the interaction assembled as
    above, then each layer's ``up`` GEMM and update in one kernel.

    Args:
        model: a ``DLRM_DCN`` whose collection returns its F fields in the order of its
            sparse arch's ``sparse_feature_names`` (every TorchRec collection and ours
            does).
        fuse_cross: compute the cross network from the codes (raises ValueError where
            it cannot).
    """

    def __init__(self, model: DLRM_DCN, fuse_cross: bool = False) -> None:
        super().__init__()
        sparse = model.sparse_arch
        self.dense_arch = model.dense_arch
        self.embedding_bag_collection = sparse.embedding_bag_collection
        self.crossnet = model.inter_arch.crossnet
        self.over_arch = model.over_arch
        self.num_fields: int = sparse.F
        self.dim: int = sparse.D
        ebc = self.embedding_bag_collection
        self.in_place = isinstance(ebc, LowRankEmbeddingBagCollection)
        self.fused: FusedCrossNet | None = None
        self.fused_x0: X0CrossNet | None = None
        self.use_fused = fuse_cross  # read when traced: False serves the plain network
        if fuse_cross and unfusable_reason(ebc, self.crossnet) is None:
            self.fused = FusedCrossNet(ebc, self.crossnet)
        elif fuse_cross:
            self.fused_x0 = X0CrossNet(self.crossnet)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense (B, N), KJT of F features. Returns: logits (B, 1)."""
        dense = self.dense_arch(dense_features)  # (B, D)
        if self.fused is not None and self.use_fused:
            codes, nonempty = self.embedding_bag_collection.forward_codes(sparse_features)
            return self.over_arch(self.fused(dense, codes.values(), nonempty))
        batch = dense.shape[0]
        x0 = dense.new_empty([batch, self.num_fields + 1, self.dim])
        x0.select(1, 0).copy_(dense)
        fields = x0.narrow(1, 1, self.num_fields)  # (B, F, D)
        if self.in_place:
            self.embedding_bag_collection.project_into(sparse_features, fields)
        else:
            fields.copy_(self.embedding_bag_collection(sparse_features).values().view(batch, self.num_fields, self.dim))
        if self.fused_x0 is not None and self.use_fused:
            return self.over_arch(self.fused_x0(x0.view(batch, -1)))
        return self.over_arch(self.crossnet(x0.view(batch, -1)))


class LinearReLU(nn.Module):
    """``relu(linear(pre(x)))`` with the bias and the ReLU in the GEMM's epilogue
    (``torch._addmm_activation``: cuBLASLt's bias + ReLU epilogue on CUDA).

    Args:
        linear: the Linear whose output the ReLU reads (a low-rank pair's ``second``).
        pre: what comes before it (a low-rank pair's ``first`` and activation), or
            ``nn.Identity``.
    """

    def __init__(self, linear: nn.Linear, pre: nn.Module) -> None:
        super().__init__()
        self.pre = pre
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, in), a matrix (as every MLP of our models gets). Returns: (B, out)."""
        return torch._addmm_activation(self.bias, self.pre(x), self.weight.t())


def _linear_relu(perceptron: Perceptron) -> LinearReLU | None:
    """The fused form of a ``Perceptron`` with a ReLU and a bias, else None."""
    act = perceptron._activation_fn
    if not (act is torch.relu or isinstance(act, nn.ReLU)):
        return None
    linear = perceptron._linear
    if isinstance(linear, LowRankLinear):
        pre: nn.Module = nn.Sequential(linear.first, linear.activation)
        linear = linear.second
    elif isinstance(linear, nn.Linear):
        pre = nn.Identity()
    else:
        return None
    return LinearReLU(linear, pre) if linear.bias is not None else None


def fuse_relus_(model: nn.Module) -> int:
    """Replaces, in place, every ``Perceptron`` of ``model`` with a ReLU by its
    :class:`LinearReLU` (same parameters, same function). Returns how many."""
    fused = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Perceptron) and (replacement := _linear_relu(child)) is not None:
                setattr(parent, name, replacement)
                fused += 1
    return fused


def kernel_inputs(features: KeyedJaggedTensor, saturate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids and bag offsets of ``features`` as FBGEMM's inference kernels take them:
    int32 on CUDA, both of the ids' dtype elsewhere. With ``saturate``, ids beyond int32
    become -1 or int32's largest, which no table has (so a kernel that checks ids reads
    row 0 for them, as for any id outside its table), instead of wrapping into a table.
    A leaf of ``torch.fx`` tracing."""
    indices, offsets = features.values(), features.offsets()
    if indices.is_cuda:
        if saturate:  # one fused pass with the cast in a compiled graph
            indices = indices.clamp(-1, 2147483647)
        return indices.int(), offsets.int()
    return indices, offsets.to(indices.dtype)


torch.fx.wrap("kernel_inputs")


def packed_rows(kernel: nn.Module) -> KernelRows | None:
    """The rows of an FBGEMM inference kernel as :func:`~afmrec.models.kernels.lookup.
    pooled_lookup` reads them (:func:`~afmrec.models.kernels.lookup.kernel_rows`: shared,
    not copied); None where the kernel has rows it cannot read (several formats, int4,
    UVM, reversed qparams, rows too wide) or another output."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation

    formats = {spec[3].value for spec in kernel.embedding_specs}
    placements = set(kernel.weights_physical_placements)
    if (len(formats) != 1 or kernel.output_dtype != SparseType.FP32.as_int()
            or getattr(kernel, "reverse_qparam", False) or len(placements) != 1):
        return None
    placement = placements.pop()
    if placement == EmbeddingLocation.DEVICE.value:
        weights = kernel.weights_dev
    elif placement == EmbeddingLocation.HOST.value:
        weights = kernel.weights_host
    else:
        return None
    views = [w for w, _ in kernel.split_embedding_weights(split_scale_shifts=False)]
    if any(v.untyped_storage().data_ptr() != weights.untyped_storage().data_ptr() for v in views):
        return None
    dims = [spec[2] for spec in kernel.embedding_specs]
    column, tables = 0, []
    for t in kernel.feature_table_map:  # feature by feature: [row0 byte, stride, rows, dim, column]
        view = views[t]
        tables.append([view.data_ptr() - weights.data_ptr(), view.stride(0), view.shape[0], dims[t], column])
        column += dims[t]
    return kernel_rows(weights, tables, formats.pop())


class FlatLookup(nn.Module):
    """A quantised ``EmbeddingBagCollection`` whose tables are one FBGEMM kernel (one row
    format) and whose features come in the input's key order: that kernel called on the
    input's ids and offsets as they are (``forward`` called, not the module: torch.fx
    traces into it, as TorchRec's collections call theirs).

    TorchRec's forward splits the input into table groups first, and the split reads every
    feature's id count back to the host even when there is one group: a device sync per
    batch, which ``torch.export`` turns into one sync per feature (26 a batch at the MLPerf
    shape, about 0.5 ms of host time on an H200).

    With ``use_kernel`` (set by :func:`use_kernels_`; where :func:`packed_rows` reads the
    kernel's rows), the same rows are pooled by
    :func:`~afmrec.models.kernels.lookup.pooled_lookup` instead, which also applies the id
    check.

    Args:
        collection: the quantised collection (:func:`flatten_lookups_` says which qualify);
            its kernel (with the tables) is shared.
    """

    def __init__(self, collection: QuantEmbeddingBagCollection) -> None:
        super().__init__()
        # kept out of the module tree, as TorchRec keeps it (export cannot trace FBGEMM's
        # script objects of a registered kernel)
        self._emb_modules: list[nn.Module] = list(collection._emb_modules)
        self.keys: list[str] = list(collection._embedding_names)
        self.length_per_key: list[int] = list(collection._length_per_key)
        self.use_kernel = False
        # KernelRows' fields but its tensors, which are buffers (they move with the module)
        self.kernel_spec: dict[str, Any] | None = None
        packed = packed_rows(self._emb_modules[0])
        if packed is not None:
            self.register_buffer("kernel_weights", packed.weights, persistent=False)
            self.register_buffer("kernel_tables", packed.tables, persistent=False)
            self.kernel_spec = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)
                                if f.name not in ("weights", "tables")}

    @property
    def has_kernel(self) -> bool:
        """Whether our kernel can pool these rows (:func:`packed_rows`)."""
        return self.kernel_spec is not None

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Args: features: KJT whose keys are the collection's features, in its order.
        Returns: KeyedTensor (B, sum of the tables' widths)."""
        indices, offsets = kernel_inputs(features, saturate=self.use_kernel)
        if self.use_kernel:
            rows = KernelRows(self.kernel_weights, self.kernel_tables, **self.kernel_spec)
            values = pooled_lookup(rows, indices, offsets)
        else:
            values = self._emb_modules[0].forward(indices=indices, offsets=offsets)
        return KeyedTensor(keys=self.keys, length_per_key=self.length_per_key, values=values)


def flatten_lookups_(model: nn.Module, features: list[str]) -> int:
    """Replaces, in place, every quantised collection of ``model`` that is one kernel,
    unweighted, with ``features`` as its feature order, by its :class:`FlatLookup`.
    Returns how many."""
    flattened = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (isinstance(child, QuantEmbeddingBagCollection) and len(child._emb_modules) == 1
                    and not child.is_weighted() and list(child._feature_names) == list(features)):
                setattr(parent, name, FlatLookup(child))
                flattened += 1
    return flattened


def use_kernels_(model: nn.Module, on: bool, *, lookup: bool | None = None,
                 cross: bool | None = None) -> dict[str, str]:
    """Serves ``model``'s serving form with our kernels (``on``: the fused cross network
    and, on CUDA, the Triton lookups, as the AOTInductor artifact holds them) or without
    (FBGEMM's lookups and the plain cross network, which TorchScript can hold);
    ``lookup`` and ``cross`` set either kind apart from ``on`` (a choice measured per
    artifact). Returns what it now serves with: ``{"cross": "fused" | "plain", "lookup":
    "triton" | "fbgemm"}``."""
    lookup = on if lookup is None else lookup
    cross = on if cross is None else cross
    fused = triton = False
    for m in model.modules():
        if isinstance(m, DCNServing) and (m.fused is not None or m.fused_x0 is not None):
            m.use_fused = cross
            fused = fused or cross
        elif isinstance(m, FlatLookup) and m.has_kernel:
            m.use_kernel = lookup and m.kernel_weights.is_cuda
            triton = triton or m.use_kernel
    return {"cross": "fused" if fused else "plain", "lookup": "triton" if triton else "fbgemm"}


def cross_fusion_blocker(model: nn.Module) -> str | None:
    """Why :func:`serving_form` cannot fuse ``model``'s cross network (from its codes or,
    for tables that are not low-rank, from its interaction in memory), or None if it can."""
    if not isinstance(model, DLRM_DCN):
        return "not a DLRM-DCNv2"
    crossnet = model.inter_arch.crossnet
    if unfusable_reason(model.sparse_arch.embedding_bag_collection, crossnet) is None:
        return None
    return x0_unfusable_reason(crossnet)


def serving_form(model: nn.Module, fuse_cross: bool = False) -> nn.Module:
    """The serving form of ``model`` (same parameters, same function): its MLPs' ReLUs
    fused into their GEMMs (:func:`fuse_relus_`, in place), and DLRM-DCNv2 wrapped in
    :class:`DCNServing` when its collection's fields come in the sparse arch's order;
    with ``fuse_cross``, its cross network fused (from the codes, or from the interaction
    for full-width tables) where :func:`cross_fusion_blocker` allows."""
    fuse_relus_(model)
    if not isinstance(model, DLRM_DCN):
        return model
    sparse = model.sparse_arch
    order = [f for c in sparse.embedding_bag_collection.embedding_bag_configs() for f in c.feature_names]
    if order != list(sparse.sparse_feature_names):
        return model
    return DCNServing(model, fuse_cross and cross_fusion_blocker(model) is None)
