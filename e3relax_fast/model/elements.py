"""Physical descriptors of the elements, an optional input of :class:`~e3relax_fast.model.E3Relax`
(``element_features=True``) beside its learned embedding.

The learned embedding knows an element only from the pairs it appears in: an element rare in the
training set, or a combination of elements never seen together, starts from little. The radius and
electronegativity of an element say how far its bonds reach and how ionic they are, the same for
every family, which is what a volume change on substitution follows (``python -m
bench.volume_descriptors``: a ridge regression on such descriptors predicts the volume change of
each held-out family's substitutions at 0.48-0.97 x Dummy, where the model's held-out volume error
is 0.72-1.0 x).

:data:`ELEMENTS` holds, for Z = 1..118: the covalent radius (Å; ASE's ``covalent_radii``, Cordero et
al. 2008; ASE's placeholder 2.0 where it has none, Z > 96), the Pauling electronegativity (pymatgen ``Element.X``;
NaN for the noble gases He, Ne, Ar and the heaviest elements), the period and the group (1-18; 3 for
lanthanides and actinides, as pymatgen gives). Written out from those libraries once (so the model
does not depend on them):
``[(covalent_radii[z], Element.from_Z(z).X, Element.from_Z(z).row, Element.from_Z(z).group) for z in range(1, 119)]``.
"""

from __future__ import annotations

import math

import torch

NAN = math.nan

#: (covalent radius Å, Pauling electronegativity or NaN, period, group) of Z = 1..118.
ELEMENTS = (
    (0.31, 2.20, 1, 1), (0.28, NAN, 1, 18), (1.28, 0.98, 2, 1), (0.96, 1.57, 2, 2), (0.84, 2.04, 2, 13),
    (0.76, 2.55, 2, 14), (0.71, 3.04, 2, 15), (0.66, 3.44, 2, 16), (0.57, 3.98, 2, 17), (0.58, NAN, 2, 18),
    (1.66, 0.93, 3, 1), (1.41, 1.31, 3, 2), (1.21, 1.61, 3, 13), (1.11, 1.90, 3, 14), (1.07, 2.19, 3, 15),
    (1.05, 2.58, 3, 16), (1.02, 3.16, 3, 17), (1.06, NAN, 3, 18), (2.03, 0.82, 4, 1), (1.76, 1.00, 4, 2),
    (1.70, 1.36, 4, 3), (1.60, 1.54, 4, 4), (1.53, 1.63, 4, 5), (1.39, 1.66, 4, 6), (1.39, 1.55, 4, 7),
    (1.32, 1.83, 4, 8), (1.26, 1.88, 4, 9), (1.24, 1.91, 4, 10), (1.32, 1.90, 4, 11), (1.22, 1.65, 4, 12),
    (1.22, 1.81, 4, 13), (1.20, 2.01, 4, 14), (1.19, 2.18, 4, 15), (1.20, 2.55, 4, 16), (1.20, 2.96, 4, 17),
    (1.16, 3.00, 4, 18), (2.20, 0.82, 5, 1), (1.95, 0.95, 5, 2), (1.90, 1.22, 5, 3), (1.75, 1.33, 5, 4),
    (1.64, 1.60, 5, 5), (1.54, 2.16, 5, 6), (1.47, 1.90, 5, 7), (1.46, 2.20, 5, 8), (1.42, 2.28, 5, 9),
    (1.39, 2.20, 5, 10), (1.45, 1.93, 5, 11), (1.44, 1.69, 5, 12), (1.42, 1.78, 5, 13), (1.39, 1.96, 5, 14),
    (1.39, 2.05, 5, 15), (1.38, 2.10, 5, 16), (1.39, 2.66, 5, 17), (1.40, 2.60, 5, 18), (2.44, 0.79, 6, 1),
    (2.15, 0.89, 6, 2), (2.07, 1.10, 6, 3), (2.04, 1.12, 6, 3), (2.03, 1.13, 6, 3), (2.01, 1.14, 6, 3),
    (1.99, 1.13, 6, 3), (1.98, 1.17, 6, 3), (1.98, 1.20, 6, 3), (1.96, 1.20, 6, 3), (1.94, 1.10, 6, 3),
    (1.92, 1.22, 6, 3), (1.92, 1.23, 6, 3), (1.89, 1.24, 6, 3), (1.90, 1.25, 6, 3), (1.87, 1.10, 6, 3),
    (1.87, 1.27, 6, 3), (1.75, 1.30, 6, 4), (1.70, 1.50, 6, 5), (1.62, 2.36, 6, 6), (1.51, 1.90, 6, 7),
    (1.44, 2.20, 6, 8), (1.41, 2.20, 6, 9), (1.36, 2.28, 6, 10), (1.36, 2.54, 6, 11), (1.32, 2.00, 6, 12),
    (1.45, 1.62, 6, 13), (1.46, 2.33, 6, 14), (1.48, 2.02, 6, 15), (1.40, 2.00, 6, 16), (1.50, 2.20, 6, 17),
    (1.50, 2.20, 6, 18), (2.60, 0.70, 7, 1), (2.21, 0.90, 7, 2), (2.15, 1.10, 7, 3), (2.06, 1.30, 7, 3),
    (2.00, 1.50, 7, 3), (1.96, 1.38, 7, 3), (1.90, 1.36, 7, 3), (1.87, 1.28, 7, 3), (1.80, 1.30, 7, 3),
    (1.69, 1.30, 7, 3), (2.00, 1.30, 7, 3), (2.00, 1.30, 7, 3), (2.00, 1.30, 7, 3), (2.00, 1.30, 7, 3),
    (2.00, 1.30, 7, 3), (2.00, 1.30, 7, 3), (2.00, 1.30, 7, 3), (2.00, NAN, 7, 4), (2.00, NAN, 7, 5),
    (2.00, NAN, 7, 6), (2.00, NAN, 7, 7), (2.00, NAN, 7, 8), (2.00, NAN, 7, 9), (2.00, NAN, 7, 10),
    (2.00, NAN, 7, 11), (2.00, NAN, 7, 12), (2.00, NAN, 7, 13), (2.00, NAN, 7, 14), (2.00, NAN, 7, 15),
    (2.00, NAN, 7, 16), (2.00, NAN, 7, 17), (2.00, NAN, 7, 18),
)

#: Centres of the Gaussian expansions of the radius (Å) and the electronegativity, and their widths:
#: neighbouring elements get overlapping features, so what is learned for one carries to the next.
RADIUS_CENTRES, RADIUS_WIDTH = torch.linspace(0.2, 2.6, 13, dtype=torch.float64), 0.2
ELECTRONEGATIVITY_CENTRES, ELECTRONEGATIVITY_WIDTH = torch.linspace(0.7, 4.0, 12, dtype=torch.float64), 0.3
#: Columns of :func:`element_feature_table`, in this order: the two expansions, a "no
#: electronegativity" flag, one-hot period (1-7) and one-hot group (1-18).
_RADIUS = slice(0, len(RADIUS_CENTRES))
_ELECTRONEGATIVITY = slice(_RADIUS.stop, _RADIUS.stop + len(ELECTRONEGATIVITY_CENTRES))
_NO_ELECTRONEGATIVITY = _ELECTRONEGATIVITY.stop
_PERIOD = _NO_ELECTRONEGATIVITY + 1  # column of period 1
_GROUP = _PERIOD + 7  # column of group 1
NUM_FEATURES = _GROUP + 18


def element_feature_table(num_elements: int) -> torch.Tensor:
    """``(num_elements, NUM_FEATURES)`` float64 features of Z = 0..num_elements-1 (row 0, no element,
    and rows past 118 are zero)."""
    table = torch.zeros(num_elements, NUM_FEATURES, dtype=torch.float64)
    for z, (radius, electronegativity, period, group) in enumerate(ELEMENTS[:num_elements - 1], start=1):
        row = table[z]
        row[_RADIUS] = torch.exp(-(((radius - RADIUS_CENTRES) / RADIUS_WIDTH) ** 2))
        if math.isnan(electronegativity):
            row[_NO_ELECTRONEGATIVITY] = 1.0
        else:
            row[_ELECTRONEGATIVITY] = torch.exp(
                -(((electronegativity - ELECTRONEGATIVITY_CENTRES) / ELECTRONEGATIVITY_WIDTH) ** 2))
        row[_PERIOD + period - 1] = 1.0
        row[_GROUP + group - 1] = 1.0
    # The far tails are exactly 0, not subnormal float32 numbers (slow to multiply on x86).
    return torch.where(table < 1e-6, 0.0, table)
