"""Inference below MLflow: structures checked once, graphs built once per graph setting,
every model run on them. Used by `mpprop predict` and by the served MLflow model.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
from pymatgen.core import Element, Lattice, Structure
from pymatgen.core.periodic_table import DummySpecies
from pymatgen.io.cif import CifParser

from mpprop.batches import collect_in_row_order, iterate_batches
from mpprop.bundle import (
    TASK_REGRESSION,
    LoadedModel,
    ensemble_mean_std,
    floor_to_zero,
    gate_metals,
)
from mpprop.device import pin_host_memory
from mpprop.graph_cache import GraphCache, known_elements
from mpprop.graphs import graphs_from_structures
from mpprop.intervals import DEFAULT_COVERAGE, NO_CALIBRATION_NOTE
from mpprop.model import CrystalGraphConvNet
from mpprop.settings import GraphSettings, StructureLimits
from mpprop.snapshot import structure_problem
from mpprop.training import model_device, predict

# atoms closer than this are almost surely a broken structure (shortest MP bonds: ~0.74 Å, H2)
OVERLAP_DISTANCE = 0.5  # Å
# an empty slab of space wider than this between planes of atoms: a layer, slab or molecule in
# vacuum (graphene), unlike MP's bulk crystals (measured on 4,000 snapshot structures: 99%
# have a widest gap < 3.2 Å, 0.15% > 6 Å); the OOD score does not catch these reliably
VACUUM_GAP = 6.0  # Å
# a bond shorter than this x the sum of the two atoms' covalent radii: a compressed or broken
# cell (measured on 6,000 snapshot structures: shortest ratio 0.63, none below 0.6; the same
# crystals at 0.5x lattice: 99.8% below, at 0.7x: 19%); the OOD score flags only a third of
# the 0.5x cells
SHORT_BOND_RATIO = 0.6
# lattice translations whose shortest one, on an LLL-reduced basis, is the shortest lattice
# vector (the 26 neighbours of the origin)
_IMAGES = np.array([v for v in itertools.product((-1, 0, 1), repeat=3) if any(v)], dtype=float)
# pairs of sites per block of the shortest-distance check (bounds its memory)
_DISTANCE_BLOCK = 1 << 20


DEFAULT_LIMITS = StructureLimits()


def shortest_distance(structure: Structure) -> float:
    """The shortest distance (Å) between two atoms, periodic images included (an atom and its
    own image: the shortest lattice vector). Minimum image on the LLL-reduced lattice
    (pymatgen's pbc_shortest_vectors), O(n^2) in blocks: call it after the atom count check."""
    lattice = Lattice(structure.lattice.matrix)  # periodic in 3D, as the graphs are
    shortest = float(np.linalg.norm(_IMAGES @ lattice.lll_matrix, axis=1).min())
    frac = structure.frac_coords
    n = len(frac)
    step = max(1, _DISTANCE_BLOCK // max(n, 1))
    for lo in range(0, n if n > 1 else 0, step):
        d = lattice.get_all_distances(frac[lo:lo + step], frac)
        rows = np.arange(len(d))
        d[rows, lo + rows] = np.inf  # an atom and itself (the zero translation)
        shortest = min(shortest, float(d.min()))
    return shortest


def limit_error(structure: Structure, limits: StructureLimits = DEFAULT_LIMITS) -> str:
    """Why a structure would cost unbounded work ('' if it would not): the cheap checks first,
    the O(n^2) distance check only on cells within max_atoms."""
    n = len(structure)
    if limits.max_atoms and n > limits.max_atoms:
        return (f"{n} atoms is above predict.max_atoms ({limits.max_atoms}): too large to "
                "featurize here")
    volume = abs(float(np.linalg.det(structure.lattice.matrix))) / max(n, 1)
    if volume < limits.min_volume_per_atom:
        return (f"volume per atom {volume:.3g} Å^3 is below predict.min_volume_per_atom "
                f"({limits.min_volume_per_atom!r} Å^3; crystals have > ~5): the crystal graph "
                "would explode")
    if limits.min_distance > 0:
        shortest = shortest_distance(structure)
        if shortest < limits.min_distance:
            return (f"shortest interatomic distance {shortest:.3g} Å (periodic images "
                    f"included) is below predict.min_distance ({limits.min_distance!r} Å): "
                    "overlapping atoms or a collapsed cell")
    return ""


def parse_cif(text: str) -> list[Structure]:
    """The structures of a CIF's data blocks (pymatgen's CifParser, primitive=False). Where
    pymatgen finds none it says only "no structures" and gives the reason as a warning (two
    atoms on one site: "Occupancy 2.0 exceeded tolerance"): that reason joins the error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF parser warns a lot
        parser = CifParser.from_str(text)
        try:
            return parser.parse_structures(primitive=False)
        except ValueError as exc:
            reasons = _cif_failure_reasons(getattr(parser, "warnings", []))
            if not reasons:
                raise
            raise ValueError(f"{exc} pymatgen: {reasons}") from exc


def _cif_failure_reasons(messages: Sequence[str]) -> str:
    """pymatgen's reasons for the blocks it could not parse (its warning "No structure parsed
    for section 1 in CIF." is followed by the reason on the next line); all its warnings where
    none has that form."""
    reasons = [m.split("\n", 1)[1] for m in messages
               if m.startswith("No structure parsed") and "\n" in m]
    return "; ".join(r.replace("\n", " ") for r in (reasons or messages))


@dataclass
class Predictions:
    """Per model (in the order given) predictions in model units; NaN where a structure
    failed; `errors[i]` says why structure i failed ('' where it worked)."""

    values: list[np.ndarray]  # ensemble mean for an ensemble
    errors: list[str]
    warnings: list[str]  # predicted, but look at the structure ('' where nothing odd)
    stds: list[np.ndarray]  # std over ensemble members (model units); NaN for one model
    ood_scores: list[np.ndarray]  # NaN where the model has no OOD reference
    ood_flags: list[np.ndarray]  # bool: score above the model's validation threshold
    # calibrated prediction intervals (model units); NaN where the model has none
    lo: list[np.ndarray] = field(default_factory=list)
    hi: list[np.ndarray] = field(default_factory=list)
    # per model: the coverage its intervals have (None: no intervals) and, where it has
    # none, why ('' for a classifier: a probability has no interval)
    interval_coverage: list[float | None] = field(default_factory=list)
    interval_notes: list[str] = field(default_factory=list)


def model_intervals(model: LoadedModel, values: np.ndarray, stds: np.ndarray,
                    coverage: float = DEFAULT_COVERAGE
                    ) -> tuple[np.ndarray, np.ndarray, float | None, str]:
    """Lower and upper ends of the model's calibrated intervals at `coverage` around its
    predictions `values` (stds: the member spreads), the coverage they have (the smallest
    calibrated one at or above `coverage`) and, where there are none, why."""
    none = np.full(len(values), np.nan)
    if model.task != TASK_REGRESSION:
        return none, none, None, ""
    if model.calibration is None:
        return none, none, None, NO_CALIBRATION_NOTE
    half = model.calibration.half_width(coverage, stds)
    if half is None:
        return none, none, None, model.calibration.note(coverage)
    used, width = half
    return values - width, values + width, used, ""


def structure_error(structure: Structure, limits: StructureLimits = DEFAULT_LIMITS) -> str:
    """Why a structure cannot be predicted ('' if it can): the fetch checks, the elements the
    CGCNN feature table covers, and the limits on its work (before any neighbour search)."""
    problem = structure_problem(structure)
    if problem == "unsupported_species":
        # a symbol that is no element (pymatgen's DummySpecies): name it
        dummies = sorted({str(sp.symbol) for sp in structure.species
                          if isinstance(sp, DummySpecies)})
        return (f"unusable structure: {', '.join(dummies)} is not a chemical element "
                "(the CGCNN feature table covers elements 1-100)")
    if problem:
        return f"unusable structure: {problem.replace('_', ' ')}"
    known = _known_elements()
    unknown = {sp.symbol for sp in structure.species if sp.Z not in known}
    if unknown:
        return (f"element(s) {', '.join(sorted(unknown))} outside the CGCNN feature table "
                "(elements 1-100)")
    return limit_error(structure, limits)


@cache
def covalent_radii() -> np.ndarray:
    """Covalent radius (Å) by atomic number (pymatgen's table); NaN where it has none."""
    radii = np.full(max(known_elements()) + 1, np.nan)
    for z in range(1, len(radii)):
        radii[z] = CovalentRadius.radius.get(Element.from_Z(z).symbol, np.nan)
    return radii


def _crystal_of_edge(cache: GraphCache) -> np.ndarray:
    return np.repeat(np.arange(len(cache)), np.diff(cache.edge_offsets))


def shortest_bond_ratios(cache: GraphCache, crystal_of_edge: np.ndarray | None = None) -> np.ndarray:
    """Per crystal: min over its edges of distance / (sum of the two covalent radii); inf for
    a crystal without edges (the nearest neighbours are always among the edges)."""
    if crystal_of_edge is None:
        crystal_of_edge = _crystal_of_edge(cache)
    first_atom = cache.atom_offsets[:-1][crystal_of_edge]
    radii = covalent_radii()[np.asarray(cache.atomic_numbers)]
    ratio = cache.edge_distance / (radii[first_atom + cache.edge_src]
                                   + radii[first_atom + cache.edge_dst])
    shortest = np.full(len(cache), np.inf)
    np.fmin.at(shortest, crystal_of_edge, ratio)  # fmin: an element without a radius is skipped
    return shortest


def graph_warnings(cache: GraphCache) -> list[str]:
    """Per crystal of the cache: overlapping atoms (an edge shorter than OVERLAP_DISTANCE),
    bonds too short for the atoms' covalent radii (SHORT_BOND_RATIO: a compressed cell) and
    atoms with no neighbour within the radius (the convolution cannot see them)."""
    crystal_of_edge = _crystal_of_edge(cache)
    atom_of_edge = cache.atom_offsets[:-1][crystal_of_edge] + cache.edge_src
    edges_per_atom = np.bincount(atom_of_edge, minlength=int(cache.atom_offsets[-1]))
    lonely = np.add.reduceat(edges_per_atom == 0, cache.atom_offsets[:-1]) if len(cache) else []
    overlap = np.zeros(len(cache), bool)
    np.logical_or.at(overlap, crystal_of_edge, cache.edge_distance < OVERLAP_DISTANCE)
    bond_ratio = shortest_bond_ratios(cache, crystal_of_edge)
    out = []
    for i in range(len(cache)):
        notes = []
        if overlap[i]:
            notes.append(f"atoms closer than {OVERLAP_DISTANCE} Å")
        elif bond_ratio[i] < SHORT_BOND_RATIO:
            notes.append(f"a bond {bond_ratio[i]:.2f}x the sum of covalent radii (compressed "
                         f"cell? MP crystals have >= {SHORT_BOND_RATIO})")
        if cache.n_atoms[i] and lonely[i]:
            notes.append(f"{int(lonely[i])} atom(s) without a neighbour within "
                         f"{cache.settings.radius:g} Å")
        out.append("; ".join(notes))
    return out


def vacuum_gap(structure: Structure) -> float:
    """The widest empty gap (Å) between consecutive planes of atoms along any lattice
    direction: fractional-coordinate gap x the spacing of that family of lattice planes."""
    reciprocal = structure.lattice.reciprocal_lattice_crystallographic.abc
    coords = structure.frac_coords % 1.0  # a pymatgen property built from the sites: once
    widest = 0.0
    for axis in range(3):
        frac = np.sort(coords[:, axis])
        gaps = np.append(np.diff(frac), 1.0 - frac[-1] + frac[0])
        widest = max(widest, float(gaps.max()) / reciprocal[axis])
    return widest


def structure_warning(structure: Structure) -> str:
    gap = vacuum_gap(structure)
    if gap > VACUUM_GAP:
        return (f"{gap:.1f} Å of vacuum between atomic planes (a layer, slab or molecule; the "
                "models learnt bulk crystals)")
    return ""


def _known_elements() -> set[int]:
    return set(known_elements().tolist())


def _graphs(structures: list[Structure], settings: GraphSettings, rows: list[int],
            errors: list[str]):
    """Graphs of structures[rows]; a structure whose graph fails gets its error, not the batch."""
    try:
        return graphs_from_structures([structures[i] for i in rows], settings), rows
    except Exception:  # noqa: BLE001 - isolate the bad structure(s) one by one
        pass
    kept = []
    for i in rows:
        try:
            graphs_from_structures([structures[i]], settings)
            kept.append(i)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            errors[i] = f"graph: {type(exc).__name__}: {exc}"
    if not kept:
        return None, kept
    return graphs_from_structures([structures[i] for i in kept], settings), kept


def predict_structures(
    models: Sequence[LoadedModel], structures: Sequence[Structure | None],
    errors: Sequence[str] | None = None, batch_size: int = 512,
    limits: StructureLimits = DEFAULT_LIMITS, coverage: float = DEFAULT_COVERAGE,
) -> Predictions:
    """Every model on every usable structure; None entries (unreadable input), given errors
    and structures outside `limits` are passed through as failed rows. Intervals at
    `coverage` for the models that have a calibration (model_intervals)."""
    errs = list(errors) if errors is not None else [""] * len(structures)
    items = list(structures)
    for i, s in enumerate(items):
        if s is None:
            errs[i] = errs[i] or "no structure"
        elif not errs[i]:
            errs[i] = structure_error(s, limits)
    usable = [i for i, s in enumerate(items) if s is not None and not errs[i]]
    values = [np.full(len(items), np.nan) for _ in models]
    stds = [np.full(len(items), np.nan) for _ in models]
    scores = [np.full(len(items), np.nan) for _ in models]
    warns = [""] * len(items)
    for i in usable:
        warns[i] = structure_warning(items[i])
    by_setting: dict[GraphSettings, list[int]] = {}
    for k, m in enumerate(models):
        by_setting.setdefault(m.graph_settings, []).append(k)
    for settings, model_ids in by_setting.items():
        setting_errors = list(errs)
        cache, rows = _graphs(items, settings, usable, setting_errors)
        for i in usable:
            if setting_errors[i]:
                errs[i] = setting_errors[i]
        if cache is None:
            continue
        for i, w in zip(rows, graph_warnings(cache), strict=True):
            if w and w not in warns[i]:
                warns[i] = f"{warns[i]}; {w}" if warns[i] else w
        for k in model_ids:
            m = models[k]
            values[k][rows], stds[k][rows] = predict_rows(m, cache, batch_size=batch_size)
            if m.gate is not None:  # its classifier, on the same graphs (attach_metal_gate)
                p_metal, _ = predict_rows(m.gate, cache, batch_size=batch_size)
                values[k][rows], stds[k][rows] = gate_metals(values[k][rows], stds[k][rows],
                                                             p_metal)
            if m.ood is not None:
                scores[k][rows] = m.ood.scores(embed(m.model, cache, batch_size=batch_size))
    flags = [np.nan_to_num(sc, nan=-np.inf) > (m.ood.threshold if m.ood else np.inf)
             for sc, m in zip(scores, models, strict=True)]
    # after the metal gate: the interval is around the prediction as reported
    intervals = [model_intervals(m, v, sd, coverage)
                 for m, v, sd in zip(models, values, stds, strict=True)]
    lo, hi, used, notes = (list(x) for x in zip(*intervals, strict=True)) if models else (
        [], [], [], [])
    return Predictions(values, errs, warns, stds, scores, flags, lo, hi, used, notes)


def graph_inputs(structures: Sequence[Structure | None], errors: Sequence[str],
                 settings: GraphSettings, limits: StructureLimits = DEFAULT_LIMITS,
                 ) -> tuple[GraphCache | None, list[int]]:
    """Graphs of the usable structures (within `limits`), and which positions they are."""
    errs = [e or ("no structure" if s is None else structure_error(s, limits))
            for s, e in zip(structures, errors, strict=True)]
    usable = [i for i, e in enumerate(errs) if not e]
    return _graphs(list(structures), settings, usable, errs)


def predict_rows(model: LoadedModel, cache: GraphCache, rows: np.ndarray | None = None,
                 batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the model's members on rows of a graph cache (model units), with
    the model's zero floor (bundle zero_below) applied: its prediction as served."""
    return floor_to_zero(*ensemble_mean_std([predict(net, norm, cache, rows, batch_size)
                                             for net, norm in model.members]), model.zero_below)


def embed(model: CrystalGraphConvNet, cache: GraphCache, rows: np.ndarray | None = None,
          batch_size: int = 512) -> np.ndarray:
    """Crystal feature vectors (model.embed) of `rows` of the cache, shape (n, h_fea_len)."""
    rows = np.arange(len(cache)) if rows is None else np.asarray(rows)
    device = model_device(model)
    pin = pin_host_memory(device)
    model.eval()
    positions, chunks = [], []
    with torch.no_grad():
        for pos, batch in iterate_batches(cache, rows, batch_size):
            positions.append(pos)
            chunks.append(model.embed(batch.to(device, pin)).float())
    out = np.empty((len(rows), model.hyperparams.h_fea_len), dtype=np.float32)
    return collect_in_row_order(positions, chunks, out)
