"""Inference below MLflow: structures checked once, graphs built once per graph setting,
every model run on them. Used by `mpprop predict` and by the served MLflow model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from pymatgen.analysis.molecule_structure_comparator import CovalentRadius
from pymatgen.core import Element, Structure

from mpprop.batches import collect_in_row_order, iterate_batches
from mpprop.bundle import LoadedModel, ensemble_mean_std, gate_metals
from mpprop.device import pin_host_memory
from mpprop.graph_cache import GraphCache, known_elements
from mpprop.graphs import graphs_from_structures
from mpprop.model import CrystalGraphConvNet
from mpprop.settings import GraphSettings
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


def structure_error(structure: Structure) -> str:
    """Why a structure cannot be predicted ('' if it can): the fetch checks plus the
    elements the CGCNN feature table covers."""
    problem = structure_problem(structure)
    if problem:
        return f"unusable structure: {problem.replace('_', ' ')}"
    known = _known_elements()
    unknown = {sp.symbol for sp in structure.species if sp.Z not in known}
    if unknown:
        return f"element(s) {', '.join(sorted(unknown))} outside the CGCNN feature table"
    return ""


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
) -> Predictions:
    """Every model on every usable structure; None entries (unreadable input) and given
    errors are passed through as failed rows."""
    errs = list(errors) if errors is not None else [""] * len(structures)
    items = list(structures)
    for i, s in enumerate(items):
        if s is None:
            errs[i] = errs[i] or "no structure"
        elif not errs[i]:
            errs[i] = structure_error(s)
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
    return Predictions(values, errs, warns, stds, scores, flags)


def graph_inputs(structures: Sequence[Structure | None], errors: Sequence[str],
                 settings: GraphSettings) -> tuple[GraphCache | None, list[int]]:
    """Graphs of the usable structures, and which positions they are."""
    errs = [e or ("no structure" if s is None else structure_error(s))
            for s, e in zip(structures, errors, strict=True)]
    usable = [i for i, e in enumerate(errs) if not e]
    return _graphs(list(structures), settings, usable, errs)


def predict_rows(model: LoadedModel, cache: GraphCache, rows: np.ndarray | None = None,
                 batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over the model's members on rows of a graph cache (model units)."""
    return ensemble_mean_std([predict(net, norm, cache, rows, batch_size)
                              for net, norm in model.members])


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
