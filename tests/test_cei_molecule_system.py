"""The CEI System for any molecule, through the library: options, columns, order, metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowrecon.preprocessing import make_pair_transform, resolve_transform
from flowrecon.system import available_catalogues
from flowrecon.systems.cei.geometry import simulate_events
from flowrecon.systems.cei.metrics import (
    DESIGN_KEYS,
    EXTRA_KEYS,
    METRIC_INFO,
    cei_metrics,
    metric_info,
    metric_layout,
)
from flowrecon.systems.cei.molecule import load_molecule
from flowrecon.systems.cei.nbody import molecule_momenta
from flowrecon.systems.cei.system import make_system


def test_ocs_is_the_default_and_unchanged():
    system = make_system()
    assert system.description == "Coulomb explosion imaging of OCS"
    assert system.transform == "cei-momentum-frame" and system.prepare is None
    frame = system.simulate(64, seed=12)
    ev = simulate_events(64, seed=12)
    np.testing.assert_array_equal(frame[list(system.x_columns)].to_numpy(), ev.positions)
    np.testing.assert_array_equal(frame[list(system.y_columns)].to_numpy(), ev.momenta)
    assert metric_layout("ocs").design_keys == DESIGN_KEYS
    assert metric_layout("ocs").extra_keys == EXTRA_KEYS
    assert metric_info("ocs") == METRIC_INFO
    assert dict(system.metric_info) == METRIC_INFO


def test_a_molecule_names_columns_frame_charges_and_order():
    system = make_system(molecule="co2")
    m = load_molecule("co2")
    assert system.x_columns == m.position_columns and system.y_columns == m.momentum_columns
    assert system.transform == "cei-molecule-frame:2,0"
    assert system.options["molecule"] == "co2" and system.options["charges"] == [1.0, 1.0, 1.0]
    assert make_system(molecule="co2", frame="lab").transform is None
    assert make_system(molecule="so2", charges=(2, 1, 1)).options["charges"] == [2.0, 1.0, 1.0]
    # The canonical order relabels a file whose slower oxygen ion is called o1.
    row = [0.0] * 9 + [0.0, 0, 0, 1, 0, 0, -3, 0, 0]
    table = pd.DataFrame([row], columns=[*m.position_columns, *m.momentum_columns])
    table.loc[0, "o1x"], table.loc[0, "o2x"] = 1.5, -2.5
    out = system.prepare(table)
    assert out.loc[0, "po1x"] == -3 and out.loc[0, "o1x"] == -2.5
    assert system.prepare(out).equals(out)  # idempotent


def test_a_molecule_dict_is_kept_whole():
    data = dict(load_molecule("co2").to_dict(), name="mine")
    system = make_system(molecule=data)
    assert system.options["molecule"]["name"] == "mine"
    again = make_system(molecule=system.options["molecule"])
    assert again.x_columns == system.x_columns and again.transform == system.transform


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"molecule": "co3"}, "unknown molecule 'co3'. Did you mean 'co2'?"),
        ({"molecule": ""}, "molecule must be a preset"),
        ({"molecule": "co2", "charges": (1, 1)}, "charges must be 3 numbers for c,o1,o2"),
        ({"charges": (2, 1)}, "charges must be 3 numbers for C,O,S such as 2,2,2"),
        ({"molecule": "co2", "charges": (1, 1, 200)}, "charges must be positive and at most 118"),
        ({"molecule": "d2o", "geometry": "ocs"}, "geometry 'ocs' is for OCS only"),
        ({"temperature": -1.0}, "temperature must be >= 0 kelvin"),
        ({"geometry": "ball", "accuracy": "fast"}, "geometry 'ball' simulates from rest"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError) as err:
        make_system(**options)
    assert message in str(err.value)


def test_metrics_of_a_chiral_molecule_report_handedness():
    m = load_molecule("chbrclf")
    system = make_system(molecule="chbrclf")
    frame = system.simulate(40, seed=3)
    x, p = frame[list(system.x_columns)].to_numpy(), frame[list(system.y_columns)].to_numpy()
    exact = cei_metrics(np.stack([x, x]), x, p, charges=m.charges, molecule=m)
    assert exact["ade"] == 0 and exact["handedness_right"] == 1.0
    assert exact["resim_residual"] < 1e-6 and exact["energy_diff"] < 1e-6
    mirrored = cei_metrics(np.stack([-x, -x]), x, p, charges=m.charges, molecule=m)
    assert mirrored["handedness_right"] == 0.0 and mirrored["handedness_right_sample"] == 0.0
    layout = metric_layout(m)
    assert list(exact)[: len(layout.design_keys)] == list(layout.design_keys)
    assert "angle_error_hcf_deg" in exact and "bond_error_cbr" in exact


def test_resimulation_uses_the_molecule_simulator():
    m = load_molecule("d2o")
    x = np.ravel(m.geometry)[None]
    p = molecule_momenta(x, m)
    metrics = cei_metrics(np.stack([x, x]), x, p, charges=m.charges, molecule=m)
    assert metrics["resim_residual"] < 1e-12
    assert metrics["bond_error_od1"] == 0 and metrics["angle_error_deg"] == 0


def test_transform_options_by_name():
    assert resolve_transform("cei-molecule-frame:3,0") == "cei-molecule-frame:3,0"
    assert make_pair_transform("cei-molecule-frame:3,0").reference == (3, 0)
    message = "two different atom indices and optionally a mirror atom index or 'none', got 'a,b'"
    with pytest.raises(ValueError, match=message):
        make_pair_transform("cei-molecule-frame:a,b")
    with pytest.raises(ValueError, match="'cei-momentum-frame' takes no options"):
        make_pair_transform("cei-momentum-frame:1")
    with pytest.raises(ValueError, match="unknown transform 'nope'"):
        resolve_transform("nope:1")


def test_column_hint_names_the_molecule_of_the_file():
    hint = make_system(molecule="co2").column_hint
    ocs = list(make_system().y_columns) + list(make_system().x_columns)
    assert "columns of molecule 'ocs'" in hint(ocs) and "--molecule ocs" in hint(ocs)
    assert "needs pcx, pcy" in hint(["a", "b"])


def test_the_system_lists_its_molecules():
    name, rows = available_catalogues()["molecules"]
    assert name == "cei"
    by_name = {r["name"]: r for r in rows()}
    assert by_name["chbrclf"]["chirality"] == "c: br,cl,f (racemic)"
    assert by_name["co2"]["identical"] == "o1=o2" and by_name["ocs"]["frame"] == "s,c"
