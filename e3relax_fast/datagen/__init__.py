"""Pair generation: perturb seed crystals, relax them with a potential (batched FIRE), write pairs.

``generate`` is the ``e3relax-fast datagen`` pipeline (:mod:`.generate`); :mod:`.protocols` makes
unrelaxed structures from seeds, :mod:`.seeds` reads seed files, :mod:`.fire` is the batched FIRE
optimiser and :mod:`.calculators` the potentials it drives; :mod:`.snapshot` writes a run folder
as the repository's compressed extxyz.
"""

from .calculators import ASEBatchCalculator, CHGNetBatchCalculator, as_batch_calculator, make_calculator
from .fire import BatchedFIRE, FireParams, RelaxOutcome, energies_above_minimum, relax_one_ase, steps_saved
from .generate import Job, JobPlan, Settings, generate, inherit_splits, judge, split_of, write_splits
from .protocols import (
    apply_rattle,
    apply_substitution,
    dls_volume,
    keep_symmetry,
    parse_protocols,
    period_group,
    similar_elements,
    substitutions,
)
from .seeds import FAMILIES, SeedSource, family_of, load_seed_source
from .snapshot import restore_run, write_snapshot

__all__ = ["FAMILIES", "ASEBatchCalculator", "BatchedFIRE", "CHGNetBatchCalculator", "FireParams", "Job", "JobPlan",
           "RelaxOutcome", "SeedSource", "Settings", "apply_rattle", "apply_substitution", "as_batch_calculator",
           "dls_volume", "family_of", "generate", "inherit_splits", "judge", "keep_symmetry", "load_seed_source",
           "make_calculator", "parse_protocols", "period_group", "relax_one_ase", "similar_elements", "split_of",
           "steps_saved", "energies_above_minimum", "substitutions", "restore_run", "write_snapshot",
           "write_splits"]
