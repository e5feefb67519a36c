"""A learned index plan (plan.json of weight learning, §4.1) against the paper's (§6.1).

    read_index_plan(path)              {"enc": [...], "dec": [...]}, every entry "src" or "tgt"
    paper_reference(plan)              the paper's plan at this plan's depth, and whether it is scaled
    plan_differences(plan, reference)  [(side, layer (1-based), learned, paper), ...]
    plan_comparison(plan)              one line: equal, or differs in N of M layers (which)

The paper learned its plan once, on lang12 with the 12 + 12-layer M2M-124: encoder layers 1-9 source-indexed,
10-12 target-indexed, every decoder layer target-indexed. A model of another depth (the demo's 2 + 2 layers) is
compared with that rule scaled to its depth (lslo.options.paper_index_plan: the top quarter of the encoder
target-indexed), and the line says so. Table 3's notes (lslo.tables) and the summary (lslo.summary) print it.
"""

from __future__ import annotations

from itertools import groupby

from lslo.errors import LsloError
from lslo.io import read_json
from lslo.options import INDEXES, SIDES, paper_index_plan

PAPER_DEPTH = 12  # encoder and decoder layers of the model the paper learned its plan on (M2M-124 615M)
SIDE_NAMES = {"enc": "encoder", "dec": "decoder"}


def read_index_plan(path) -> dict:
    """plan.json as weight learning writes it; anything else stops with one line naming the file."""
    plan = read_json(path)
    if not isinstance(plan, dict) or set(plan) != set(SIDES):
        raise LsloError(f"{path}: not an index plan; expected {{\"enc\": [...], \"dec\": [...]}}")
    for side in SIDES:
        layers = plan[side]
        if not isinstance(layers, list) or not layers or any(index not in INDEXES for index in layers):
            raise LsloError(f"{path}: {side} is {layers!r}; expected a non-empty list of "
                            f"{' / '.join(repr(i) for i in INDEXES)}, one per layer")
    return plan


def paper_reference(plan: dict) -> tuple[dict, bool]:
    """(the paper's plan at this plan's depth, True when that is the paper's rule scaled to another depth)."""
    depth = (len(plan["enc"]), len(plan["dec"]))
    return paper_index_plan(*depth), depth != (PAPER_DEPTH, PAPER_DEPTH)


def plan_differences(plan: dict, reference: dict) -> list[tuple[str, int, str, str]]:
    """The layers where `plan` and `reference` index differently: (side, layer (1-based), plan's, reference's)."""
    for side in SIDES:
        if len(plan[side]) != len(reference[side]):
            raise LsloError(f"index plans of different depth: {side} {len(plan[side])} and "
                            f"{len(reference[side])} layers")
    return [(side, layer, mine, theirs) for side in SIDES
            for layer, (mine, theirs) in enumerate(zip(plan[side], reference[side]), start=1) if mine != theirs]


def describe_plan(plan: dict) -> str:
    """'encoder src×9 tgt×3, decoder tgt×12': each side's indexes from the bottom layer up, as runs."""
    return ", ".join(f"{SIDE_NAMES[side]} " + " ".join(f"{index}×{len(list(run))}"
                                                       for index, run in groupby(plan[side]))
                     for side in SIDES)


def plan_comparison(plan: dict) -> str:
    """One line: whether `plan` is the paper's (or, at another depth, the paper's rule scaled to it), and if not,
    in how many layers it differs and which."""
    reference, scaled = paper_reference(plan)
    if scaled:
        paper = describe_plan(paper_index_plan(PAPER_DEPTH, PAPER_DEPTH))
        against = (f"the paper's rule scaled to this model's {len(plan['enc'])} + {len(plan['dec'])} layers (top "
                   f"quarter of the encoder target-indexed: {describe_plan(reference)}; the paper's own plan, at "
                   f"{PAPER_DEPTH} + {PAPER_DEPTH} layers, is {paper})")
    else:
        against = f"the paper's plan ({describe_plan(reference)}; §6.1)"
    differences = plan_differences(plan, reference)
    if not differences:
        return f"The learned index plan ({describe_plan(plan)}) equals {against}."
    layers = len(plan["enc"]) + len(plan["dec"])
    which = "; ".join(f"{SIDE_NAMES[side]} layer {layer}: {mine} ({'scaled rule' if scaled else 'paper'} {theirs})"
                      for side, layer, mine, theirs in differences)
    return (f"The learned index plan ({describe_plan(plan)}) differs from {against} in {len(differences)} of "
            f"{layers} layers: {which}.")
