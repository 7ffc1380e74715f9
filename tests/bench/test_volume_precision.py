"""bench/volume_precision.py: the model's ln V change against the true one, per group."""

from __future__ import annotations

import numpy as np

from bench.volume_precision import group_table, volume_guesses


def test_volume_guesses_read_the_index_notes(tmp_path):
    (tmp_path / "index.csv").write_text(
        "atoms_id,protocol,note\n"
        "a,subst_sym,F>Cl;Ga>Al;vol=dls;sg=25\n"
        "b,rattle,\n"
        "c,subst_sym,Na>K;vol=none\n"
        "d,subst,Na>K;sg=1\n")  # the default guess is not noted
    assert volume_guesses([str(tmp_path), str(tmp_path / "missing")]) == {"a": "dls", "c": "none", "d": "radius3"}


def test_group_table_rows():
    true = np.array([0.1, -0.2, 0.3, 0.0])
    rows = group_table({"rattle": list(zip(true, 0.5 * true, strict=True)), "minimum": [(0.0, 0.01)] * 3})
    minimum, rattle = rows[2:]
    # Dummy's error is the mean |true change|; a prediction of half the change has half of it as error.
    assert rattle == "| rattle | 4 | 0.150 | 0.075 | 1.00 | 0.075 |"
    assert minimum == "| minimum | 3 | 0.000 | 0.010 | n/a | 0.010 |"
